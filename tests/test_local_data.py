"""Tests of a user's own data through the input pipeline: "folder:PATH" and "npz:PATH"."""

import itertools
import os

import numpy as np
import pytest
from PIL import Image

from ddm_jax import data
from ddm_jax.checks import ArgumentError

HEIGHT, WIDTH = 5, 6


def _random_images(seed: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def _save(path, pixels: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)


def _listing(root) -> list[tuple[str, int]]:
    """Every file under `root` with its size: what the pipeline must never change."""
    return sorted(
        (os.path.relpath(os.path.join(folder, name), root), os.path.getsize(os.path.join(folder, name)))
        for folder, _, files in os.walk(root)
        for name in files
    )


def _expected_split(num_examples: int) -> dict[str, np.ndarray]:
    """The documented automatic split: the last max(1, n // 10) of default_rng(0)'s permutation are test."""
    order = np.random.default_rng(0).permutation(num_examples)
    num_test = max(1, num_examples // 10)
    return {"train": np.sort(order[:-num_test]), "test": np.sort(order[-num_test:])}


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, count))


# Folders ----------------------------------------------------------------------------------------


@pytest.fixture
def gray_folder(tmp_path):
    """23 grayscale PNGs in two subfolders, in sorted order, plus files that are not images of the dataset."""
    images = _random_images(0, 23, (HEIGHT, WIDTH))
    for index, pixels in enumerate(images):
        suffix = ".PNG" if index == 3 else ".png"  # Suffixes are matched in any case.
        _save(tmp_path / f"part{index // 12}" / f"image_{index:02d}{suffix}", pixels)
    _save(tmp_path / ".hidden.png", images[0])
    _save(tmp_path / ".cache" / "thumbnail.png", images[0])
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path, images


def test_folder_with_automatic_split(gray_folder):
    folder, images = gray_folder
    before = _listing(folder)
    name = f"folder:{folder}"
    spec = data.dataset_spec(name)
    assert spec == data.DatasetSpec(
        name=name,
        image_shape=(HEIGHT, WIDTH, 1),
        vocab_size=256,
        num_classes=None,
        split_sizes={"train": 21, "test": 2},
    )
    splits = {split: data.load_split(spec, split) for split in ("train", "test")}
    for split, indices in _expected_split(23).items():
        assert set(splits[split]) == {"image"} and splits[split]["image"].dtype == np.uint8
        np.testing.assert_array_equal(splits[split]["image"], images[indices][..., np.newaxis])
    np.testing.assert_array_equal(data.load_split(name, "test")["image"], splits["test"]["image"])  # Deterministic.
    assert _listing(folder) == before


