"""The live link: a UDP receiver polled on a Blender timer, driving the rig with the newest frame.

Each :meth:`LiveLink.update` (the timer's step, about 60 times a second) reads every datagram waiting on the
non-blocking socket and applies only the newest valid frame, so a burst, a gap or late packets never make
Blender wait. While recording, every frame that arrived is kept with its capture time, also those a busy UI
never showed; stopping the recording keys them into actions at the scene's frame rate
(``animation.key_motion``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import bpy

from .animation import KeyedMotion, key_motion
from .poses import FramePose, pose_from_stream
from .rig import FlameRig, RigError
from .stream import ReceiverCounts, UdpReceiver

log = logging.getLogger(__name__)

TIMER_INTERVAL_S = 1.0 / 60.0


@dataclass
class Recording:
    start_frame: int
    times: list[float] = field(default_factory=list)
    poses: list[FramePose] = field(default_factory=list)
    first_capture: float | None = None

    def add(self, t_capture: float, pose: FramePose) -> None:
        if self.first_capture is None:
            self.first_capture = t_capture
        self.times.append(t_capture - self.first_capture)
        self.poses.append(pose)


class LiveLink:
    """One connection: the receiver, the rig it drives and an optional recording."""

    def __init__(self, flame_rig: FlameRig, host: str, port: int) -> None:
        self.receiver = UdpReceiver(host, port)
        self.rig = flame_rig
        self.rig.prepare()
        self.applied_seq: int | None = None
        self.recording: Recording | None = None

    @property
    def counts(self) -> ReceiverCounts:
        return self.receiver.counts

    def update(self) -> bool:
        """Read what arrived and pose the rig with the newest frame; True when a new frame was applied."""
        frames = self.receiver.poll()
        if not frames:
            return False
        if self.recording is not None:
            for frame in frames:
                self.recording.add(frame.t_capture, pose_from_stream(frame))
        newest = frames[-1]
        self.rig.apply(self.rig.frame(pose_from_stream(newest)))
        self.applied_seq = newest.seq
        return True

    def start_recording(self, start_frame: int) -> list[str]:
        """Start keeping frames; the rig's actions (an earlier take) are unassigned and their names returned."""
        self.recording = Recording(start_frame)
        return self.rig.detach_actions()

    def stop_recording(self, fps: float, name: str) -> KeyedMotion:
        recording, self.recording = self.recording, None
        if recording is None:
            return KeyedMotion(0, 0, 0, 0)
        return key_motion(self.rig, recording.times, recording.poses, recording.start_frame, fps, name)

    def close(self) -> None:
        self.receiver.close()


#: The add-on's one live link (Blender timers are global too); None when disconnected.
_link: LiveLink | None = None
#: Why the link last stopped on its own, for the panel; empty after a clean disconnect.
_stopped_because = ""


def current() -> LiveLink | None:
    return _link


def stopped_because() -> str:
    return _stopped_because


def connect(flame_rig: FlameRig, host: str, port: int) -> LiveLink:
    """Open the receiver (StreamError when the port is taken) and start the timer."""
    global _link, _stopped_because
    disconnect()
    _link = LiveLink(flame_rig, host, port)
    _stopped_because = ""
    if not bpy.app.timers.is_registered(_tick):
        bpy.app.timers.register(_tick, first_interval=TIMER_INTERVAL_S, persistent=True)
    return _link


def disconnect() -> None:
    if bpy.app.timers.is_registered(_tick):
        bpy.app.timers.unregister(_tick)
    _close_link()


def _close_link() -> None:
    global _link
    if _link is not None:
        _link.close()
        _link = None


def _tick() -> float | None:
    """The timer: one update step; a failure stops the link with its reason instead of raising into Blender."""
    global _stopped_because
    link = _link
    if link is None:
        return None
    try:
        if link.update():
            _redraw_views()
        return TIMER_INTERVAL_S
    except (ReferenceError, RigError, KeyError) as error:  # the rig was deleted or changed under the link
        _stopped_because = f"live link stopped: the rig changed ({error}); select the rig and connect again"
        log.error(_stopped_because)
    except Exception as error:  # the boundary into Blender's timer loop: stop with the reason, never raise there
        _stopped_because = f"live link stopped: {type(error).__name__}: {error}"
        log.exception(_stopped_because)
    _close_link()
    return None  # ends the timer


def _redraw_views() -> None:
    window_manager = bpy.context.window_manager
    for window in window_manager.windows if window_manager else ():
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                area.tag_redraw()
