"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv:1708.07747) as an offline TFDS dataset.

Debian's package `dataset-fashion-mnist` (MIT licence) installs the four
gzipped IDX files of the standard split in /usr/share/datasets/fashion-mnist;
the builder "fashion_mnist_debian" reads them from there, so preparing it needs
no network. Without them it downloads the same files from the dataset's
upstream source through TFDS's download manager, checked against the sizes and
sha256 that TFDS records for its own "fashion_mnist" builder; the input
pipeline allows that only with `download=True`.

TFDS's own "fashion_mnist" builder always downloads, and its recorded checksums
are those of the upstream .gz files, which Debian's files do not match (they
are recompressed), so it cannot read them; hence a builder of our own, under
another name. The examples are the same: train 60000 and test 10000 images,
uint8 [28, 28, 1] (values 0..255, vocabulary 256), ten classes, in the files'
order.

IDX (LeCun et al.'s MNIST file format): a big-endian header of two zero bytes,
a type byte (0x08 = uint8, ...), a byte giving the number of dimensions d,
then d big-endian uint32 sizes, then the values in C order, big-endian.
"""

import gzip
import math
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from ddm_jax.checks import ArgumentError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
UPSTREAM_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
INSTALL_COMMAND = "apt-get install dataset-fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SIZE = 28
# Split -> (images file, labels file, number of examples).
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
SOURCE_FILES = tuple(name for images, labels, _ in SPLIT_FILES.values() for name in (images, labels))
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in IDX file `path` (gzipped or not), in native byte order.

    Raises ArgumentError naming the file if it is not a complete IDX file.
    """
    contents = _read_bytes(path)
    if len(contents) < 4 or contents[:2] != b"\0\0" or contents[2] not in IDX_TYPES:
        raise ArgumentError(
            "path",
            str(path),
            f"an IDX file, whose first bytes are 00 00, a type in {[f'{code:02x}' for code in IDX_TYPES]} and "
            f"a number of dimensions; it starts with {contents[:4].hex(' ') or 'nothing'}",
        )
    dtype, ndim = np.dtype(IDX_TYPES[contents[2]]), contents[3]
    header_size = 4 + 4 * ndim
    shape = tuple(int.from_bytes(contents[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_size = header_size + math.prod(shape) * dtype.itemsize
    if len(contents) < header_size or len(contents) != expected_size:
        raise ArgumentError(
            "path",
            str(path),
            f"an IDX file of {expected_size} bytes (a {header_size}-byte header, then {shape} {dtype.name} "
            f"values); it has {len(contents)} bytes",
        )
    return np.frombuffer(contents, dtype, offset=header_size).reshape(shape).astype(dtype.newbyteorder("="))


def _read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes, decompressed if it is gzipped."""
    with open(path, "rb") as file:
        contents = file.read()
    if contents[:2] != _GZIP_MAGIC:
        return contents
    try:
        return gzip.decompress(contents)
    except (OSError, EOFError) as error:
        raise ArgumentError("path", str(path), f"a complete gzip file ({error})") from error


def read_split(images_path: str | os.PathLike, labels_path: str | os.PathLike, num_examples: int) -> dict:
    """One Fashion-MNIST split: image uint8 [n, 28, 28, 1] and label uint8 [n] in [0, 10).

    Checks each file's IDX magic number (uint8 values in 3 or 1 dimensions), its shape
    (n = `num_examples`) and the labels' range, raising ArgumentError naming the file at fault.
    """
    images = _read_uint8_idx(images_path, (num_examples, IMAGE_SIZE, IMAGE_SIZE))
    labels = _read_uint8_idx(labels_path, (num_examples,))
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise ArgumentError("path", str(labels_path), f"labels in [0, {len(CLASS_NAMES)}); it holds {labels.max()}")
    return {"image": images[..., np.newaxis], "label": labels}


def _read_uint8_idx(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    array = read_idx(path)
    if array.dtype != np.uint8 or array.shape != shape:
        magic = 0x0800 + len(shape)
        raise ArgumentError(
            "path",
            str(path),
            f"an IDX file of {shape} uint8 values (magic number {magic:#010x}); it holds "
            f"{array.shape} {array.dtype.name} values",
        )
    return array


def debian_files_missing(source_dir: str | os.PathLike) -> list[str]:
    """The Fashion-MNIST files absent from `source_dir`."""
    return [name for name in SOURCE_FILES if not (Path(source_dir) / name).is_file()]


class FashionMnistDebian(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST read from Debian's files: 28x28x1 uint8 images, ten classes, the standard split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs):
        """`source_dir`: where the four .gz files are looked for (DEBIAN_DIR when None); the rest are TFDS's."""
        super().__init__(**kwargs)
        self.source_dir = Path(DEBIAN_DIR if source_dir is None else source_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # Stored in the files' order.
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            citation="Xiao, Rasul and Vollgraf (2017). Fashion-MNIST. arXiv:1708.07747.",
        )

    def missing_source(self) -> str | None:
        """None when Debian's files are in `source_dir`; otherwise which are not, and how to get them."""
        missing = debian_files_missing(self.source_dir)
        if not missing:
            return None
        return (
            f"Debian's Fashion-MNIST files {missing} are not in {self.source_dir}: install them with "
            f"`{INSTALL_COMMAND}` (Debian or Ubuntu, as root)"
        )

    @property
    def url_infos(self) -> dict | None:
        """TFDS's recorded sizes and sha256 of the upstream files, so that a download is verified."""
        return tfds.builder_cls("fashion_mnist").url_infos

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        if self.missing_source() is None:
            paths = {name: self.source_dir / name for name in SOURCE_FILES}
        else:
            paths = dl_manager.download({name: UPSTREAM_URL + name for name in SOURCE_FILES})
        return {
            split: self._generate_examples(paths[images], paths[labels], num_examples)
            for split, (images, labels, num_examples) in SPLIT_FILES.items()
        }

    def _generate_examples(self, images_path: Path, labels_path: Path, num_examples: int):
        split = read_split(images_path, labels_path, num_examples)
        for index, (image, label) in enumerate(zip(split["image"], split["label"], strict=True)):
            yield index, {"image": image, "label": int(label)}
