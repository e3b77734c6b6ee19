"""Sample images for display: integer data to uint8, tiled grids, PNG files."""
import math
import os

import numpy as np
from PIL import Image


def to_uint8(k: np.ndarray, vocab_size: int) -> np.ndarray:
    """Integer data in [0, V) to uint8 display values round(k * 255 / (V - 1))."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size = {vocab_size}: expected at least 2 values to display")
    k = np.asarray(k)
    if k.size and (k.min() < 0 or k.max() >= vocab_size):
        raise ValueError(
            f"to_uint8: data range [{k.min()}, {k.max()}] lies outside [0, {vocab_size - 1}] "
            f"(vocab_size = {vocab_size})")
    return np.round(k.astype(np.float64) * 255.0 / (vocab_size - 1)).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] row by row into [rows*(H+pad)+pad, ncols*(W+pad)+pad, C].

    ncols defaults to ceil(sqrt(N)); padding and empty cells are 0 (black).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(
            f"image_grid: expected a non-empty uint8 array [N, H, W, C], got "
            f"{images.dtype} of shape {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    if ncols < 1 or pad < 0:
        raise ValueError(f"image_grid: expected ncols >= 1 and pad >= 0, got ncols={ncols}, pad={pad}")
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
    for i, image in enumerate(images):
        top = pad + (i // ncols) * (h + pad)
        left = pad + (i % ncols) * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes a uint8 image [H, W, C] (C = 1: grayscale "L", 3: "RGB", 4: "RGBA") as PNG."""
    image = np.asarray(image)
    if image.ndim != 3 or image.dtype != np.uint8 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"save_png({os.fspath(path)!r}): expected a uint8 image [H, W, 1|3|4], got "
            f"{image.dtype} of shape {image.shape}")
    # A 2-D uint8 array becomes mode "L".
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")
