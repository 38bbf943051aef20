"""Images to non-overlapping 16x16 patches in raster order (Gato section 2.1).

Pixels (uint8) are scaled to [-1, 1] and divided by sqrt(16) = 4, so patch values lie in
[-0.25, 0.25]. An image whose sides are not multiples of 16 is **padded** at the bottom and right
with 0 in the normalized space (mid-grey) up to the next multiple: every original pixel is kept,
and :func:`ImageTokenizer.num_patches` tells the padded count. The patch's place in the image is
carried as (row, col, n_rows, n_cols); :func:`patch_position_intervals` quantizes it into the
row/column intervals of Gato's within-image position encoding.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from gato_like.tokenizers.vocab import PATCH_PIXEL_DIVISOR, PATCH_POSITION_RESOLUTION, PATCH_SIZE


class ImageTokenizer:
    """uint8 images ``(H, W, C)`` or ``(H, W)`` to patches ``(N, C, P, P)`` float32, raster order."""

    def __init__(self, patch_size: int = PATCH_SIZE, pixel_divisor: float = PATCH_PIXEL_DIVISOR) -> None:
        if isinstance(patch_size, bool) or operator.index(patch_size) < 1:
            raise ValueError(f"patch_size: expected an integer >= 1, got {patch_size!r}")
        if not (math.isfinite(pixel_divisor) and pixel_divisor > 0):
            raise ValueError(f"pixel_divisor: expected a finite number > 0, got {pixel_divisor!r}")
        self.patch_size = int(patch_size)
        self.pixel_divisor = float(pixel_divisor)

    def __repr__(self) -> str:
        return f"ImageTokenizer(patch_size={self.patch_size}, pixel_divisor={self.pixel_divisor})"

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch rows and columns for an ``height x width`` image (after padding)."""
        return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)

    def num_patches(self, height: int, width: int) -> int:
        rows, cols = self.grid(height, width)
        return rows * cols

    def encode(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One image to its patches.

        Args:
            image: uint8 ``(H, W, C)`` or ``(H, W)`` (one channel).

        Returns:
            patches: float32 ``(N, C, P, P)``, N = ceil(H/P) * ceil(W/P), raster order.
            positions: int64 ``(N, 4)``: patch row, patch column, rows, columns.
        """
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise TypeError(f"ImageTokenizer.encode: expected a uint8 image, got dtype {image.dtype}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or min(image.shape) == 0:
            raise ValueError(
                f"ImageTokenizer.encode: expected shape (H, W, C) or (H, W) with non-zero sides, "
                f"got {image.shape}"
            )
        height, width, channels = image.shape
        rows, cols = self.grid(height, width)
        p = self.patch_size
        scaled = (image.astype(np.float32) * (2.0 / 255.0) - 1.0) / self.pixel_divisor
        if (rows * p, cols * p) != (height, width):
            padded = np.zeros((rows * p, cols * p, channels), dtype=np.float32)
            padded[:height, :width] = scaled
            scaled = padded
        # (rows*P, cols*P, C) -> (rows, P, cols, P, C) -> (rows, cols, C, P, P) -> (N, C, P, P)
        patches = scaled.reshape(rows, p, cols, p, channels).transpose(0, 2, 4, 1, 3)
        patches = np.ascontiguousarray(patches.reshape(rows * cols, channels, p, p))
        return patches, self.positions(height, width)

    def positions(self, height: int, width: int) -> np.ndarray:
        """int64 ``(N, 4)``: (patch row, patch column, rows, columns) of each patch, raster order."""
        rows, cols = self.grid(height, width)
        r, c = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
        return np.stack([r, c, np.full_like(r, rows), np.full_like(r, cols)], axis=1)

    def decode(self, patches: np.ndarray, height: int, width: int) -> np.ndarray:
        """Patches ``(N, C, P, P)`` back to the uint8 image ``(height, width, C)`` (padding removed)."""
        rows, cols = self.grid(height, width)
        p = self.patch_size
        patches = np.asarray(patches, dtype=np.float32)
        if patches.ndim != 4 or patches.shape[0] != rows * cols or patches.shape[2:] != (p, p):
            raise ValueError(
                f"ImageTokenizer.decode: expected patches of shape ({rows * cols}, C, {p}, {p}) "
                f"for a {height}x{width} image, got {patches.shape}"
            )
        channels = patches.shape[1]
        image = patches.reshape(rows, cols, channels, p, p).transpose(0, 3, 1, 4, 2)
        image = image.reshape(rows * p, cols * p, channels)[:height, :width]
        pixels = (image * self.pixel_divisor + 1.0) * (255.0 / 2.0)
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def patch_position_intervals(
    positions: np.ndarray, resolution: int = PATCH_POSITION_RESOLUTION
) -> np.ndarray:
    """Quantized row and column intervals of patches, for Gato's within-image position encoding.

    A patch at row ``r`` of ``R`` covers the normalized interval ``[r/R, (r+1)/R)``; quantized to
    ``resolution`` levels it becomes ``[floor(r/R * res), floor((r+1)/R * res))`` (at least one level
    wide). In training the model samples an index inside the interval; at evaluation it takes the
    interval's mean.

    Args:
        positions: int ``(N, 4)`` rows of (row, col, rows, cols) as :meth:`ImageTokenizer.encode` gives.

    Returns:
        int64 ``(N, 2, 2)``: ``[..., 0, :]`` row interval ``[start, stop)``, ``[..., 1, :]`` column interval.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if positions.ndim != 2 or positions.shape[1] != 4:
        raise ValueError(f"positions: expected shape (N, 4), got {positions.shape}")
    if resolution < 1:
        raise ValueError(f"resolution: expected >= 1, got {resolution}")
    where, counts = positions[:, :2], positions[:, 2:]
    bad = (counts < 1) | (where < 0) | (where >= counts)
    if bad.any():
        row = positions[np.argwhere(bad)[0][0]].tolist()
        raise ValueError(
            f"positions: expected rows (row, col, rows, cols) with 0 <= row < rows, 0 <= col < cols, got {row}"
        )
    out = np.empty((positions.shape[0], 2, 2), dtype=np.int64)
    for axis in (0, 1):
        i, n = positions[:, axis], positions[:, axis + 2]
        start = (i * resolution) // n
        stop = np.maximum(((i + 1) * resolution) // n, start + 1)
        out[:, axis, 0], out[:, axis, 1] = start, np.minimum(stop, resolution)
    return out
