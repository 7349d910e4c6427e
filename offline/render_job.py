"""Rendering a fit over its input: the ``render`` command, and ``track --render`` / ``refine --render``.

Reads a result from disk: a ``track`` folder (meta.json, per-frame .npz, landmarks.npz), a ``refine`` folder
(the same per-frame format plus ``tex``/``light`` and ``texture.png``) or a live recording (session.json,
frames.msgpack, video.mkv), and draws the fitted head over the original frames, one output frame per input
frame:

- ``overlay``: the shaded mesh blended over the frame (a refined fit: its textured, lit head, opaque);
- ``side``: the input beside the overlay (a refined fit: input | textured render | overlay);
- ``mesh``: the mesh alone on grey;
- ``compare``: this result beside another of the same input (``against``, e.g. a ``track`` fit beside its
  refinement), both drawn with one texture and light, over their per-pixel photometric error inside the face
  mask and the difference of the two errors, every panel cropped around a face region (``zoom``).

``RenderOptions.appearance`` (``render --appearance REFINE_DIR``) draws any result with a refinement's texture
and lighting, so a ``track`` fit and its refinement can be compared under one appearance.

Frames without a valid fit show the input unrendered with a red border and "no fit", never a stale mesh.
Output by the name given: ``FILE.mp4`` (H.264 at the input's frame rate and size), ``FILE.png`` (one frame),
or a folder of ``{frame:06d}.png``. An MP4 is written under a temporary name and renamed when complete, so
an interrupted render never leaves a damaged file where a good one was.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av
import cv2
import numpy as np
from tqdm import tqdm

from engine.atomic import write_png_atomic
from engine.camera import Camera
from engine.demo_head import DEMO_HEAD_NAME
from engine.errors import UserError
from engine.face_regions import region_box, region_masks
from engine.export import PARAMETER_KEYS, check_tracked_with, posed_vertices, read_parameter_arrays
from engine.flame import FlameLayer
from engine.frames import reference_from_message
from engine.head_model import HeadModel
from engine.overlay import (
    FITTED_RGB,
    HIGHER_RGB,
    LOWER_RGB,
    MESH_ALPHA,
    OBSERVED_RGB,
    Appearance,
    LandmarkPairs,
    MeshPainter,
    Painted,
    composite,
    difference_picture,
    draw_label,
    draw_points,
    error_picture,
    grey_canvas,
    mark_invalid,
    photometric_error,
    photometric_face_mask,
    zoomed,
)
from offline.track_job import LANDMARKS_FILE, OVERLAY_IMAGE, OVERLAY_VIDEO, load_landmark_file

log = logging.getLogger(__name__)

STYLES = ("overlay", "side", "mesh", "compare")
VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIX = ".png"
TRACK_FORMAT = "flame-live tracking"
REFINE_FORMAT = "flame-live photometric refinement"
META_FILE = "meta.json"
TEXTURE_FILE = "texture.png"
_DEFAULT_CRF = 18
#: ``compare``: (width, height) of each panel, shaped like the region it shows.
PANEL_SIZES = {"face": (256, 256), "mouth": (300, 200), "eyes": (400, 160), "cheeks": (360, 180)}


@dataclass(frozen=True)
class RenderOptions:
    style: Literal["overlay", "side", "mesh", "compare"] = "overlay"
    landmarks: bool = False
    """Also draw the observed (green) and fitted (magenta) landmarks."""
    first_frame: int = 0
    stop_frame: int | None = None
    """Render input frames first_frame .. stop_frame - 1 (None: to the end)."""
    video: Path | None = None
    """The input's frames, when the result does not say where they are (or they moved)."""
    overwrite: bool = False
    progress: bool = True
    crf: int = _DEFAULT_CRF
    """H.264 quality (lower is better; 18 is visually lossless)."""
    flame: str | None = None
    """The model (a FLAME folder or 'demo'); None: the demo head for a demo-head result, else the default."""
    models_dir: Path | None = None
    appearance: Path | None = None
    """A refine folder whose texture and lighting draw this result (None: the result's own)."""
    against: Path | None = None
    """``compare``: the result drawn beside this one (None with any other style)."""
    zoom: Literal["face", "mouth", "eyes", "cheeks"] = "face"
    """``compare``: the face region every panel is cropped around."""


