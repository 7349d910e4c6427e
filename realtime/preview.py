"""The optional --preview window: the tracked image with MediaPipe's landmarks and the frame rate.

OpenCV's window must be driven from the thread that created it (macOS insists on the main thread), so
the live loop calls :meth:`PreviewWindow.show` itself; the window is never needed for anything else.
"""

from __future__ import annotations

import os
import sys

import cv2
import numpy as np

from engine.errors import UserError

_TRACKED_BGR = (80, 220, 80)
_LOST_BGR = (60, 60, 230)
_CLOSE_KEYS = frozenset({27, ord("q")})  # Esc, q


def _require_display() -> None:
    # Without a display, Qt aborts the whole process instead of raising, so check before opening a window.
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise UserError("--preview needs a display, but none is available ($DISPLAY is not set); run without --preview")


class PreviewWindow:
    """One OpenCV window; show() returns False once the user closed it or pressed q or Esc."""

    def __init__(self, title: str = "flame-live (q to quit)") -> None:
        _require_display()
        self._title = title
        try:
            cv2.namedWindow(title, cv2.WINDOW_NORMAL)
        except cv2.error as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else "no GUI support"
            raise UserError(f"--preview cannot open a window ({reason}); run without --preview") from None

    def show(self, image_rgb: np.ndarray, landmarks: np.ndarray | None, tracked: bool, fps: float) -> bool:
        canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)  # a copy: the image itself is shared with the recorder
        color = _TRACKED_BGR if tracked else _LOST_BGR
        if landmarks is not None:
            for x, y in np.round(landmarks).astype(np.int32):
                cv2.circle(canvas, (int(x), int(y)), 1, color, -1, cv2.LINE_AA)
        label = f"{fps:.1f} fps" + ("" if tracked else "  no face")
        cv2.putText(canvas, label, (10, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, color, 2, cv2.LINE_AA)
        cv2.imshow(self._title, canvas)
        key = cv2.waitKey(1) & 0xFF
        return key not in _CLOSE_KEYS and cv2.getWindowProperty(self._title, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        cv2.destroyWindow(self._title)
        cv2.waitKey(1)  # lets the GUI event loop actually remove the window

    def __enter__(self) -> PreviewWindow:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
