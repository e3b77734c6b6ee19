"""The VDM paper's data augmentation: the 8 symmetries of a square image.

Kingma et al. (2021) train on randomly flipped and 90-degree-rotated images and
pass the transformation to the network as conditioning; conditioned on the
identity, the model stays a likelihood model of the un-augmented data.

Group element e in [0, 8) is a horizontal flip if e >= 4, followed by a
counter-clockwise rotation by 90 * (e % 4) degrees; e = 0 is the identity. The
conditioning of an example is the float32 one-hot of its element, width
AUGMENT_COND_DIM["dihedral"] = 8.

The elements of global batch `step` are drawn for all its rows at once from
`numpy.random.default_rng([seed, step, 1])` (the trailing 1 keeps this stream
apart from the input pipeline's epoch permutations, `default_rng([seed,
epoch])`); a process augments its rows of the global batch with their slice of
these draws, so augmented batches are a function of (seed, step, row) whatever
the number of processes or the step a run resumed at.
"""

import types
from collections.abc import Mapping, Sequence

import numpy as np

from ddm_jax.checks import check

Batch = dict[str, np.ndarray]

AUGMENT_COND_DIM: Mapping[str, int] = types.MappingProxyType({"dihedral": 8})

_AUGMENT_STREAM = 1


def check_augment(augment: str | None, image_shape: Sequence[int]) -> None:
    """Raises ArgumentError unless `augment` is None or a known augmentation of images of `image_shape`."""
    if augment is None:
        return
    _check_augment_name(augment)
    height, width = image_shape[:2]
    check(
        height == width,
        "augment",
        augment,
        f"None for images of shape {tuple(image_shape)}: {augment!r} rotates by 90 degrees, which needs square images",
    )


def dihedral_transform(images: np.ndarray, element: int) -> np.ndarray:
    """Group element `element` in [0, 8) applied to every image of [n, H, W, C]."""
    flipped = images[:, :, ::-1] if element >= 4 else images
    return np.rot90(flipped, k=element % 4, axes=(1, 2))


def dihedral_elements(seed: int, step: int, global_batch_size: int) -> np.ndarray:
    """The group elements, int64 [global_batch_size] in [0, 8), of the rows of global batch `step`."""
    rng = np.random.default_rng([seed, step, _AUGMENT_STREAM])
    return rng.integers(AUGMENT_COND_DIM["dihedral"], size=global_batch_size)


def augment_batch(batch: Batch, augment: str, *, seed: int, step: int, first_row: int, global_batch_size: int) -> Batch:
    """Rows [first_row, first_row + b) of global batch `step`, transformed, with their "cond" [b, 8].

    `batch["image"]` is [b, H, W, C]; the other entries pass through unchanged.
    """
    images = batch["image"]
    check_augment(augment, images.shape[1:])
    elements = dihedral_elements(seed, step, global_batch_size)[first_row : first_row + len(images)]
    transformed = np.empty_like(images)
    for element in range(AUGMENT_COND_DIM[augment]):
        rows = elements == element
        transformed[rows] = dihedral_transform(images[rows], element)
    return {**batch, "image": transformed, "cond": _one_hot(elements, AUGMENT_COND_DIM[augment])}


def identity_cond(batch_size: int, augment: str | None) -> np.ndarray | None:
    """Conditioning for un-augmented images (evaluation, sampling): one-hot identity [b, d], or None."""
    if augment is None:
        return None
    _check_augment_name(augment)
    return _one_hot(np.zeros(batch_size, np.int64), AUGMENT_COND_DIM[augment])


def _check_augment_name(augment: str) -> None:
    check(
        augment in AUGMENT_COND_DIM, "augment", augment, f"None (no augmentation) or one of {sorted(AUGMENT_COND_DIM)}"
    )


def _one_hot(indices: np.ndarray, depth: int) -> np.ndarray:
    return np.eye(depth, dtype=np.float32)[indices]