@dataclass(frozen=True)
class RenderSummary:
    out: Path
    frames: int
    rendered_frames: int
    """Frames with a valid fit, drawn with the mesh."""
    seconds: float

    def describe(self) -> str:
        per_frame = self.seconds * 1e3 / max(self.frames, 1)
        return f"rendered {self.frames} frames ({self.rendered_frames} with a fit) -> {self.out} ({per_frame:.0f} ms per frame)"


@dataclass
class FitRecord:
    """A result as read from disk: per-frame parameters in the reference format and where its frames are."""

    directory: Path
    kind: str  # "track", "refine" or "session"
    model: dict[str, Any]  # name, checksum, is_demo
    params: dict[int, dict[str, np.ndarray]]  # frame index -> reference arrays (leading dimension 1)
    image_size: tuple[int, int] | None  # (height, width)
    fps: float | None
    n_frames: int | None
    frames: Callable[[], Iterator[np.ndarray]] | None  # the input's RGB frames in order, or None when unknown
    frames_origin: str  # what the frames are, for messages
    observed: dict[int, np.ndarray] = field(default_factory=dict)  # frame index -> (478, 2) MediaPipe pixels
    appearance: Appearance | None = None
    light: np.ndarray | None = None  # (9, 3) SH lighting for frames whose arrays carry none (--appearance)


# ------------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} cannot be read ({error}); is the result folder damaged?") from None
    if not isinstance(document, dict):
        raise UserError(f"{path} is not a flame-live result file")
    return document


def _frame_files(directory: Path) -> dict[int, dict[str, np.ndarray]]:
    return {int(path.stem): read_parameter_arrays(path) for path in sorted(directory.glob("[0-9]" * 6 + ".npz"))}


def _observed_landmarks(path: Path) -> dict[int, np.ndarray]:
    if not path.is_file():
        return {}
    mp478 = load_landmark_file(path).mp478
    return {} if mp478 is None else {index: points for index, points in enumerate(mp478) if np.isfinite(points).any()}


def _video_frames(source: str) -> Callable[[], Iterator[np.ndarray]]:
    from realtime.sources import iter_frames

    def frames() -> Iterator[np.ndarray]:
        for frame in iter_frames(source):
            yield frame.image

    return frames


def _probe(source: str) -> tuple[tuple[int, int], float | None]:
    """((height, width), fps) of a video, image or image folder; UserError when it cannot be read."""
    from realtime.sources import open_source

    probe = open_source(source, realtime=False)
    try:
        width, height = probe.size
        return (height, width), probe.fps
    finally:
        probe.stop()


def _recorded_source(directory: Path, meta: dict[str, Any]) -> tuple[str | None, str]:
    """The input a track or refine result came from, as (path or None, what was looked for)."""
    source = meta.get("source")
    if isinstance(source, str):
        if Path(source).suffix.lower() == ".npz":
            return None, f"{directory / META_FILE} names the landmarks file {source}, which holds no images"
        candidates = [Path(source)] if Path(source).is_absolute() else [Path(source), directory.parent / source]
        for candidate in candidates:
            if candidate.exists():
                return str(candidate), str(candidate)
        if "://" in source:
            return source, source
        return None, f"the source video {source} (recorded in {directory / META_FILE}) was not found"
    parent = directory.parent
    from realtime.session import SESSION_FILE, VIDEO_FILE

    if (parent / SESSION_FILE).is_file():
        video = parent / VIDEO_FILE
        return (str(video), str(video)) if video.is_file() else (None, f"the session video {video} was not found")
    if (parent / META_FILE).is_file():
        return _recorded_source(parent, _read_json(parent / META_FILE))
    return None, f"{directory / META_FILE} does not say which video was refined"


