"""The head rig (engine/rig.py) and its camera: identities built apart and swapped whole, the focal length kept in
pixels, the field of view's one range check, and "estimate the FOV" as a flag of its own, which `refine` keeps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.assets import load_flame
from engine.camera import FOV_RANGE_DEG, Camera, focal_from_fov
from engine.errors import UserError
from engine.frames import params_row
from engine.rig import HeadRig
from engine.synthetic import SyntheticMotion, synthetic_sequence
from engine.tracker import Tracker, TrackerConfig
from offline.refine_job import refine_session


@pytest.fixture(scope="module")
def flame_head(flame_dir: Path):
    return load_flame(flame_dir, n_shape=20, n_exp=10)


def test_a_camera_keeps_its_focal_length_in_pixels() -> None:
    camera = Camera.from_fov(640, 480, 50.0)
    assert camera.focal == focal_from_fov(50.0, 480) and camera.fov_deg == pytest.approx(50.0, abs=1e-12)
    assert camera.with_focal(612.5).focal == 612.5, "a calibrated focal length is kept as it is, not via degrees"
    np.testing.assert_array_equal(camera.intrinsics(), [[camera.focal, 0, 320], [0, camera.focal, 240], [0, 0, 1]])


@pytest.mark.parametrize("fov", [FOV_RANGE_DEG[0] - 1, FOV_RANGE_DEG[1] + 1, float("nan")])
def test_a_field_of_view_out_of_range_is_refused_in_one_line(fov: float) -> None:
    with pytest.raises(UserError, match="must be between 5 and 150 degrees"):
        Camera.from_fov(640, 480, fov)


def test_a_given_field_of_view_is_reported_as_given(flame_head) -> None:
    """30 degrees at 480 px does not survive degrees -> pixels -> degrees exactly; frames and files still say 30."""
    assert Camera.from_fov(640, 480, 30.0).fov_deg != 30.0
    tracker = Tracker(flame_head, (480, 640), TrackerConfig(n_shape=20, n_exp=10, fov_deg=30.0, fit_fov=False))
    assert tracker.track(None).fov_deg == 30.0 and tracker.fov_report()["deg"] == 30.0


def test_a_fixed_field_of_view_must_be_given(flame_head) -> None:
    with pytest.raises(UserError, match="must be given"):
        Tracker(flame_head, (480, 640), TrackerConfig(n_shape=20, n_exp=10, fit_fov=False))


def test_a_given_field_of_view_is_a_first_guess_when_it_is_estimated(flame_head) -> None:
    """fov_deg with fit_fov: calibration estimates the focal length from the frames, wherever it starts."""
    estimates = []
    for first_guess in (None, 70.0):
        tracker = Tracker(flame_head, (512, 512), TrackerConfig(n_shape=20, n_exp=10, fov_deg=first_guess))
        sequence = synthetic_sequence(tracker.rig.layer, SyntheticMotion(frames=20, seed=4, max_yaw_deg=35.0))
        assert tracker.rig.camera.fov_deg == pytest.approx(first_guess or 50.0) and tracker.fov_source == "default"
        tracker.calibrate([(sequence.mp478[i], sequence.lmk68[i]) for i in range(0, 20, 3)])
        assert tracker.fov_source == "estimated"
        estimates.append(tracker.rig.camera.fov_deg)
    assert abs(estimates[1] - sequence.camera.fov_deg) < 10.0, "the estimate left the guess of 70 degrees"
    assert estimates[1] == pytest.approx(estimates[0], abs=3.0)  # the start moves the estimate a little, not far


def test_an_identity_is_built_apart_and_swapped_in_whole(flame_head) -> None:
    rig = HeadRig(flame_head, Camera.from_fov(512, 512, 40.0), 20, 10)
    shape = torch.linspace(-1.0, 1.0, 20, dtype=torch.float64)  # another dtype: the rig converts it
    prepared = rig.identity_for(shape, rig.camera.with_focal(700.0))
    assert torch.equal(rig.shape, torch.zeros(20)) and rig.camera.focal != 700.0, "preparing changes nothing"
    rig.use(prepared)
    assert rig.shape.dtype == torch.float32 and torch.allclose(rig.shape, shape.float())
    assert float(rig.focal) == pytest.approx(700.0) and rig.fixed_landmarks is prepared.landmarks


def test_a_frame_goes_through_the_reference_format_with_the_rig_s_model(flame_head) -> None:
    """The rig supplies what the conversions need (identity, K, root joint): a tracked frame's reference arrays
    give the solver back the parameters it fitted, and its landmarks where the fit put them."""
    tracker = Tracker(flame_head, (512, 512), TrackerConfig(n_shape=20, n_exp=10, fov_deg=40.0, fit_fov=False))
    rig = tracker.rig
    sequence = synthetic_sequence(rig.layer, SyntheticMotion(frames=3, seed=5))
    frame = tracker.track(sequence.mp478[2], sequence.lmk68[2], timestamp=0.0)
    arrays = rig.reference_arrays(frame)
    np.testing.assert_allclose(arrays["K"][0], rig.camera.intrinsics(), rtol=1e-6)
    params = rig.params_from_reference(arrays)
    exp, pose, transl = params_row(params)
    np.testing.assert_allclose(exp, frame.exp, atol=1e-6)
    np.testing.assert_allclose(pose, frame.pose, atol=2e-6)
    np.testing.assert_allclose(transl, frame.transl, atol=2e-6)
    with torch.no_grad():
        direct = rig.landmark_pixels(rig.params_from_frames([frame]))
        np.testing.assert_allclose(rig.landmark_pixels(params).numpy(), direct.numpy(), atol=1e-3)


class _Stop(Exception):
    """Ends refine_session once it has asked for its tracker: only the camera it asks for is tested here."""


@pytest.mark.parametrize("source", ["estimated", "given"])
def test_refine_estimates_a_field_of_view_the_live_run_estimated(recorded_session: Path, tmp_path: Path, source: str) -> None:
    """A session's estimated FOV is not passed on as a known one (which would switch estimation off)."""
    session = tmp_path / "session"
    shutil.copytree(recorded_session, session)
    written = json.loads((session / "session.json").read_text())
    metadata = written["metadata"]
    metadata["camera"]["fov"]["source"] = source
    metadata["fov_fixed"] = source == "given"
    (session / "session.json").write_text(json.dumps(written))
    asked = []

    def tracker_factory(image_size: tuple[int, int], n_shape: int, n_exp: int, known_fov_deg: float | None) -> Tracker:
        asked.append(known_fov_deg)
        raise _Stop

    with pytest.raises(_Stop):
        refine_session(session, tracker_factory, tmp_path / "out", None, progress=False)
    assert asked == [None if source == "estimated" else pytest.approx(metadata["camera"]["fov_deg"])]