def test_the_automatic_split_is_disjoint_and_complete():
    for num_examples in (2, 9, 10, 11, 1000):
        splits = data.local.split_indices(num_examples)
        assert len(splits["test"]) == max(1, num_examples // 10)
        np.testing.assert_array_equal(np.sort(np.concatenate(list(splits.values()))), np.arange(num_examples))


@pytest.fixture
def mixed_folder(tmp_path):
    """train/: RGB and grayscale PNGs, and a palette PNG; test/: RGB JPEGs."""
    rgb = _random_images(1, 3, (HEIGHT, WIDTH, 3))
    gray = _random_images(2, 2, (HEIGHT, WIDTH))
    smooth = np.broadcast_to(np.linspace(0, 255, WIDTH, dtype=np.uint8)[None, :, None], (HEIGHT, WIDTH, 3)).copy()
    for index, pixels in enumerate(rgb):
        _save(tmp_path / "train" / f"a{index}.png", pixels)
    for index, pixels in enumerate(gray):
        _save(tmp_path / "train" / f"b{index}.png", pixels)
    Image.fromarray(rgb[0]).quantize(colors=16).save(tmp_path / "train" / "c.png")
    for index in range(2):
        _save(tmp_path / "test" / "nested" / f"d{index}.jpg", smooth, quality=95)
    return tmp_path, rgb, gray, smooth


def test_folder_with_explicit_splits_and_mixed_modes(mixed_folder):
    folder, rgb, gray, smooth = mixed_folder
    spec = data.dataset_spec(f"folder:{folder}")
    assert (spec.image_shape, spec.split_sizes) == ((HEIGHT, WIDTH, 3), {"train": 6, "test": 2})
    train = data.load_split(spec, "train")["image"]
    np.testing.assert_array_equal(train[:3], rgb)
    np.testing.assert_array_equal(train[3:5], np.repeat(gray[..., np.newaxis], 3, axis=-1))  # Gray into R, G, B.
    with Image.open(folder / "train" / "c.png") as palette_image:
        assert palette_image.mode == "P"
        palette_pixels = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(train[5], palette_pixels)
    test = data.load_split(spec, "test")["image"]
    assert test.shape == (2, HEIGHT, WIDTH, 3)
    assert np.abs(test.astype(int) - smooth).max() <= 8  # JPEG is lossy; a smooth ramp survives closely.


def test_folder_images_resized_by_area(tmp_path):
    height, width = 4, 6
    target = _random_images(3, 1, (height, width))[0]
    _save(tmp_path / "a_small.png", target[:2, :3])  # Doubled: each pixel becomes a 2 x 2 block.
    _save(tmp_path / "b_blocks.png", np.kron(target, np.ones((3, 2), np.uint8)))  # 3 x 2 blocks, averaged back.
    random = _random_images(4, 1, (2 * height, 2 * width))[0]
    _save(tmp_path / "c_random.png", random)
    _save(tmp_path / "d_exact.png", target)  # Already the size: unchanged.
    spec = data.dataset_spec(f"folder:{tmp_path}", image_size=(height, width))
    assert (spec.image_shape, spec.image_size, spec.split_sizes) == (
        (height, width, 1),
        (height, width),
        {"train": 3, "test": 1},
    )
    images = np.concatenate([data.load_split(spec, split)["image"][..., 0] for split in ("train", "test")])
    small, from_blocks, from_random, exact = images[np.argsort(np.concatenate(list(_expected_split(4).values())))]
    np.testing.assert_array_equal(small, np.kron(target[:2, :3], np.ones((2, 2), np.uint8)))
    np.testing.assert_array_equal(from_blocks, target)
    area_means = random.reshape(height, 2, width, 2).mean(axis=(1, 3))
    assert np.abs(from_random - area_means).max() <= 1  # PIL's fixed-point rounding.
    np.testing.assert_array_equal(exact, target)


# npz files --------------------------------------------------------------------------------------


def test_npz_with_automatic_split(tmp_path):
    images = _random_images(5, 30, (HEIGHT, WIDTH, 3))
    np.savez(tmp_path / "images.npz", images=images)
    name = f"npz:{tmp_path / 'images.npz'}"
    spec = data.dataset_spec(name)
    assert (spec.image_shape, spec.vocab_size, spec.num_classes, spec.split_sizes) == (
        (HEIGHT, WIDTH, 3),
        256,
        None,
        {"train": 27, "test": 3},
    )
    for split, indices in _expected_split(30).items():
        np.testing.assert_array_equal(data.load_split(name, split)["image"], images[indices])


@pytest.mark.parametrize("vocab_size, dtype", [(17, np.uint8), (1024, np.int32)])
def test_npz_with_explicit_splits_and_vocab_size(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(6)
    train, test = rng.integers(0, vocab_size, (7, HEIGHT, WIDTH)), rng.integers(0, vocab_size, (3, HEIGHT, WIDTH))
    path = tmp_path / "splits.npz"
    np.savez(path, train=train, test=test, vocab_size=vocab_size)
    spec = data.dataset_spec(f"npz:{path}")
    assert (spec.image_shape, spec.vocab_size, spec.split_sizes) == (
        (HEIGHT, WIDTH, 1),
        vocab_size,
        {"train": 7, "test": 3},
    )
    for split, expected in (("train", train), ("test", test)):
        images = data.load_split(spec, split)["image"]
        assert images.dtype == dtype
        np.testing.assert_array_equal(images, expected[..., np.newaxis])


# Through the batching code ----------------------------------------------------------------------


def _dataset_names(tmp_path) -> dict[str, tuple[str, np.ndarray]]:
    """A folder and an npz file holding the same 20 grayscale images."""
    images = _random_images(7, 20, (HEIGHT, WIDTH))
    for index, pixels in enumerate(images):
        _save(tmp_path / "folder" / f"{index:02d}.png", pixels)
    np.savez(tmp_path / "images.npz", images=images[..., np.newaxis])
    return {"folder": f"folder:{tmp_path / 'folder'}", "npz": f"npz:{tmp_path / 'images.npz'}"}, images


@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_train_and_eval_batches(tmp_path, kind):
    names, images = _dataset_names(tmp_path)
    split = _expected_split(20)
    train_keys = {image.tobytes() for image in images[split["train"]][..., np.newaxis]}
    batches = _take(data.train_batches(names[kind], batch_size=6, seed=0), 6)  # Two epochs of 3 batches.
    for batch in batches:
        assert set(batch) == {"image"} and batch["image"].shape == (6, HEIGHT, WIDTH, 1)
        assert {image.tobytes() for image in batch["image"]} <= train_keys
    first_epoch = np.concatenate([b["image"] for b in batches[:3]])
    assert len({image.tobytes() for image in first_epoch}) == 18
    evaluation = list(data.eval_batches(names[kind], batch_size=4))
    assert len(evaluation) == 1 and evaluation[0]["mask"].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(evaluation[0]["image"][:2], images[split["test"]][..., np.newaxis])
    assert not evaluation[0]["image"][2:].any()


# Errors -----------------------------------------------------------------------------------------


def _raises(match: str):
    return pytest.raises(ArgumentError, match=match)


def test_unreadable_image_is_named(tmp_path):
    _save(tmp_path / "good.png", _random_images(0, 1, (HEIGHT, WIDTH))[0])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with _raises(rf"dataset='{tmp_path / 'bad.png'}': expected a PNG or JPEG image that PIL can read"):
        data.dataset_spec(f"folder:{tmp_path}")


def test_truncated_image_is_named_when_decoded(tmp_path):
    for index in range(2):
        _save(tmp_path / f"{index}.png", _random_images(index, 1, (64, 64))[0])
    truncated = tmp_path / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    spec = data.dataset_spec(f"folder:{tmp_path}")  # The header is intact.
    split = next(split for split, indices in _expected_split(2).items() if 1 in indices)
    with _raises(rf"dataset='{truncated}': expected a PNG or JPEG image that PIL can decode"):
        data.load_split(spec, split)


def test_mixed_sizes_without_image_size_name_both_files(tmp_path):
    _save(tmp_path / "a.png", np.zeros((4, 6), np.uint8))
    _save(tmp_path / "b.png", np.zeros((4, 6), np.uint8))
    _save(tmp_path / "c.png", np.zeros((5, 6), np.uint8))
    expected = (
        rf"dataset='folder:{tmp_path}': expected images of one size, or image_size=\(height, width\) to resize "
        rf"them to; {tmp_path / 'a.png'} is 4x6 and {tmp_path / 'c.png'} is 5x6 \(height x width\)"
    )
    with _raises(expected):
        data.dataset_spec(f"folder:{tmp_path}")


def test_unsupported_image_mode_is_named(tmp_path):
    _save(tmp_path / "a.png", np.zeros((4, 6, 3), np.uint8))
    _save(tmp_path / "b.png", np.zeros((4, 6, 4), np.uint8))
    with _raises(rf"dataset='{tmp_path / 'b.png'}': expected an image in mode L or RGB .* it is in mode RGBA"):
        data.dataset_spec(f"folder:{tmp_path}")


def test_folder_errors(tmp_path):
    with _raises(rf"dataset='folder:{tmp_path / 'missing'}': expected a folder of PNG or JPEG images"):
        data.dataset_spec(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with _raises(rf"dataset='{tmp_path / 'empty'}': expected a folder with at least 2 PNG or JPEG images; it has 0"):
        data.dataset_spec(f"folder:{tmp_path / 'empty'}")
    _save(tmp_path / "half" / "train" / "a.png", np.zeros((2, 2), np.uint8))
    with _raises(r"expected subfolders train/ and test/ \(the splits\) or neither; .* has only train/"):
        data.dataset_spec(f"folder:{tmp_path / 'half'}")
    (tmp_path / "half" / "test").mkdir()
    with _raises(rf"dataset='{tmp_path / 'half' / 'test'}': expected a folder with PNG or JPEG images; it has none"):
        data.dataset_spec(f"folder:{tmp_path / 'half'}")


def test_npz_errors(tmp_path):
    missing = tmp_path / "missing.npz"
    with _raises(rf"dataset='npz:{missing}': expected an npz file of images; {missing} is not a file"):
        data.dataset_spec(f"npz:{missing}")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with _raises(rf"dataset='{garbage}': expected an npz file written by numpy.savez"):
        data.dataset_spec(f"npz:{garbage}")
    cases = {
        "no_key.npz": (dict(pixels=np.zeros((3, 2, 2), np.uint8)), r"either an array 'images' .* it has \['pixels'\]"),
        "half.npz": (dict(train=np.zeros((3, 2, 2), np.uint8)), r"either an array 'images' .* it has \['train'\]"),
        "negative.npz": (
            dict(images=np.full((3, 2, 2), -2), vocab_size=256),
            r"values in \[0, 256\) in 'images'; it holds -2",
        ),
        "float.npz": (
            dict(train=np.zeros((3, 2, 2)), test=np.full((3, 2, 2), 17), vocab_size=17),
            r"'train' to be a non-empty integer array",
        ),
        "above.npz": (
            dict(train=np.zeros((3, 2, 2), int), test=np.full((3, 2, 2), 17), vocab_size=17),
            r"values in \[0, 17\) in 'test'; it holds 17",
        ),
        "int64.npz": (
            dict(images=np.zeros((3, 2, 2), np.int64)),
            r"a 'vocab_size' entry, since its images are \['int64'\]",
        ),
        "shapes.npz": (
            dict(train=np.zeros((3, 2, 2), np.uint8), test=np.zeros((3, 2, 3), np.uint8)),
            r"'train' and 'test' images of one shape",
        ),
    }
    for file_name, (arrays, message) in cases.items():
        np.savez(tmp_path / file_name, **arrays)
        with _raises(rf"dataset='{tmp_path / file_name}': expected .*{message}"):
            data.dataset_spec(f"npz:{tmp_path / file_name}")


def test_image_size_only_for_folders(tmp_path):
    np.savez(tmp_path / "images.npz", images=np.zeros((3, 2, 2), np.uint8))
    for name in (f"npz:{tmp_path / 'images.npz'}", "digits"):
        with _raises(r"image_size=\(2, 2\): expected None: only 'folder:' datasets are resized"):
            data.dataset_spec(name, str(tmp_path), image_size=(2, 2))
    with _raises(r"image_size=\(0, 2\): expected None or \(height, width\), two positive integers"):
        data.dataset_spec(f"folder:{tmp_path}", image_size=(0, 2))


def test_unknown_split_of_local_data(tmp_path):
    np.savez(tmp_path / "images.npz", images=np.zeros((3, 2, 2), np.uint8))
    with _raises(r"split='validation': expected one of the splits \['test', 'train'\]"):
        data.load_split(f"npz:{tmp_path / 'images.npz'}", "validation")
