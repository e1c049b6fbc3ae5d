"""Sketch (edge-map) conditioning: the sketch of a video, as the ``sketch`` task's condition is made.

A sketch frame is the Canny edge map of the lightly blurred grayscale frame, drawn as black lines on white, the same
for every run (no randomness, fixed thresholds). ``magvit.prep.sketch`` writes the sketch videos of a manifest with
it, ``magvit.prep.tokenize`` tokenizes the sketch of clips that have none, ``magvit.generate`` sketches a ``--cond``
video.
"""

from __future__ import annotations

import numpy as np
import torch
from .video_io import to_float, to_uint8

#: Canny hysteresis thresholds on 8-bit gradients and the Gaussian blur applied first (pixels)
CANNY_LOW = 50
CANNY_HIGH = 150
BLUR_SIGMA = 1.0


def sketch_frames(frames: np.ndarray | torch.Tensor, low: int = CANNY_LOW, high: int = CANNY_HIGH,
                  blur_sigma: float = BLUR_SIGMA) -> np.ndarray:
    """uint8 ``(T, H, W, 3)`` RGB -> uint8 ``(T, H, W, 3)`` sketch: black (0) edges on white (255)."""
    import cv2

    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    out = np.empty_like(frames)
    for t, frame in enumerate(frames):
        gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        if blur_sigma > 0:
            gray = cv2.GaussianBlur(gray, (0, 0), blur_sigma)
        edges = cv2.Canny(gray, low, high, L2gradient=True)  # (H, W) 0 / 255
        out[t] = (255 - edges)[..., None]
    return out


def sketch_video(video: torch.Tensor, low: int = CANNY_LOW, high: int = CANNY_HIGH,
                 blur_sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Float ``(3, T, H, W)`` or ``(B, 3, T, H, W)`` in [-1, 1] -> sketch of the same shape in {-1, 1}.

    Edges are -1 (black) on +1 (white), identical in the three channels; deterministic.
    """
    if not isinstance(video, torch.Tensor) or video.dim() not in (4, 5) or video.shape[-4] != 3:
        raise ValueError(f"expected a float video (3, T, H, W) or (B, 3, T, H, W), got "
                         f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
    if video.dim() == 5:
        return torch.stack([sketch_video(v, low, high, blur_sigma) for v in video])
    sketch = torch.from_numpy(sketch_frames(to_uint8(video), low, high, blur_sigma))  # (T, H, W, 3)
    return to_float(sketch).to(device=video.device, dtype=video.dtype)
