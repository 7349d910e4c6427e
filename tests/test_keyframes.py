"""Keyframe selection (novel pose or expression only), into a queue that never blocks the live loop."""

from __future__ import annotations

import math
import threading

import numpy as np

from engine.frames import TrackedFrame
from engine.tracker import diversity_feature
from flame_client.rotations import (
    FRONTAL_QUATERNION,
    axis_angle_from_quaternion,
    head_rotation_from_frontal,
    quaternion_from_axis_angle,
    quaternion_multiply,
)
from realtime.keyframes import KeyframeConfig, KeyframeSelector
from realtime.sources import Frame

IMAGE = np.zeros((48, 64, 3), np.uint8)
LANDMARKS = np.zeros((478, 2))


def tracked(yaw_deg: float = 0.0, exp0: float = 0.0, valid: bool = True) -> TrackedFrame:
    """A fit whose head is turned by `yaw_deg` from facing the camera, with the first expression at `exp0`."""
    turn = quaternion_from_axis_angle(np.array([0.0, math.radians(yaw_deg), 0.0]))
    head_rot = axis_angle_from_quaternion(quaternion_multiply(FRONTAL_QUATERNION, turn))
    exp = np.zeros(20)
    exp[0] = exp0
    pose = np.zeros((5, 3))
    pose[0] = [0.0, math.radians(yaw_deg), 0.0]  # the same turn as the model's root rotation
    return TrackedFrame(
        valid=valid, exp=exp, pose=pose, transl=np.zeros(3), head_rot=head_rot,
        head_trans=np.array([0.0, 0.0, 0.6]), fov_deg=40.0, rms_px=1.0, iterations=3, fit_ms=1.0,
        calibrated=True, shape_version=1,
    )  # fmt: skip


def frame(index: int) -> Frame:
    return Frame(IMAGE, index, 1000.0 + index / 30, index / 30)


def offer_all(selector: KeyframeSelector, fits: list[TrackedFrame]) -> list[int]:
    return [index for index, fit in enumerate(fits) if selector.offer(frame(index), LANDMARKS, fit)]


def test_keyframes_are_told_apart_by_the_tracker_s_diversity_feature() -> None:
    fit = tracked(yaw_deg=20.0, exp0=1.0)
    np.testing.assert_allclose(fit.pose[0], head_rotation_from_frontal(fit.head_rot), atol=1e-12)  # a consistent fit
    selector = KeyframeSelector(KeyframeConfig(min_distance=0.3))
    assert offer_all(selector, [tracked(yaw_deg=0.0), tracked(yaw_deg=8.0), tracked(yaw_deg=10.0)]) == [0, 2]
    assert offer_all(selector, [tracked(exp0=0.9), tracked(exp0=1.1)]) == [1]
    np.testing.assert_allclose(diversity_feature(fit.pose, fit.exp)[:4], [0.0, 2 * math.radians(20.0), 0.0, 0.3])


def test_a_still_head_gives_one_keyframe_and_each_new_pose_or_expression_another() -> None:
    selector = KeyframeSelector(KeyframeConfig(min_distance=0.3, queue_size=16))
    still = [tracked(yaw_deg=0.2 * (i % 3)) for i in range(10)]
    assert offer_all(selector, still) == [0]
    # 20 degrees is novel, 22 is not (2 degrees from a kept one); 20 again later is not either.
    turns = [tracked(yaw_deg=20.0), tracked(yaw_deg=22.0), tracked(yaw_deg=-20.0), tracked(yaw_deg=20.0)]
    assert offer_all(selector, turns) == [0, 2]
    assert offer_all(selector, [tracked(exp0=1.5), tracked(exp0=1.6)]) == [0]
    assert selector.selected == 4 and len(selector.queue) == 4


def test_frames_without_a_face_never_become_keyframes() -> None:
    selector = KeyframeSelector()
    assert not selector.offer(frame(0), LANDMARKS, tracked(valid=False))
    assert not selector.offer(frame(1), None, tracked())
    assert selector.offer(frame(2), LANDMARKS, tracked())


def test_keyframe_carries_image_landmarks_fit_and_capture_time() -> None:
    selector = KeyframeSelector()
    fit = tracked(yaw_deg=5.0)
    selector.offer(frame(7), LANDMARKS, fit)
    keyframe = selector.queue.get(timeout=0)
    assert keyframe is not None
    assert keyframe.image is IMAGE and keyframe.landmarks is LANDMARKS and keyframe.tracked is fit
    assert keyframe.frame_index == 7 and keyframe.t_capture == frame(7).t_capture


def test_full_queue_drops_the_oldest_and_counts_it() -> None:
    selector = KeyframeSelector(KeyframeConfig(queue_size=2, min_distance=0.1))
    assert offer_all(selector, [tracked(yaw_deg=angle) for angle in (0, 10, 20, 30)]) == [0, 1, 2, 3]
    assert selector.queue.dropped == 2 and len(selector.queue) == 2
    assert [selector.queue.get(timeout=0).frame_index for _ in range(2)] == [2, 3]


def test_memory_forgets_the_oldest_feature() -> None:
    selector = KeyframeSelector(KeyframeConfig(memory=2, min_distance=0.1, queue_size=8))
    assert offer_all(selector, [tracked(yaw_deg=angle) for angle in (0, 10, 20, 0)]) == [0, 1, 2, 3]


def test_a_selected_keyframe_reaches_a_waiting_consumer() -> None:
    selector = KeyframeSelector()
    delivered = threading.Timer(0.05, lambda: selector.offer(frame(3), LANDMARKS, tracked()))
    delivered.start()
    assert selector.queue.get(timeout=5).frame_index == 3