def read_fit(directory: Path, video: Path | None = None) -> FitRecord:
    """Read a track, refine or live-session result folder (see the module docstring)."""
    from realtime.session import SESSION_FILE

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a folder: give a folder written by track, refine or live --record")
    if (directory / SESSION_FILE).is_file():
        record = _read_session(directory)
    elif (directory / META_FILE).is_file():
        record = _read_result_folder(directory)
    else:
        raise UserError(
            f"{directory} holds neither {META_FILE} (track / refine output) nor {SESSION_FILE} (live --record): "
            "give the folder a flame-live command wrote"
        )
    if video is not None:
        if not video.exists():
            raise UserError(f"--video {video} does not exist")
        record.frames, record.frames_origin = _video_frames(str(video)), str(video)
    if record.frames is not None:
        size, fps = _probe(record.frames_origin)
        if record.image_size is not None and size != record.image_size:
            raise UserError(
                f"{record.frames_origin} has {size[1]}x{size[0]} frames but {directory} was fitted on "
                f"{record.image_size[1]}x{record.image_size[0]} frames; pass the video it was made from with --video"
            )
        record.image_size = size
        record.fps = record.fps or fps
    return record


def _read_result_folder(directory: Path) -> FitRecord:
    meta = _read_json(directory / META_FILE)
    kind = {TRACK_FORMAT: "track", REFINE_FORMAT: "refine"}.get(meta.get("format"))
    if kind is None:
        raise UserError(f"{directory / META_FILE} is not a track or refine result (format {meta.get('format')!r})")
    params = _frame_files(directory)
    if not params:
        raise UserError(f"{directory} holds no per-frame .npz files; was the run interrupted before its first frame?")
    model = dict(meta.get("model") or {})
    model.setdefault("is_demo", model.get("name") == DEMO_HEAD_NAME)
    size = meta.get("image_size")
    if isinstance(size, dict):
        image_size = (int(size["height"]), int(size["width"]))
    else:  # refine results: the principal point is the image centre
        K = next(iter(params.values()))["K"][0]
        image_size = (int(round(2 * K[1, 2])), int(round(2 * K[0, 2])))
    source, origin = _recorded_source(directory, meta)
    observed = _observed_landmarks(directory / LANDMARKS_FILE)
    if not observed and kind == "refine":
        observed = _observed_landmarks(directory.parent / LANDMARKS_FILE)
    return FitRecord(
        directory=directory,
        kind=kind,
        model=model,
        params=params,
        image_size=image_size,
        fps=meta.get("fps"),
        n_frames=meta.get("frames"),
        frames=None if source is None else _video_frames(source),
        frames_origin=origin,
        observed=observed,
        appearance=_refined_appearance(directory, meta, params) if kind == "refine" else None,
    )


def borrowed_appearance(directory: Path, model_checksum: str | None) -> tuple[Appearance, np.ndarray]:
    """The texture (or vertex colours) and the lighting of a refine folder, to draw another result of the same
    model with (``--appearance``)."""
    directory = Path(directory)
    meta = _read_json(directory / META_FILE) if (directory / META_FILE).is_file() else {}
    if meta.get("format") != REFINE_FORMAT:
        raise UserError(f"--appearance {directory}: not a refine output folder (its {META_FILE} must come from refine)")
    if model_checksum is not None and (meta.get("model") or {}).get("checksum") not in (None, model_checksum):
        raise UserError(f"--appearance {directory} was refined with another model than the result; give a refinement of the same model")
    params = _frame_files(directory)
    appearance = _refined_appearance(directory, meta, params)
    lit = [arrays["light"][0] for arrays in params.values() if "light" in arrays]
    if appearance is None or not lit:
        raise UserError(f"--appearance {directory} holds no texture and lighting; was the refinement interrupted?")
    return appearance, np.asarray(lit[0], dtype=np.float64)


def _refined_appearance(directory: Path, meta: dict[str, Any], params: dict[int, dict[str, np.ndarray]]) -> Appearance | None:
    kind = (meta.get("appearance") or {}).get("kind")
    if kind == "vertex":
        tex = next(iter(params.values())).get("tex")
        return None if tex is None else Appearance(vertex_colors=np.clip(tex.reshape(-1, 3), 0.0, 1.0))
    texture = directory / TEXTURE_FILE
    if not texture.is_file():
        log.warning("%s is missing: rendering the refined fit untextured", texture)
        return None
    bgr = cv2.imread(str(texture), cv2.IMREAD_COLOR)
    if bgr is None:
        raise UserError(f"{texture} cannot be read as an image")
    return Appearance(texture=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0)


