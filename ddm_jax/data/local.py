"""A user's own images as a dataset: "folder:PATH" (PNG/JPEG files) or "npz:PATH" (integer arrays).

Both are read into host memory as integer arrays and go through the same
`DatasetSpec`, `load_split` and batching code as TFDS data; they are
unlabelled. Nothing is ever written next to the user's files.

Folder ("folder:/path/to/images"). Images are the files ending in .png, .jpg or
.jpeg (any case) under the folder, found recursively (hidden files and folders,
whose names start with ".", are skipped; links to folders are not followed),
in sorted path order. If the folder has subfolders train/ and test/, they are
the splits; otherwise all its images are split automatically (below). Pixels
are 8-bit (vocabulary 256). Images in mode L (grayscale) or RGB are read as
they are; mode 1 (bilevel) is read as L with values 0 and 255 and mode P
(palette) as RGB; any other mode (RGBA, 16-bit, CMYK, ...) is an error. If
every image is grayscale the dataset has 1 channel; otherwise it has 3, and
grayscale images are replicated into R, G and B. Without `image_size`, every
image must have the same size; with `image_size=(H, W)`, each image is resized
to H x W with PIL's BOX filter (area resize: each output pixel is the mean of
the input pixels under it), ignoring its aspect ratio.

npz ("npz:/path/to/file.npz", written by `numpy.savez`). Either an array
"images" (or "image") of all examples, split automatically, or arrays "train"
and "test"; each an integer array [N, H, W, C] ([N, H, W] is read as C = 1).
An optional integer scalar "vocab_size" gives the number of pixel values; it
defaults to 256 for uint8 arrays and is required for other integer types. All
values must lie in [0, vocab_size). Images are uint8 when vocab_size <= 256,
int32 otherwise.

Automatic split: the N examples are permuted with
`numpy.random.default_rng(0)`; the last max(1, N // 10) of the permutation are
"test", the others "train", and each split keeps the examples' sorted (folder)
or stored (npz) order.

Errors raise `ddm_jax.checks.ArgumentError` for the argument "dataset", whose
value is the dataset name or, when one file is at fault, that file's path.
"""

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ddm_jax.checks import ArgumentError, check, is_int

FOLDER_PREFIX = "folder:"
NPZ_PREFIX = "npz:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_SEED = 0
TEST_FRACTION_DENOMINATOR = 10  # An automatic split holds out 1 / 10 of the examples.
# Each accepted PIL mode and the mode it is read in: "L" (1 channel) or "RGB" (3 channels).
READ_MODES = {"1": "L", "L": "L", "P": "RGB", "RGB": "RGB"}
_PIXEL_VOCAB_SIZE = 256


class LocalDataset(NamedTuple):
    """What the pipeline's DatasetSpec records of a local dataset."""

    image_shape: tuple[int, int, int]
    vocab_size: int
    split_sizes: dict[str, int]


def is_local(name: str) -> bool:
    """Whether dataset `name` names local data ("folder:PATH" or "npz:PATH") rather than a TFDS dataset."""
    return name.startswith((FOLDER_PREFIX, NPZ_PREFIX))


def describe(name: str, image_size: tuple[int, int] | None = None) -> LocalDataset:
    """Shape, vocabulary and split sizes of local dataset `name`, after checking all of it.

    A folder's images are checked from their headers (size and mode), not decoded;
    an npz file is read whole.

    Args:
      name: "folder:PATH" or "npz:PATH".
      image_size: (H, W) to resize a folder's images to, or None to read them at their size.

    Returns:
      The dataset's image shape (H, W, C), vocabulary size and number of examples per split.
    """
    check_image_size(name, image_size)
    if name.startswith(FOLDER_PREFIX):
        files, image_shape = _folder_layout(name, image_size)
        return LocalDataset(image_shape, _PIXEL_VOCAB_SIZE, {split: len(paths) for split, paths in files.items()})
    splits, vocab_size = _read_npz(name)
    image_shape = next(iter(splits.values())).shape[1:]
    return LocalDataset(image_shape, vocab_size, {split: len(images) for split, images in splits.items()})


