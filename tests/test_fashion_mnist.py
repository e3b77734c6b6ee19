"""Tests of the IDX reader and the offline Fashion-MNIST builder over Debian's files."""

import gzip
import os
import time

import numpy as np
import pytest

from ddm_jax import data
from ddm_jax.checks import ArgumentError
from ddm_jax.data import fashion_mnist

DEBIAN_FILES_ABSENT = bool(fashion_mnist.debian_files_missing(fashion_mnist.DEBIAN_DIR))
NEEDS_DEBIAN_FILES = pytest.mark.skipif(
    DEBIAN_FILES_ABSENT,
    reason=f"Debian's Fashion-MNIST files are not in {fashion_mnist.DEBIAN_DIR} "
    "(`apt-get install dataset-fashion-mnist` installs them)",
)


def _idx_bytes(type_code: int, big_endian_values: np.ndarray) -> bytes:
    """An IDX file written from its definition: 00 00, type, ndim, big-endian uint32 sizes, big-endian values."""
    sizes = b"".join(size.to_bytes(4, "big") for size in big_endian_values.shape)
    return bytes([0, 0, type_code, big_endian_values.ndim]) + sizes + big_endian_values.tobytes()


@pytest.mark.parametrize(
    "type_code, dtype",
    [(0x08, ">u1"), (0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")],
)
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_against_files_written_from_the_format(tmp_path, type_code, dtype, compress):
    offset = 0 if dtype == ">u1" else 120  # Negative values where the type has them.
    values = (np.arange(24).reshape(2, 3, 4) * 10 - offset).astype(dtype)
    contents = _idx_bytes(type_code, values)
    path = tmp_path / "values.idx"
    path.write_bytes(gzip.compress(contents) if compress else contents)
    array = fashion_mnist.read_idx(path)
    assert array.shape == (2, 3, 4) and array.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(array, values)


def test_read_idx_of_a_one_dimensional_file(tmp_path):
    path = tmp_path / "labels.idx"
    path.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes([3, 1, 4, 1, 5]))
    np.testing.assert_array_equal(fashion_mnist.read_idx(path), [3, 1, 4, 1, 5])


@pytest.mark.parametrize(
    "contents, message",
    [
        (
            b"\x01\x00\x08\x01" + (1).to_bytes(4, "big") + b"\x07",
            r"expected an IDX file, .* it starts with 01 00 08 01",
        ),
        (b"\x00\x00\x07\x01" + (1).to_bytes(4, "big") + b"\x07", r"it starts with 00 00 07 01"),
        (b"\x00\x00", r"it starts with 00 00$"),
        (b"\x00\x00\x08\x02" + (2).to_bytes(4, "big"), r"an IDX file of \d+ bytes \(a 12-byte header"),
        (
            b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02",
            r"of 11 bytes .* \(3,\) uint8 values\); it has 10",
        ),
        (b"\x00\x00\x08\x01" + (1).to_bytes(4, "big") + b"\x01\x02", r"of 9 bytes .*; it has 10 bytes"),
        (
            gzip.compress(b"\x00\x00\x08\x01" + (1).to_bytes(4, "big") + b"\x01", mtime=0)[:-6],
            r"expected a complete gzip file",
        ),
    ],
)
def test_corrupt_idx_file_is_named(tmp_path, contents, message):
    path = tmp_path / "corrupt.idx"
    path.write_bytes(contents)
    with pytest.raises(ArgumentError, match=rf"path='{path}': .*{message}"):
        fashion_mnist.read_idx(path)


def _write_split(folder, images: np.ndarray, labels: np.ndarray, split: str = "test") -> tuple[str, str]:
    images_name, labels_name, _ = fashion_mnist.SPLIT_FILES[split]
    (folder / images_name).write_bytes(gzip.compress(_idx_bytes(0x08, images)))
    (folder / labels_name).write_bytes(gzip.compress(_idx_bytes(0x08, labels)))
    return str(folder / images_name), str(folder / labels_name)


def test_read_split_checks_magic_numbers_shapes_and_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    images_path, labels_path = _write_split(tmp_path, images, np.array([9, 0, 4], np.uint8))
    split = fashion_mnist.read_split(images_path, labels_path, 3)
    np.testing.assert_array_equal(split["image"], images[..., np.newaxis])
    np.testing.assert_array_equal(split["label"], [9, 0, 4])
    with pytest.raises(
        ArgumentError, match=rf"path='{labels_path}': expected an IDX file of \(3, 28, 28\) uint8 values "
    ):
        fashion_mnist.read_split(labels_path, labels_path, 3)  # Labels where images belong: magic 0x801.
    with pytest.raises(ArgumentError, match=rf"path='{images_path}': .* \(10, 28, 28\) .* it holds \(3, 28, 28\)"):
        fashion_mnist.read_split(images_path, labels_path, 10)
    _, bad_labels = _write_split(tmp_path, images, np.array([9, 10, 4], np.uint8))
    with pytest.raises(ArgumentError, match=rf"path='{bad_labels}': expected labels in \[0, 10\); it holds 10"):
        fashion_mnist.read_split(images_path, bad_labels, 3)


@pytest.fixture
def absent_debian_dir(tmp_path, monkeypatch):
    """Points the builder's default source at an empty folder, as on a machine without the package."""
    source = tmp_path / "no_debian_files"
    source.mkdir()
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(source))
    return source


