"""A live matplotlib plot of the received parameters (``flame-client --plot``); matplotlib loads only here."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import numpy as np

from flame_client.messages import BLENDSHAPE_NAMES
from flame_client.rotations import head_rotation_from_frontal

logger = logging.getLogger(__name__)

_NON_INTERACTIVE_BACKENDS = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}
_PLOTTED_EXPRESSIONS = 5
_PLOTTED_BLENDSHAPES = ("jawOpen", "eyeBlinkLeft", "eyeBlinkRight", "mouthSmileLeft", "browInnerUp")


class ParameterPlot:
    """Scrolling curves of the head pose, the first expression coefficients and a few blendshapes."""

    def __init__(self, history: int = 300) -> None:
        import matplotlib.pyplot as plt

        self._plt = plt
        self._seq: deque[int] = deque(maxlen=history)
        self._rows: deque[np.ndarray] = deque(maxlen=history)
        self._blendshape_indices = [BLENDSHAPE_NAMES.index(name) for name in _PLOTTED_BLENDSHAPES]
        self._figure, axes = plt.subplots(4, 1, sharex=True, figsize=(8, 8))
        self._figure.canvas.manager.set_window_title("flame-client")
        groups = (
            ("head rotation from frontal (deg)", ["pitch (x)", "yaw (y)", "roll (z)"]),
            ("head position (m)", ["x", "y", "z"]),
            ("expression", [f"exp[{i}]" for i in range(_PLOTTED_EXPRESSIONS)]),
            ("blendshapes", list(_PLOTTED_BLENDSHAPES)),
        )
        self._lines = []
        for axis, (title, labels) in zip(axes, groups):
            axis.set_title(title, fontsize=9)
            self._lines.append([axis.plot([], [], label=label)[0] for label in labels])
            axis.legend(loc="upper left", fontsize=7)
        axes[-1].set_xlabel("frame")
        self._axes = axes
        self._figure.tight_layout()
        if plt.get_backend().lower() in _NON_INTERACTIVE_BACKENDS:
            logger.warning("matplotlib backend %r cannot open a window; --plot draws off-screen", plt.get_backend())
        else:
            plt.show(block=False)

    def add(self, frame_msg: dict[str, Any]) -> None:
        """Append one valid ``flame.frame`` message."""
        exp = frame_msg["exp"][:_PLOTTED_EXPRESSIONS]
        row = np.concatenate(
            [
                np.degrees(head_rotation_from_frontal(frame_msg["head_rot"])),
                frame_msg["head_trans"],
                np.pad(exp, (0, _PLOTTED_EXPRESSIONS - len(exp))),
                [frame_msg["blendshapes"][i] for i in self._blendshape_indices],
            ]
        )
        self._seq.append(frame_msg["seq"])
        self._rows.append(row)

    def refresh(self) -> bool:
        """Redraw; False once the user has closed the window."""
        if not self._plt.fignum_exists(self._figure.number):
            return False
        if self._rows:
            seq, rows = np.asarray(self._seq), np.vstack(self._rows)
            column = 0
            for axis, lines in zip(self._axes, self._lines):
                for line in lines:
                    line.set_data(seq, rows[:, column])
                    column += 1
                axis.relim()
                axis.autoscale_view()
        self._figure.canvas.draw_idle()
        self._figure.canvas.flush_events()
        return True
