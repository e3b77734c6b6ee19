"""Sample images for display: integer data to uint8, tiled grids scaled up for the screen, PNG files."""

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
            f"(vocab_size = {vocab_size})"
        )
    return np.round(k.astype(np.float64) * 255.0 / (vocab_size - 1)).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] row by row into [rows*(H+pad)+pad, ncols*(W+pad)+pad, C].

    ncols defaults to ceil(sqrt(N)); padding and empty cells are 0 (black).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(
            f"image_grid: expected a non-empty uint8 array [N, H, W, C], got {images.dtype} of shape {images.shape}"
        )
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    if ncols < 1 or pad < 0:
        raise ValueError(f"image_grid: expected ncols >= 1 and pad >= 0, got ncols={ncols}, pad={pad}")
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
    for i, image in enumerate(images):
        top = pad + (i // ncols) * (h + pad)
        left = pad + (i % ncols) * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes a uint8 image [H, W, C] (C = 1: grayscale "L", 3: "RGB", 4: "RGBA") as PNG."""
    image = np.asarray(image)
    if image.ndim != 3 or image.dtype != np.uint8 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"save_png({os.fspath(path)!r}): expected a uint8 image [H, W, 1|3|4], got "
            f"{image.dtype} of shape {image.shape}"
        )
    # A 2-D uint8 array becomes mode "L".
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")


DISPLAY_SIDE = 256  # pixels: grids of small images are scaled up towards this size


def upscale_nearest(image: np.ndarray, target_side: int = DISPLAY_SIDE) -> np.ndarray:
    """image [H, W, C] repeated f times along each axis, f = max(1, round(target_side / max(H, W))),
    so a grid of 8x8 digits is not 8 pixels per digit on screen. Nearest neighbour: no new values."""
    factor = max(1, round(target_side / max(image.shape[:2])))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def sample_grid(k: np.ndarray, vocab_size: int) -> np.ndarray:
    """Integer samples [N, H, W, C] as one uint8 grid image for display (PNG, TensorBoard)."""
    return upscale_nearest(image_grid(to_uint8(k, vocab_size)))


def save_samples(stem: str | os.PathLike, k: np.ndarray, vocab_size: int) -> dict[str, str]:
    """Writes integer samples as `stem`.png (their grid, scaled up) and `stem`.npz (the integers and
    vocab_size); returns both paths. Creates the parent directory."""
    stem = os.fspath(stem)
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    save_png(f"{stem}.png", sample_grid(k, vocab_size))
    np.savez(f"{stem}.npz", samples=np.asarray(k), vocab_size=vocab_size)
    return {"png": f"{stem}.png", "npz": f"{stem}.npz"}
