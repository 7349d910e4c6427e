"""``live``: from the options a user gives to a running loop, and everything closed again afterwards.

:func:`run_live` opens the source, publishers, models, tracker, recorder and preview in an order that reports
user mistakes before the slow steps, hands them to :class:`realtime.pipeline.LivePipeline`, and closes them
when the loop ends.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import to_tree
from engine.filters import OneEuroConfig
from engine.landmarks import LandmarkerConfig
from engine.model_files import find_face_landmarker, resolve_models_dir
from engine.model_selection import select_head_model
from engine.tracker import Tracker, TrackerConfig
from realtime.metrics import LiveSummary
from realtime.detection_process import DetectionProcess
from realtime.outputs import PublisherOptions, close_all, open_publishers, wait_for_subscribers
from realtime.pipeline import LiveConfig, LivePipeline
from realtime.preview import PreviewWindow, display_available
from realtime.recorder import RecorderOptions, SessionRecorder
from realtime.session_metadata import session_metadata
from realtime.sources import SourceOptions, open_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveOptions:
    """Everything ``run_stream.py live`` decides."""

    source: str = "0"
    realtime: bool = True
    """Play files at their own rate (dropping frames the loop has no time for); False reads every frame."""
    flame: str | None = None
    """A FLAME folder, "demo", or None for FLAME when the models folder has it, else the demo head."""
    models_dir: Path | None = None
    tracker: TrackerConfig = field(default_factory=lambda: live_tracker_config("cpu"))
    publishers: PublisherOptions = field(default_factory=PublisherOptions)
    record_dir: Path | None = None
    overwrite: bool = False
    recorder: RecorderOptions = field(default_factory=RecorderOptions)
    """How ``record_dir`` is written."""
    source_options: SourceOptions = field(default_factory=SourceOptions)
    """How the source opens and recovers; ``repeat`` plays a video file again whenever it ends (soak runs)."""
    subscriber_wait_s: float = 0.0
    """Before the first frame, wait up to this long for a first ZeroMQ subscriber (a soak that counts every
    frame); 0 starts at once, as a camera should."""
    loop: LiveConfig = field(default_factory=LiveConfig)

    def config_tree(self) -> dict[str, Any]:
        """How the run tracks, as ``live --config`` reads it (``session.json``'s ``"config"``)."""
        return {"tracker": to_tree(self.tracker), "live": to_tree(self.loop), "source": to_tree(self.source_options),
                "publishers": to_tree(self.publishers), "recorder": to_tree(self.recorder)}  # fmt: skip


def live_tracker_config(device: str) -> TrackerConfig:
    """Live tracking's defaults: the One Euro output filter, calibration in the background."""
    return TrackerConfig(output_filter=OneEuroConfig(), device=device, calibrate_in_background=True)


def run_live(options: LiveOptions, stop: threading.Event | None = None, recalibrate: threading.Event | None = None) -> LiveSummary:
    """Open the source, publishers, models and recorder, run the loop, and close everything again.

    Setting `recalibrate` (from any thread) makes the tracker calibrate identity and FOV again.

    User mistakes (no such camera or file, port in use, recording folder taken) raise UserError; the cheap
    checks come first, so they are reported before the models load. Without a display, --preview is skipped
    with one line and tracking goes on.
    """
    recalibrate = recalibrate or threading.Event()
    with contextlib.ExitStack() as stack:
        show_preview = options.loop.preview and display_available()
        source = open_source(options.source, options.realtime, options.source_options)
        stack.callback(source.stop)
        publishers = open_publishers(options.publishers)
        stack.callback(close_all, publishers)

        models_dir = resolve_models_dir(options.models_dir)
        head = select_head_model(options.flame, models_dir)
        width, height = options.loop.frame_size or source.size
        detector = stack.enter_context(DetectionProcess(LandmarkerConfig(find_face_landmarker(models_dir)), (height, width)))
        tracker = Tracker(head, (height, width), options.tracker)
        stack.callback(tracker.close)
        log.info("tracking %s (%dx%d) with the %s on %s", source.description, width, height, head.name, options.tracker.device)

        recorder = None
        if options.record_dir is not None:
            metadata = session_metadata(source, head, tracker, options.config_tree(), landmarks_in_messages=options.loop.include_landmarks)
            recorder = SessionRecorder(options.record_dir, source.fps, (width, height), metadata, overwrite=options.overwrite, options=options.recorder)
            stack.enter_context(recorder)
        preview = None
        if show_preview:
            preview = stack.enter_context(PreviewWindow(head, tracker.rig.layer.n_shape, tracker.rig.layer.n_exp, recalibrate))
        pipeline = LivePipeline(source, detector, tracker, publishers, recorder, options.loop, preview)
        pipeline.recalibrate = recalibrate
        if options.subscriber_wait_s > 0:
            wait_for_subscribers(publishers, options.subscriber_wait_s, stop)
        return pipeline.run(stop)
