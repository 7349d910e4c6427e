"""The render job on real clips and on synthetic ground truth: frame count, size and rate, the mesh on the face
and nowhere else (and a misplaced camera caught), edges within a pixel of the true mesh, sessions, refined
results, and bad input in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from engine.atomic import write_npz_atomic
from engine.camera import FLIP
from engine.flame import FlameLayer, rodrigues
from engine.frames import FrameParams
from engine.model_selection import select_head_model
from engine.overlay import BACKGROUND_RGB, Painted, difference_picture, photometric_error
from engine.synthetic import SyntheticMotion, synthetic_sequence
from engine.tracker import Tracker, TrackerConfig
from offline.render_job import PANEL_SIZES, RenderOptions, render_result
from offline.track_job import LANDMARKS_FILE, LandmarkSequence, frame_path, load_landmark_file
from realtime.sources import iter_frames

REPO = Path(__file__).resolve().parents[1]
GRID_CLIP = "bbaf2n.mpg"  # 75 frames, 360x288, 25 fps, a frontal speaker
#: Rows at the top and bottom that hold the frame number and the "demo head" label.
LABEL_ROWS = 24
#: An RGB difference above this (any channel) is a drawn pixel, not H.264 noise.
CHANGED = 40


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_stream.py"), *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def decoded(path: Path) -> tuple[list[np.ndarray], float]:
    with av.open(str(path)) as container:
        rate = float(container.streams.video[0].average_rate)
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)], rate


def face_hull_mask(points: np.ndarray, shape: tuple[int, int], grow_px: int = 0) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    finite = points[np.isfinite(points).all(axis=1)]
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(finite).astype(np.int32)), 1)
    if grow_px:
        mask = cv2.dilate(mask, np.ones((2 * grow_px + 1, 2 * grow_px + 1), np.uint8))
    return mask.astype(bool)


def mesh_on_face(rendered: list[np.ndarray], inputs: list[np.ndarray], landmarks: np.ndarray) -> tuple[float, float]:
    """(share of face pixels the render changed, share of pixels away from the face it changed), over all frames.

    The face is the hull of MediaPipe's landmarks, not the mesh: a misplaced mesh changes pixels outside it.
    """
    inside = outside = inside_total = outside_total = 0
    for image, original, points in zip(rendered, inputs, landmarks):
        changed = (np.abs(image.astype(int) - original.astype(int)).max(axis=2) > CHANGED)
        changed[:LABEL_ROWS] = changed[-LABEL_ROWS:] = False
        face = face_hull_mask(points, changed.shape)
        away = ~face_hull_mask(points, changed.shape, grow_px=6)
        away[:LABEL_ROWS] = away[-LABEL_ROWS:] = False
        inside += int((changed & face).sum())
        inside_total += int(face.sum())
        outside += int((changed & away).sum())
        outside_total += int(away.sum())
    return inside / inside_total, outside / outside_total


def moved_copy(result_dir: Path, out: Path, metres: float) -> Path:
    """A copy of a track folder with every frame's head moved sideways by ``metres``."""
    shutil.copytree(result_dir, out)
    for path in out.glob("[0-9]" * 6 + ".npz"):
        with np.load(path) as saved:
            arrays = {key: saved[key] for key in saved.files}
        arrays["cam"][0, 3] += metres
        np.savez(path, **arrays)
    return out


@pytest.fixture(scope="module")
def demo_head(landmarker_task: Path):
    return select_head_model("demo", landmarker_task.parent)


@pytest.fixture(scope="module")
def tracked_clip(shared_clips: Path, landmarker_task: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LandmarkSequence]:
    """``track --render`` of the GRID clip: the result folder (with overlay.mp4) and its landmarks."""
    out = tmp_path_factory.mktemp("render") / "track"
    result = run_cli("track", str(shared_clips / GRID_CLIP), "--out", str(out), "--render", "--models", str(landmarker_task.parent))
    assert result.returncode == 0, result.stderr[-2000:]
    return out, load_landmark_file(out / LANDMARKS_FILE)


@pytest.fixture(scope="module")
def clip_frames(shared_clips: Path) -> list[np.ndarray]:
    return [frame.image for frame in iter_frames(str(shared_clips / GRID_CLIP))]