def _read_session(directory: Path) -> FitRecord:
    from flame_client.messages import TOPIC_SHAPE
    from realtime.session import SessionReader

    reader = SessionReader(directory)
    if reader.frame_size is None:
        raise UserError(f"session {directory} was recorded without video; render needs the frames")
    width, height = reader.frame_size
    params: dict[int, dict[str, np.ndarray]] = {}
    observed: dict[int, np.ndarray] = {}
    shape: np.ndarray | None = None
    for record in reader.tracking_messages():
        message = record.message
        if record.topic == TOPIC_SHAPE:
            shape = np.asarray(message["shape"], dtype=np.float32)
        elif record.video_frame is not None and shape is not None:
            params[record.video_frame] = reference_from_message(message, shape, Camera.from_fov(width, height, float(message["fov_deg"])).intrinsics())
            landmarks = message.get("landmarks")
            if landmarks is not None and len(landmarks) == 2 * 478:
                observed[record.video_frame] = np.asarray(landmarks, dtype=np.float64).reshape(478, 2)
    if not params:
        raise UserError(f"session {directory} holds no tracked frames")
    model = dict(reader.metadata.get("model") or {})

    def frames() -> Iterator[np.ndarray]:
        for frame in reader.video_frames():
            yield frame.image

    return FitRecord(
        directory=directory, kind="session", model=model, params=params, image_size=(height, width), fps=reader.fps,
        n_frames=None, frames=frames, frames_origin=str(reader.video_path), observed=observed,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- output
def check_output(out: Path, overwrite: bool) -> str:
    """'video', 'image' or 'folder' for an output path; refuses one that exists unless ``overwrite``."""
    suffix = out.suffix.lower()
    kind = "video" if suffix in VIDEO_SUFFIXES else "image" if suffix == IMAGE_SUFFIX else "folder" if not suffix else None
    if kind is None:
        raise UserError(f"--out {out}: give FILE.mp4 (video), FILE.png (one frame) or a folder name for PNG frames")
    exists = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if exists and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if kind == "folder" and out.is_file():
        raise UserError(f"--out {out} is a file; give a folder name for PNG frames")
    return kind


class _Mp4Writer:
    """H.264 in MP4 at a constant frame rate, written to a temporary file that replaces ``path`` when complete."""

    def __init__(self, path: Path, size: tuple[int, int], fps: float, crf: int) -> None:
        height, width = size
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, self._temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".mp4")
        os.close(handle)
        os.chmod(self._temporary, 0o644)  # mkstemp makes it private; a rendered video is as readable as its input
        self._container = av.open(self._temporary, "w", format="mp4")
        self._rate = Fraction(fps).limit_denominator(1001)
        self._stream = self._container.add_stream("libx264", rate=self._rate, options={"crf": str(crf), "preset": "veryfast"})
        self._stream.width, self._stream.height = width, height
        # 4:2:0 chroma needs even sides; 4:4:4 keeps an odd-sized input's exact size.
        self._stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        self._stream.codec_context.time_base = 1 / self._rate
        self._count = 0

    def write(self, index: int, image: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = self._count
        frame.time_base = 1 / self._rate
        self._count += 1
        self._container.mux(self._stream.encode(frame))

    def close(self, complete: bool) -> None:
        try:
            if complete:
                self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()
            if complete:
                os.replace(self._temporary, self.path)
            else:
                os.unlink(self._temporary)


class _PngWriter:
    """One PNG per frame into a folder, or a single PNG; each file written under a temporary name first."""

    def __init__(self, out: Path, single: bool) -> None:
        self.out, self.single = out, single
        (out.parent if single else out).mkdir(parents=True, exist_ok=True)

    def write(self, index: int, image: np.ndarray) -> None:
        path = self.out if self.single else self.out / f"{index:06d}.png"
        try:
            write_png_atomic(path, image)
        except OSError as error:
            raise UserError(f"could not write {path}: {error}") from None

    def close(self, complete: bool) -> None:
        """Every frame is complete on disk as soon as it is written."""


# ------------------------------------------------------------------------------------------------ drawing
class FrameComposer:
    """Turns one input frame and its fit into the output picture of a style."""

    def __init__(self, head: HeadModel, record: FitRecord, options: RenderOptions, against: FitRecord | None = None) -> None:
        self.layer = _layer(head, record)
        self.textured = record.appearance is not None
        self.painter = MeshPainter(head, record.appearance)
        self.pairs = LandmarkPairs.for_head(head) if options.landmarks else None
        self.options = options
        self.record = record
        self.against = against
        self.against_layer = None if against is None else _layer(head, against)
        self.demo_label = DEMO_HEAD_NAME if record.model.get("is_demo") else None

    def output_size(self) -> tuple[int, int]:
        """(height, width) of every output picture."""
        height, width = self.record.image_size
        if self.options.style == "compare":
            panel_width, panel_height = PANEL_SIZES[self.options.zoom]
            return 2 * panel_height, 3 * panel_width
        return height, width * (1 if self.options.style != "side" else 3 if self.textured else 2)

    def compose(self, index: int, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """The output picture of input frame ``index``, and whether it shows a fit."""
        if self.options.style == "compare":
            return self._compare(index, image)
        style = self.options.style
        alpha = 1.0 if self.textured else MESH_ALPHA
        base = grey_canvas(*image.shape[:2]) if style == "mesh" else image.copy()
        main, painted, valid = self._draw(self.record, self.layer, index, image, base, 1.0 if style == "mesh" else alpha)
        self._labels(main, index)
        if style != "side":
            return main, valid
        panels = [image]
        if self.textured:
            panels.append(composite(grey_canvas(*image.shape[:2]), painted, 1.0))
        panels.append(main)
        return np.concatenate(panels, axis=1), valid

    def _draw(self, record: FitRecord, layer: FlameLayer, index: int, image: np.ndarray, canvas: np.ndarray,
              alpha: float) -> tuple[np.ndarray, Painted | None, bool]:
        """``record``'s fit of frame ``index`` painted over ``canvas`` (with its landmarks when asked), the painted
        head, and whether the frame has a valid fit (else the canvas is marked 'no fit')."""
        arrays = record.params.get(index)
        valid = arrays is not None and bool(arrays["valid"][0]) and all(np.isfinite(arrays[key]).all() for key in (*PARAMETER_KEYS, "K"))
        painted = None
        if valid:
            vertices = posed_vertices(layer, arrays, space="camera")
            K = arrays["K"][0].astype(np.float64)
            painted = self.painter.paint(vertices, K, image.shape[:2], self._light(index))
            composite(canvas, painted, alpha)
            if self.pairs is not None:
                observed = self.record.observed.get(index)
                draw_points(canvas, None if observed is None else self.pairs.observed(observed), OBSERVED_RGB, radius=2)
                draw_points(canvas, self.pairs.fitted(vertices, K), FITTED_RGB)
        else:
            mark_invalid(canvas)
        return canvas, painted, valid

    def _light(self, index: int) -> np.ndarray | None:
        """The lighting every fit of frame ``index`` is drawn with: the borrowed one (``--appearance``), else the
        refinement's own, else None (the default light of an untextured mesh)."""
        if self.record.light is not None or not self.textured:
            return self.record.light
        for record in (self.record, self.against):
            arrays = None if record is None else record.params.get(index)
            if arrays is not None and "light" in arrays:
                return arrays["light"][0].astype(np.float64)
        return None

    def _compare(self, index: int, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """Input | the other fit | this fit over (error difference | their errors), cropped around the zoom region."""
        height, width = image.shape[:2]
        observed = self.record.observed.get(index)
        observed = np.full((478, 2), np.nan) if observed is None else observed
        mask = photometric_face_mask(observed, (height, width))
        zoom = self.options.zoom
        region = mask if zoom == "face" else mask & region_masks(observed, (height, width))[zoom]
        box = _panel_box(observed, zoom, (height, width))
        size = PANEL_SIZES[zoom]
        fits, errors, valid_all = [], [], True
        for record, layer in ((self.against, self.against_layer), (self.record, self.layer)):
            drawn, painted, valid = self._draw(record, layer, index, image, image.copy(), 1.0)
            valid_all &= valid
            fits.append((record, zoomed(drawn, box, size)))
            errors.append(photometric_error(image, painted, mask) if valid else None)
        top = [zoomed(image, box, size)]
        bottom = []
        for (record, panel), error in zip(fits, errors):
            draw_label(panel, record.kind, 0)
            picture = zoomed(error_picture(np.zeros(mask.shape) if error is None else error, mask, image), box, size)
            if error is not None:
                region_text = "" if zoom == "face" else f", {zoom} {_mean(error, region):.4f}"
                draw_label(picture, f"error: face {_mean(error, mask):.4f}{region_text}", 0)
            top.append(panel)
            bottom.append(picture)
        first, second = (record.kind for record, _ in fits)
        difference = difference_picture(*(np.zeros(mask.shape) if e is None else e for e in errors), mask, image)
        legend = zoomed(difference, box, size)
        draw_label(legend, f"{first} - {second} error", 0)
        draw_label(legend, f"blue: {second} lower", 1, LOWER_RGB)
        draw_label(legend, f"orange: {second} higher", 2, HIGHER_RGB)
        self._labels(top[0], index)
        return np.concatenate([np.concatenate(top, axis=1), np.concatenate([legend, *bottom], axis=1)], axis=0), valid_all

    def _labels(self, canvas: np.ndarray, index: int) -> None:
        draw_label(canvas, f"frame {index}", 0)
        if self.demo_label is not None:
            draw_label(canvas, self.demo_label, 0, bottom=True)


def _layer(head: HeadModel, record: FitRecord) -> FlameLayer:
    return FlameLayer(head, *_sizes(record))


def _mean(error: np.ndarray, mask: np.ndarray) -> float:
    return float(error[mask].mean()) if mask.any() else float("nan")


def _panel_box(mp478: np.ndarray, zoom: str, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The part of the image a ``compare`` panel shows: the zoom region's box widened to the panel's shape, or
    the whole image when the frame's landmarks are missing."""
    height, width = image_size
    box = region_box(mp478, zoom, margin=0.15 if zoom == "face" else 0.35)
    if box is None:
        return 0.0, 0.0, float(width), float(height)
    x0, y0, x1, y1 = box
    panel_width, panel_height = PANEL_SIZES[zoom]
    half_width = max(x1 - x0, (y1 - y0) * panel_width / panel_height) / 2
    half_height = half_width * panel_height / panel_width
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return cx - half_width, cy - half_height, cx + half_width, cy + half_height


# -------------------------------------------------------------------------------------------------- the job
def _flame_choice(record: FitRecord, flame: str | None) -> str | None:
    """``--flame`` as given, or 'demo' when the user gave none and the result was made with the demo head."""
    if flame is None and (record.model.get("is_demo") or record.model.get("name") == DEMO_HEAD_NAME):
        return "demo"
    return flame


def render_beside(result_dir: Path, source: str | Path, head: HeadModel, single_image: bool, progress: bool = True) -> RenderSummary:
    """``track``/``refine``/``batch --render``: the overlay of a result just written, beside it
    (``overlay.mp4``, or ``overlay.png`` for a single image), replacing an earlier one."""
    out = Path(result_dir) / (OVERLAY_IMAGE if single_image else OVERLAY_VIDEO)
    return render_result(result_dir, out, RenderOptions(video=Path(source), overwrite=True, progress=progress), head)


def render_result(result_dir: Path, out: Path, options: RenderOptions | None = None, head: HeadModel | None = None) -> RenderSummary:
    """Render a track, refine or live-session folder into ``out`` (FILE.mp4, FILE.png or a folder).

    ``head`` is the model the result was fitted with (checked against the recorded checksum); None loads it
    as ``options.flame`` and ``options.models_dir`` say. User mistakes raise UserError before the model loads.
    """
    started = time.perf_counter()
    options = options or RenderOptions()
    out = Path(out)
    if options.style not in STYLES:
        raise UserError(f"--style {options.style}: choose one of {', '.join(STYLES)}")
    kind = check_output(out, options.overwrite)
    record = read_fit(Path(result_dir), options.video)
    if options.appearance is not None:
        record.appearance, record.light = borrowed_appearance(options.appearance, record.model.get("checksum"))
    against = _compared_fit(record, options)
    if kind == "image" and options.stop_frame != options.first_frame + 1 and record.n_frames != 1:
        raise UserError(f"--out {out} holds one picture: pass --frames N:N+1 for frame N, or give FILE.mp4 or a folder")
    if record.frames is None and options.style != "mesh":
        raise UserError(f"{record.frames_origin}; pass the input's frames with --video PATH (or use --style mesh)")
    if head is None:
        from engine.model_files import resolve_models_dir
        from engine.model_selection import select_head_model

        head = select_head_model(_flame_choice(record, options.flame), resolve_models_dir(options.models_dir))
    check_tracked_with(Path(result_dir), record.model.get("checksum"), *_sizes(record), head)
    frames = record.frames or _grey_frames(record)
    n_input = record.n_frames if record.frames is None else None
    stop = options.stop_frame
    if against is not None:
        check_tracked_with(options.against, against.model.get("checksum"), *_sizes(against), head)
    composer = FrameComposer(head, record, options, against)
    writer = _open_writer(out, kind, record, options, composer.output_size())
    written = rendered = 0
    complete = False
    try:
        bar = tqdm(desc="render", unit="frame", total=_expected_frames(record, options, n_input), disable=not options.progress)
        for index, image in enumerate(frames()):
            if stop is not None and index >= stop:
                break
            if index < options.first_frame:
                continue
            picture, valid = composer.compose(index, image)
            writer.write(index, picture)
            written += 1
            rendered += int(valid)
            bar.update(1)
        bar.close()
        complete = written > 0
    finally:
        writer.close(complete)
    if written == 0:
        raise UserError(f"no frame of {record.frames_origin} lies in --frames {options.first_frame}:{'' if stop is None else stop}")
    return RenderSummary(out, written, rendered, time.perf_counter() - started)


def _grey_frames(record: FitRecord) -> Callable[[], Iterator[np.ndarray]]:
    height, width = record.image_size
    count = record.n_frames or (max(record.params) + 1)

    def frames() -> Iterator[np.ndarray]:
        for _ in range(count):
            yield grey_canvas(height, width)

    return frames


def _expected_frames(record: FitRecord, options: RenderOptions, n_input: int | None) -> int | None:
    total = n_input or record.n_frames
    if total is None:
        return None
    stop = total if options.stop_frame is None else min(total, options.stop_frame)
    return max(stop - options.first_frame, 0)


def _compared_fit(record: FitRecord, options: RenderOptions) -> FitRecord | None:
    """``--against``'s result for ``--style compare``, drawn with the same texture and light as ``record``
    (which takes the refinement's appearance when it has none of its own); None for the other styles."""
    if (options.style == "compare") != (options.against is not None):
        raise UserError("--style compare and --against OTHER_DIR go together: compare this result with another of the same input")
    if options.against is None:
        return None
    against = read_fit(Path(options.against), options.video)
    if against.model.get("checksum") != record.model.get("checksum"):
        raise UserError(f"--against {options.against} was fitted with another model than {record.directory}; compare fits of one model")
    if against.image_size != record.image_size:
        raise UserError(f"--against {options.against} was fitted on frames of another size than {record.directory}; compare fits of one input")
    if record.appearance is None:
        record.appearance = against.appearance
    if record.appearance is None:
        raise UserError("--style compare draws both fits with a refinement's texture and light: compare with a refine "
                        "folder, or pass --appearance REFINE_DIR")  # fmt: skip
    record.observed = record.observed or against.observed
    return against


def _sizes(record: FitRecord) -> tuple[int, int]:
    """(identity, expression) coefficients per frame of a result."""
    any_frame = next(iter(record.params.values()))
    return any_frame["shape"].shape[1], any_frame["exp"].shape[1]


def _open_writer(out: Path, kind: str, record: FitRecord, options: RenderOptions, size: tuple[int, int]) -> _Mp4Writer | _PngWriter:
    if kind == "folder" and out.is_dir() and options.overwrite:
        # Only frames a render wrote go: the folder may hold other things of the user's.
        for old in out.glob("[0-9]" * 6 + IMAGE_SUFFIX):
            old.unlink()
    if kind != "video":
        return _PngWriter(out, single=kind == "image")
    return _Mp4Writer(out, size, record.fps or 25.0, options.crf)


def parse_frame_range(text: str) -> tuple[int, int | None]:
    """``A:B`` (frames A..B-1), ``A:`` or ``:B``; frame numbers of the input, from 0."""
    start, separator, stop = text.partition(":")
    try:
        first = int(start) if start else 0
        last = int(stop) if stop else None
    except ValueError:
        first, last = -1, None
    if not separator or first < 0 or (last is not None and last <= first):
        raise UserError(f"--frames {text}: expected A:B with 0 <= A < B (frames A..B-1), A: or :B")
    return first, last
