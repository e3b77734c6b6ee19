"""scikit-learn's 8x8 handwritten digits as an offline TFDS dataset.

The 1797 images ship with scikit-learn (`sklearn.datasets.load_digits`), so
preparing this dataset never touches the network. Pixels are the raw integer
counts 0..16 (a 4x4 block count of a 32x32 bitmap), so the dataset's
vocabulary has 17 values; it is recorded as metadata key "vocab_size".

Fixed split: the examples are permuted with `numpy.random.default_rng(0)`; the
last 360 of that permutation are "test", the other 1437 are "train".
"""

import numpy as np
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

VOCAB_SIZE = 17
NUM_TEST_EXAMPLES = 360
SPLIT_SEED = 0


def split_indices(num_examples: int) -> dict[str, np.ndarray]:
    """Indices into `load_digits()` of each split: the documented fixed split."""
    order = np.random.default_rng(SPLIT_SEED).permutation(num_examples)
    return {"train": order[:-NUM_TEST_EXAMPLES], "test": order[-NUM_TEST_EXAMPLES:]}


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits: 8x8x1 images with values 0..16, ten classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            metadata=tfds.core.MetadataDict(vocab_size=VOCAB_SIZE),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # The data ship with scikit-learn.
        digits = load_digits()
        images = digits.images.astype(np.uint8)[..., np.newaxis]
        labels = digits.target
        return {
            split: self._generate_examples(images, labels, indices)
            for split, indices in split_indices(len(labels)).items()
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        for index in indices:
            yield int(index), {"image": images[index], "label": int(labels[index])}