def test_track_render_video_has_every_input_frame_at_the_input_size_and_rate_with_the_mesh_on_the_face(tracked_clip, clip_frames) -> None:
    track_dir, sequence = tracked_clip
    frames, rate = decoded(track_dir / "overlay.mp4")
    assert len(frames) == len(clip_frames) == 75
    assert frames[0].shape == clip_frames[0].shape == (288, 360, 3) and rate == 25.0
    inside, outside = mesh_on_face(frames, clip_frames, sequence.mp478)
    print(f"face pixels changed {inside:.1%}, pixels away from the face changed {outside:.3%}")
    assert inside > 0.6, f"the mesh covers only {inside:.0%} of the face"
    assert outside < 0.002, f"{outside:.2%} of the pixels away from the face changed"


def test_a_misplaced_camera_is_caught(tracked_clip, clip_frames, demo_head, tmp_path: Path) -> None:
    track_dir, sequence = tracked_clip
    shifted = moved_copy(track_dir, tmp_path / "shifted", 0.03)  # 3 cm to the side: about 20 px at this distance
    render_result(shifted, tmp_path / "shifted.mp4", RenderOptions(progress=False), demo_head)
    frames, _ = decoded(tmp_path / "shifted.mp4")
    inside, outside = mesh_on_face(frames, clip_frames, sequence.mp478)
    print(f"shifted: face pixels changed {inside:.1%}, pixels away from the face changed {outside:.3%}")
    assert outside > 0.01, f"a mesh 3 cm off the face changed only {outside:.2%} of the pixels away from it"


def test_side_by_side_with_landmarks_and_a_frame_range(tracked_clip, clip_frames, demo_head, tmp_path: Path) -> None:
    track_dir, _ = tracked_clip
    out = tmp_path / "frames"
    summary = render_result(track_dir, out, RenderOptions(style="side", landmarks=True, first_frame=10, stop_frame=13, progress=False), demo_head)
    assert summary.frames == 3 and sorted(p.name for p in out.iterdir()) == ["000010.png", "000011.png", "000012.png"]
    picture = cv2.cvtColor(cv2.imread(str(out / "000011.png")), cv2.COLOR_BGR2RGB)
    assert picture.shape == (288, 720, 3)
    left, right = picture[:, :360], picture[:, 360:]
    assert np.abs(left.astype(int) - clip_frames[11].astype(int)).max() <= 2  # PNG: the input itself
    magenta = (right[..., 0] > 200) & (right[..., 1] < 100) & (right[..., 2] > 160)
    green = (right[..., 1] > 200) & (right[..., 0] < 100) & (right[..., 2] < 100)
    assert magenta.sum() > 50 and green.sum() > 50


def test_invalid_frames_show_the_input_with_a_marker_and_no_mesh(tracked_clip, clip_frames, demo_head, tmp_path: Path) -> None:
    track_dir, sequence = tracked_clip
    lost = tmp_path / "lost"
    shutil.copytree(track_dir, lost)
    with np.load(lost / "000020.npz") as saved:
        arrays = {key: saved[key] for key in saved.files}
    arrays["valid"][0] = False
    np.savez(lost / "000020.npz", **arrays)
    summary = render_result(lost, tmp_path / "lost_frames", RenderOptions(first_frame=19, stop_frame=21, progress=False), demo_head)
    assert summary.rendered_frames == 1
    image = cv2.cvtColor(cv2.imread(str(tmp_path / "lost_frames" / "000020.png")), cv2.COLOR_BGR2RGB)
    face = face_hull_mask(sequence.mp478[20], image.shape[:2])
    assert np.abs(image[face].astype(int) - clip_frames[20][face].astype(int)).max() <= 2  # no stale mesh
    border = image[:, -1]
    assert (border[:, 0] > 200).all() and (border[:, 1] < 80).all()  # a red border


