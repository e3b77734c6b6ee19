"""Tests of ddm_jax.data.augment: the dihedral augmentation and its conditioning."""

import numpy as np
import pytest

from ddm_jax.data import AUGMENT_COND_DIM, augment_batch, check_augment, identity_cond
from ddm_jax.data.augment import dihedral_elements, dihedral_transform


def _asymmetric_images(num: int, size: int = 5, channels: int = 2) -> np.ndarray:
    """Images with distinct pixels, so that the 8 transforms of each are distinct."""
    pixels = np.arange(num * size * size * channels) % 251
    return pixels.reshape(num, size, size, channels).astype(np.uint8)


def _expected_transform(image: np.ndarray, element: int) -> np.ndarray:
    """Element e of an [H, W, C] image: horizontal flip if e >= 4, then e % 4 counter-clockwise turns."""
    flipped = np.flip(image, axis=1) if element >= 4 else image
    return np.rot90(flipped, k=element % 4)


def test_elements_are_flips_then_counter_clockwise_rotations():
    images = _asymmetric_images(3)
    size = images.shape[1]
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    # Pixel formulas: a counter-clockwise turn maps out[i, j] = in[j, n-1-i]; a flip out[i, j] = in[i, n-1-j].
    np.testing.assert_array_equal(dihedral_transform(images, 0), images)
    np.testing.assert_array_equal(dihedral_transform(images, 1), images[:, j, size - 1 - i])
    np.testing.assert_array_equal(dihedral_transform(images, 4), images[:, i, size - 1 - j])
    for element in range(8):
        expected = np.stack([_expected_transform(image, element) for image in images])
        np.testing.assert_array_equal(dihedral_transform(images, element), expected)


def test_the_eight_elements_are_distinct():
    image = _asymmetric_images(1)
    transformed = {dihedral_transform(image, element).tobytes() for element in range(8)}
    assert len(transformed) == 8 == AUGMENT_COND_DIM["dihedral"]


def test_cond_is_the_one_hot_of_the_transform_applied_to_each_row():
    images = np.repeat(_asymmetric_images(1), 256, axis=0)
    labels = np.arange(256, dtype=np.int32)
    batch = augment_batch(
        {"image": images, "label": labels}, "dihedral", seed=3, step=11, first_row=0, global_batch_size=256
    )
    cond = batch["cond"]
    assert cond.shape == (256, 8) and cond.dtype == np.float32
    np.testing.assert_array_equal(cond.sum(axis=1), 1.0)
    assert set(np.unique(cond)) == {0.0, 1.0}
    elements = cond.argmax(axis=1)
    for row, element in enumerate(elements):
        np.testing.assert_array_equal(batch["image"][row], _expected_transform(images[0], element))
    np.testing.assert_array_equal(batch["label"], labels)
    assert batch["image"].dtype == images.dtype
    counts = np.bincount(elements, minlength=8)
    assert counts.min() >= 12 and counts.max() <= 60  # about 32 each under a uniform draw.


def test_draws_are_a_function_of_seed_and_step():
    first = dihedral_elements(seed=0, step=5, global_batch_size=64)
    np.testing.assert_array_equal(first, dihedral_elements(seed=0, step=5, global_batch_size=64))
    assert not np.array_equal(first, dihedral_elements(seed=0, step=6, global_batch_size=64))
    assert not np.array_equal(first, dihedral_elements(seed=1, step=5, global_batch_size=64))


def test_rows_of_a_process_are_its_slice_of_the_global_batch():
    images = _asymmetric_images(12)
    kwargs = dict(seed=2, step=7, global_batch_size=12)
    whole = augment_batch({"image": images}, "dihedral", first_row=0, **kwargs)
    parts = [augment_batch({"image": images[row : row + 4]}, "dihedral", first_row=row, **kwargs) for row in (0, 4, 8)]
    for key in ("image", "cond"):
        np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])


def test_non_square_images_are_refused():
    with pytest.raises(ValueError, match=r"augment='dihedral': expected None for images of shape \(8, 6, 1\).*square"):
        check_augment("dihedral", (8, 6, 1))
    with pytest.raises(ValueError, match=r"square"):
        augment_batch(
            {"image": np.zeros((2, 8, 6, 1), np.uint8)},
            "dihedral",
            seed=0,
            step=0,
            first_row=0,
            global_batch_size=2,
        )


def test_unknown_augmentation_names_the_field():
    with pytest.raises(
        ValueError, match=r"augment='mixup': expected None \(no augmentation\) or one of \['dihedral'\]"
    ):
        check_augment("mixup", (8, 8, 1))
    with pytest.raises(ValueError, match=r"augment='mixup'"):
        identity_cond(4, "mixup")


def test_identity_cond():
    assert identity_cond(4, None) is None
    cond = identity_cond(4, "dihedral")
    expected = np.zeros((4, 8), np.float32)
    expected[:, 0] = 1.0
    np.testing.assert_array_equal(cond, expected)
    assert cond.dtype == np.float32