def test_without_debian_files_the_pipeline_says_how_to_get_them(tmp_path, absent_debian_dir):
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    start = time.perf_counter()
    with pytest.raises(ArgumentError) as info:
        data.dataset_spec("fashion_mnist_debian", str(data_dir))
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert message.startswith(f"dataset='fashion_mnist_debian': expected a dataset prepared under {data_dir},")
    assert f"are not in {absent_debian_dir}" in message
    assert "`apt-get install dataset-fashion-mnist`" in message and "download=True" in message
    assert list(data_dir.iterdir()) == []


def test_corrupt_debian_files_fail_the_preparation_by_name_and_leave_nothing(tmp_path, absent_debian_dir):
    for split in fashion_mnist.SPLIT_FILES:  # Well-formed files with 2 examples, not the 60000 / 10000 expected.
        _write_split(absent_debian_dir, np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8), split)
    data_dir = tmp_path / "tfds"
    with pytest.raises(ArgumentError, match=r"preparing it failed: ArgumentError\(.*-idx3-ubyte\.gz.*\(2, 28, 28\)"):
        data.dataset_spec("fashion_mnist_debian", str(data_dir))
    assert not data_dir.exists()


@NEEDS_DEBIAN_FILES
def test_builder_prepares_the_standard_split_in_file_order(tmp_path):
    """The pipeline prepares all 70000 examples (about 15 s on 2 cores) and reads them back."""
    spec = data.dataset_spec("fashion_mnist_debian", str(tmp_path))
    assert spec == data.DatasetSpec(
        name="fashion_mnist_debian",
        image_shape=(28, 28, 1),
        vocab_size=256,
        num_classes=10,
        split_sizes={"train": 60000, "test": 10000},
    )
    # The first labels of each split, as printed in Fashion-MNIST tutorials (9 = ankle boot, 0 = T-shirt/top).
    first_labels = {"train": [9, 0, 0, 3, 0, 2, 7, 2, 5, 5], "test": [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]}
    for split, (images_name, labels_name, num_examples) in fashion_mnist.SPLIT_FILES.items():
        arrays = data.load_split(spec, split, str(tmp_path))
        assert arrays["image"].shape == (num_examples, 28, 28, 1) and arrays["image"].dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(arrays["label"], minlength=10), [num_examples // 10] * 10)
        assert arrays["label"][:10].tolist() == first_labels[split]
        source = fashion_mnist.read_split(
            os.path.join(fashion_mnist.DEBIAN_DIR, images_name),
            os.path.join(fashion_mnist.DEBIAN_DIR, labels_name),
            num_examples,
        )
        np.testing.assert_array_equal(arrays["image"], source["image"])  # The files' order, losslessly.
        np.testing.assert_array_equal(arrays["label"], source["label"])