def test_synthetic_ground_truth_renders_within_a_pixel_of_the_projected_true_mesh(demo_head, tmp_path: Path) -> None:
    size = (320, 320)
    tracker = Tracker(demo_head, size, TrackerConfig(fov_deg=30.0, fit_fov=False, dtype=torch.float64))
    truth = synthetic_sequence(tracker.rig.layer, SyntheticMotion(frames=4, image_size=size, seed=3))
    tracker.adopt_identity(torch.as_tensor(truth.shape))
    results = []
    for index in range(4):
        params = FrameParams(torch.as_tensor(truth.exp[index : index + 1]), rodrigues(torch.as_tensor(truth.pose[index : index + 1])),
                             torch.as_tensor(truth.transl[index : index + 1]))  # fmt: skip
        results.append(tracker.rig.reference_arrays(tracker.frame_from(params)))
    # The true parameters as a track result (see README, "Offline output"): frames and meta.json, no video.
    (tmp_path / "truth").mkdir()
    for index, arrays in enumerate(results):
        write_npz_atomic(frame_path(tmp_path / "truth", index), arrays)
    meta = {"format": "flame-live tracking", "format_version": 1, "source": "synthetic.npz", "fps": truth.fps, "frames": 4,
            "model": {"name": demo_head.name, "is_demo": True, "checksum": demo_head.checksum},
            "image_size": {"height": size[0], "width": size[1]}}  # fmt: skip
    (tmp_path / "truth" / "meta.json").write_text(json.dumps(meta))
    render_result(tmp_path / "truth", tmp_path / "mesh", RenderOptions(style="mesh", progress=False), demo_head)

    layer = FlameLayer(demo_head, tracker.rig.layer.n_shape, tracker.rig.layer.n_exp, dtype=torch.float64)
    K = tracker.rig.camera.intrinsics()
    for index in range(4):
        with torch.no_grad():
            vertices = layer.vertices(torch.as_tensor(truth.shape)[None], torch.as_tensor(truth.exp[index : index + 1]),
                                      torch.as_tensor(truth.pose[index : index + 1]), torch.as_tensor(truth.transl[index : index + 1]))  # fmt: skip
        projected = (vertices[0].numpy() * FLIP) @ K.T
        pixels = projected[:, :2] / projected[:, 2:] - 0.5  # OpenCV draws with pixel centres on integers
        expected = np.zeros(size, np.uint8)
        for triangle in np.round(pixels[demo_head.faces] * 16).astype(np.int32):  # one by one: fillPoly would XOR overlaps
            cv2.fillConvexPoly(expected, triangle, 1, lineType=cv2.LINE_8, shift=4)
        image = cv2.cvtColor(cv2.imread(str(tmp_path / "mesh" / f"{index:06d}.png")), cv2.COLOR_BGR2RGB)
        drawn = (np.abs(image.astype(int) - np.array(BACKGROUND_RGB)).max(axis=2) > 0).astype(np.uint8)
        drawn[:LABEL_ROWS] = drawn[-LABEL_ROWS:] = 0
        assert edge_distance(drawn, expected) <= 1.0
        assert edge_distance(drawn, np.roll(expected, 2, axis=1)) > 1.0  # the check sees a 2 px shift