def read_split(name: str, split: str, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The images [n, H, W, C] of `split` of local dataset `name`, in the order described above.

    Args:
      name: "folder:PATH" or "npz:PATH".
      split: "train" or "test".
      image_size: as for `describe`.

    Returns:
      Integers in [0, vocab_size), of dtype `image_dtype(vocab_size)`.
    """
    check_image_size(name, image_size)
    if name.startswith(FOLDER_PREFIX):
        files, image_shape = _folder_layout(name, image_size)
        images = np.empty((len(files[split]), *image_shape), np.uint8)
        for index, path in enumerate(files[split]):
            images[index] = _decode(path, image_shape)
        return images
    return _read_npz(name)[0][split]


def image_dtype(vocab_size: int) -> np.dtype:
    """uint8 for vocabularies of up to 256 values, int32 beyond."""
    return np.dtype(np.uint8 if vocab_size <= _PIXEL_VOCAB_SIZE else np.int32)


def split_indices(num_examples: int) -> dict[str, np.ndarray]:
    """The automatic split of `num_examples` >= 2 examples: sorted indices of "train" and "test"."""
    order = np.random.default_rng(SPLIT_SEED).permutation(num_examples)
    num_test = max(1, num_examples // TEST_FRACTION_DENOMINATOR)
    return {"train": np.sort(order[:-num_test]), "test": np.sort(order[-num_test:])}


def check_image_size(name: str, image_size: tuple[int, int] | None) -> None:
    """`image_size` is None, or for a "folder:" dataset `name` a pair (H, W) of positive integers."""
    if image_size is None:
        return
    check(name.startswith(FOLDER_PREFIX), "image_size", image_size, "None: only 'folder:' datasets are resized")
    ok = isinstance(image_size, (tuple, list)) and len(image_size) == 2
    check(
        ok and all(is_int(n) and n >= 1 for n in image_size),
        "image_size",
        image_size,
        "None or (height, width), two positive integers",
    )


# Folders -----------------------------------------------------------------------------------------


def _folder_layout(name: str, image_size: tuple[int, int] | None) -> tuple[dict[str, list[Path]], tuple[int, int, int]]:
    """The image files of each split of folder dataset `name`, and the (H, W, C) they are read as."""
    files = _folder_splits(name)
    return files, _folder_image_shape(name, [path for paths in files.values() for path in paths], image_size)


def _folder_splits(name: str) -> dict[str, list[Path]]:
    """The image files of each split of folder dataset `name`, sorted."""
    folder = Path(name.removeprefix(FOLDER_PREFIX)).expanduser()
    check(folder.is_dir(), "dataset", name, f"a folder of PNG or JPEG images; {folder} is not a folder")
    split_folders = {split: folder / split for split in ("train", "test")}
    present = [split for split, path in split_folders.items() if path.is_dir()]
    if len(present) == 1:
        raise ArgumentError(
            "dataset", name, f"subfolders train/ and test/ (the splits) or neither; {folder} has only {present[0]}/"
        )
    if present:
        files = {split: _image_files(path) for split, path in split_folders.items()}
        for split, paths in files.items():
            check(bool(paths), "dataset", str(split_folders[split]), "a folder with PNG or JPEG images; it has none")
        return files
    paths = _image_files(folder)
    check(len(paths) >= 2, "dataset", str(folder), f"a folder with at least 2 PNG or JPEG images; it has {len(paths)}")
    return {split: [paths[i] for i in indices] for split, indices in split_indices(len(paths)).items()}


def _image_files(folder: Path) -> list[Path]:
    """The PNG and JPEG files under `folder`, recursively, sorted; hidden entries skipped."""
    paths = []
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        paths += [
            Path(root) / name for name in files if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)
        ]
    return sorted(paths)


def _folder_image_shape(name: str, paths: list[Path], image_size: tuple[int, int] | None) -> tuple[int, int, int]:
    """(H, W, C) of the images at `paths`: checks modes and, without `image_size`, that sizes agree."""
    headers = [_header(path) for path in paths]
    channels = 3 if any(mode == "RGB" for _, mode in headers) else 1
    if image_size is not None:
        return (int(image_size[0]), int(image_size[1]), channels)
    first_size = headers[0][0]
    for path, (size, _) in zip(paths, headers, strict=True):
        if size != first_size:
            raise ArgumentError(
                "dataset",
                name,
                f"images of one size, or image_size=(height, width) to resize them to; {paths[0]} is "
                f"{first_size[0]}x{first_size[1]} and {path} is {size[0]}x{size[1]} (height x width)",
            )
    return (*first_size, channels)


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """((height, width), read mode) of an image file, from its header."""
    with _opened_image(path) as image:
        size, mode = (image.height, image.width), image.mode
    check(
        mode in READ_MODES,
        "dataset",
        str(path),
        f"an image in mode L or RGB (modes 1 and P are converted to them); it is in mode {mode}",
    )
    return size, READ_MODES[mode]


def _decode(path: Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """The image at `path` as uint8 [H, W, C], converted to C channels and resized to H x W if it differs."""
    height, width, channels = image_shape
    with _opened_image(path) as image:
        try:
            converted = image.convert("RGB" if channels == 3 else "L")
        except OSError as error:  # Truncated or corrupt image data, found when decoding.
            raise ArgumentError("dataset", str(path), f"a PNG or JPEG image that PIL can decode ({error})") from error
    if converted.size != (width, height):
        converted = converted.resize((width, height), Image.Resampling.BOX)
    return np.asarray(converted).reshape(image_shape)


def _opened_image(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except OSError as error:
        raise ArgumentError("dataset", str(path), f"a PNG or JPEG image that PIL can read ({error})") from error


# npz files ---------------------------------------------------------------------------------------


def _read_npz(name: str) -> tuple[dict[str, np.ndarray], int]:
    """The checked image arrays of each split of npz dataset `name`, and its vocabulary size."""
    path = Path(name.removeprefix(NPZ_PREFIX)).expanduser()
    check(path.is_file(), "dataset", name, f"an npz file of images; {path} is not a file")
    arrays = _npz_arrays(path)
    image_keys = [key for key in ("images", "image") if key in arrays]
    split_keys = [key for key in ("train", "test") if key in arrays]
    if not ((len(image_keys) == 1 and not split_keys) or (not image_keys and len(split_keys) == 2)):
        raise ArgumentError(
            "dataset",
            str(path),
            "an npz file with either an array 'images' (or 'image'), or arrays 'train' and 'test', and "
            f"optionally 'vocab_size'; it has {sorted(arrays)}",
        )
    vocab_size = _npz_vocab_size(path, arrays, image_keys + split_keys)
    images = {key: _checked_images(path, key, arrays[key], vocab_size) for key in image_keys + split_keys}
    if image_keys:
        all_images = images[image_keys[0]]
        check(len(all_images) >= 2, "dataset", str(path), "at least 2 images, to split them into train and test")
        splits = {split: all_images[indices] for split, indices in split_indices(len(all_images)).items()}
    else:
        splits = images
        shapes = {key: array.shape[1:] for key, array in splits.items()}
        check(
            shapes["train"] == shapes["test"],
            "dataset",
            str(path),
            f"'train' and 'test' images of one shape; they have shapes {shapes}",
        )
    return splits, vocab_size


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        contents = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ArgumentError("dataset", str(path), f"an npz file written by numpy.savez ({error})") from error
    if not isinstance(contents, np.lib.npyio.NpzFile):
        raise ArgumentError("dataset", str(path), "an npz file written by numpy.savez; it is a single .npy array")
    with contents:
        try:
            return {key: contents[key] for key in contents.files}
        except (OSError, ValueError) as error:
            raise ArgumentError("dataset", str(path), f"an npz file numpy can read ({error})") from error


def _npz_vocab_size(path: Path, arrays: dict[str, np.ndarray], image_keys: list[str]) -> int:
    if "vocab_size" in arrays:
        vocab_size = arrays["vocab_size"]
        ok = vocab_size.shape == () and np.issubdtype(vocab_size.dtype, np.integer) and 2 <= vocab_size < 2**31
        check(ok, "dataset", str(path), f"'vocab_size' to be an integer scalar in [2, 2**31); it is {vocab_size!r}")
        return int(vocab_size)
    dtypes = sorted({arrays[key].dtype.name for key in image_keys})
    check(
        dtypes == ["uint8"],
        "dataset",
        str(path),
        f"a 'vocab_size' entry, since its images are {dtypes}, not uint8 (for which it defaults to 256)",
    )
    return _PIXEL_VOCAB_SIZE


def _checked_images(path: Path, key: str, images: np.ndarray, vocab_size: int) -> np.ndarray:
    """`images` as [N, H, W, C] of `image_dtype(vocab_size)`, after checking their type, shape and values."""
    check(
        np.issubdtype(images.dtype, np.integer) and images.ndim in (3, 4) and images.size > 0,
        "dataset",
        str(path),
        f"{key!r} to be a non-empty integer array [N, H, W, C] or [N, H, W]; it is {images.dtype.name} {images.shape}",
    )
    low, high = images.min(), images.max()
    if low < 0 or high >= vocab_size:
        value = low if low < 0 else high
        raise ArgumentError("dataset", str(path), f"values in [0, {vocab_size}) in {key!r}; it holds {value}")
    images = images.astype(image_dtype(vocab_size), copy=False)
    return images if images.ndim == 4 else images[..., np.newaxis]