def edge_distance(drawn: np.ndarray, expected: np.ndarray) -> float:
    """The largest distance (px) from an edge pixel of one silhouette to the nearest edge pixel of the other."""

    def edges(mask: np.ndarray) -> np.ndarray:
        return mask.astype(bool) & ~cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)

    def farthest(a: np.ndarray, b: np.ndarray) -> float:
        distance_to_b = cv2.distanceTransform((~b).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return float(distance_to_b[a].max())

    drawn_edges, expected_edges = edges(drawn), edges(expected)
    return max(farthest(drawn_edges, expected_edges), farthest(expected_edges, drawn_edges))


# ---------------------------------------------------------------------------------------------------------------
# A live recording, its refinement, and the command line


@pytest.fixture(scope="module")
def session(shared_clips: Path, landmarker_task: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("session") / "session"
    result = run_cli("live", "--source", str(shared_clips / GRID_CLIP), "--as-fast-as-possible", "--no-zmq", "--landmarks",
                     "--record", str(directory), "--models", str(landmarker_task.parent))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return directory


def test_a_recorded_session_renders_every_video_frame(session: Path, demo_head, tmp_path: Path) -> None:
    from flame_client.messages import TOPIC_FRAME
    from realtime.session import SessionReader

    reader = SessionReader(session)
    video_frames = sum(1 for _ in reader.video_frames())
    valid = sum(1 for record in reader.messages() if record.topic == TOPIC_FRAME and record.message["valid"])
    summary = render_result(session, tmp_path / "session.mp4", RenderOptions(landmarks=True, progress=False), demo_head)
    frames, rate = decoded(tmp_path / "session.mp4")
    assert summary.frames == len(frames) == video_frames and summary.rendered_frames == valid > 0.9 * video_frames
    assert frames[0].shape == (288, 360, 3) and rate == 25.0


@pytest.fixture(scope="module")
def refined(session: Path, landmarker_task: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``refine --render`` of the recorded session, into a folder outside it (quick settings)."""
    out = tmp_path_factory.mktemp("refined") / "refined"
    result = run_cli("refine", str(session), "--out", str(out), "--size", "64", "--iterations", "1", "--render",
                     "--models", str(landmarker_task.parent))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_refine_render_draws_the_textured_head_and_side_shows_three_panels(session: Path, refined: Path, landmarker_task: Path,
                                                                          demo_head, tmp_path: Path) -> None:
    frames, _ = decoded(refined / "overlay.mp4")
    assert len(frames) == json.loads((refined / "meta.json").read_text())["frames"]
    # refine --out elsewhere than SESSION_DIR/refined: its result does not say where the video is.
    result = run_cli("render", str(refined), "--out", str(tmp_path / "side.png"), "--style", "side", "--frames", "40:41",
                     "--video", str(session / "video.mkv"), "--models", str(landmarker_task.parent))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    side = cv2.cvtColor(cv2.imread(str(tmp_path / "side.png")), cv2.COLOR_BGR2RGB)
    assert side.shape == (288, 3 * 360, 3)
    textured = side[LABEL_ROWS:-LABEL_ROWS, 360:720]
    head = np.abs(textured.astype(int) - np.array(BACKGROUND_RGB)).max(axis=2) > 0
    assert 0.05 < head.mean() < 0.6  # the textured head alone, on grey
    assert textured[head].std() > 10  # shaded and textured, not a flat colour
    # The live fit drawn with the refinement's texture and light: the same three panels, its own geometry.
    borrowed = render_result(session, tmp_path / "live.png", RenderOptions(style="side", first_frame=40, stop_frame=41,
                                                                          appearance=refined, progress=False), demo_head)
    assert borrowed.rendered_frames == 1
    live = cv2.cvtColor(cv2.imread(str(tmp_path / "live.png")), cv2.COLOR_BGR2RGB)
    assert live.shape == side.shape
    live_head = np.abs(live[LABEL_ROWS:-LABEL_ROWS, 360:720].astype(int) - np.array(BACKGROUND_RGB)).max(axis=2) > 0
    assert live[LABEL_ROWS:-LABEL_ROWS, 360:720][live_head].std() > 10
    assert (live_head != head).mean() < 0.02  # both fits cover the same face, give or take its outline


def panel(picture: np.ndarray, row: int, column: int, zoom: str = "face") -> np.ndarray:
    """One panel of a ``compare`` picture, without the label lines at its top."""
    width, height = PANEL_SIZES[zoom]
    return picture[row * height + 3 * LABEL_ROWS : (row + 1) * height, column * width : (column + 1) * width]


def test_compare_shows_where_the_better_fit_has_the_lower_photometric_error(tracked_clip, refined: Path, demo_head,
                                                                            tmp_path: Path) -> None:
    """The track fit against a copy moved 1 cm sideways (about 7 px), both with the refinement's texture and light:
    the moved fit's error is higher, and the difference map is blue (the track fit lower) almost everywhere it is
    coloured."""
    track_dir, _ = tracked_clip
    moved = moved_copy(track_dir, tmp_path / "moved", 0.01)
    out = tmp_path / "compare.png"
    options = RenderOptions(style="compare", against=moved, appearance=refined, first_frame=40, stop_frame=41, progress=False)
    assert render_result(track_dir, out, options, demo_head).rendered_frames == 1
    picture = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB).astype(int)
    assert picture.shape == (2 * 256, 3 * 256, 3)
    difference = panel(picture, 1, 0)
    blue = (difference[..., 2] > difference[..., 0] + 40).sum()
    orange = (difference[..., 0] > difference[..., 2] + 40).sum()
    print(f"difference map: {blue} blue, {orange} orange pixels")
    assert blue > 1000 and blue > 5 * orange

    def mask_brightness(error_panel: np.ndarray) -> float:  # inferno pixels (the face mask); outside it is grey
        colored = error_panel.max(axis=2) - error_panel.min(axis=2) > 20
        return float(error_panel[colored].sum(axis=1).mean())

    assert mask_brightness(panel(picture, 1, 1)) > 1.3 * mask_brightness(panel(picture, 1, 2))  # moved | track
    # The track fit over the input: textured face pixels in the middle of the panel, the frame around them.
    assert np.abs(panel(picture, 0, 2).astype(int) - panel(picture, 0, 0).astype(int)).max(axis=2).mean() > 5

    options = replace(options, zoom="mouth", against=track_dir)
    render_result(track_dir, tmp_path / "mouth.png", replace(options, overwrite=True), demo_head)
    mouth = cv2.cvtColor(cv2.imread(str(tmp_path / "mouth.png")), cv2.COLOR_BGR2RGB).astype(int)
    assert mouth.shape == (2 * 200, 3 * 300, 3)
    same = panel(mouth, 1, 0, "mouth")  # one fit against itself: no difference anywhere
    assert (same.max(axis=2) - same.min(axis=2)).max() == 0
    assert np.array_equal(panel(mouth, 1, 1, "mouth"), panel(mouth, 1, 2, "mouth"))


def test_photometric_error_counts_uncovered_face_pixels_against_black() -> None:
    image = np.full((20, 30, 3), 100, np.uint8)
    painted = Painted(np.full((10, 10, 3), 150, np.uint8), np.ones((10, 10), bool), (5, 5, 15, 15))
    mask = np.zeros((20, 30), bool)
    mask[:, :20] = True
    error = photometric_error(image, painted, mask)
    assert np.allclose(error[10, 10], 50 / 255) and np.allclose(error[2, 2], 100 / 255) and error[10, 25] == 0
    lower = difference_picture(error, error * 0.5, mask, image)
    assert lower[10, 10, 2] > lower[10, 10, 0]  # the second lower: blue
    assert tuple(lower[10, 25]) == (33, 33, 33)  # outside the mask: the image dimmed


@pytest.fixture(scope="module")
def cli_errors(tracked_clip, landmarker_task: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Each kind of bad input, as its own `render` process, all at once (they spend most of their time starting)."""
    track_dir, _ = tracked_clip
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty").mkdir()
    moved = folder / "moved"
    moved.mkdir()
    shutil.copy(track_dir / "000000.npz", moved)
    meta = json.loads((track_dir / "meta.json").read_text())
    (moved / "meta.json").write_text(json.dumps({**meta, "source": str(folder / "gone" / "clip.mpg")}))
    (folder / "taken.mp4").write_bytes(b"a video of the user's")
    models = ["--models", str(landmarker_task.parent)]
    cases = {
        "no_meta": ["render", str(folder / "empty"), "--out", str(folder / "a.mp4")],
        "no_video": ["render", str(moved), "--out", str(folder / "b.mp4")],
        "exists": ["render", str(track_dir), "--out", str(folder / "taken.mp4")],
        "frames": ["render", str(track_dir), "--out", str(folder / "c.mp4"), "--frames", "5:2"],
        "picture": ["render", str(track_dir), "--out", str(folder / "one.png")],
        "appearance": ["render", str(track_dir), "--out", str(folder / "d.mp4"), "--appearance", str(track_dir)],
        "compare_alone": ["render", str(track_dir), "--out", str(folder / "e.mp4"), "--style", "compare"],
        "zoom_alone": ["render", str(track_dir), "--out", str(folder / "z.mp4"), "--zoom", "mouth"],
        "compare_untextured": ["render", str(track_dir), "--out", str(folder / "f.mp4"), "--style", "compare", "--against", str(track_dir)],
    }
    processes = {
        name: subprocess.Popen([sys.executable, str(REPO / "run_stream.py"), *args, *models], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
        for name, args in cases.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert (folder / "taken.mp4").read_bytes() == b"a video of the user's"
    return results


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no_meta", "holds neither meta.json"),
        ("no_video", "gone/clip.mpg (recorded in"),
        ("exists", "already exists; pass --overwrite"),
        ("frames", "--frames 5:2: expected A:B"),
        ("picture", "holds one picture: pass --frames N:N+1"),
        ("appearance", "not a refine output folder"),
        ("compare_alone", "--style compare and --against OTHER_DIR go together"),
        ("zoom_alone", "--zoom crops the panels of --style compare"),
        ("compare_untextured", "draws both fits with a refinement's texture and light"),
    ],
)
def test_bad_input_is_one_clear_line(cli_errors: dict, case: str, expected: str) -> None:
    result = cli_errors[case]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    if case == "no_video":
        assert "--video PATH" in errors[0]
