"""TFDS datasets and the input pipeline.

Importing this package registers the offline builders ("digits", "fashion_mnist_debian",
"shapes") with TFDS, so e.g. `tfds.load("digits", data_dir=...)` works without a network.
docs/data.md describes the datasets, a user's own images ("folder:PATH", "npz:PATH") and the
order of batches.
"""

from ddm_jax.data.augment import AUGMENT_COND_DIM, augment_batch, check_augment, identity_cond
from ddm_jax.data.digits import Digits
from ddm_jax.data.fashion_mnist import FashionMnistDebian
from ddm_jax.data.pipeline import (
    DatasetSpec,
    batches_of_arrays,
    check_eval_split,
    dataset_spec,
    eval_batches,
    load_split,
    train_batches,
)
from ddm_jax.data.shapes import Shapes

__all__ = [
    "AUGMENT_COND_DIM",
    "DatasetSpec",
    "Digits",
    "FashionMnistDebian",
    "Shapes",
    "augment_batch",
    "batches_of_arrays",
    "check_augment",
    "check_eval_split",
    "dataset_spec",
    "eval_batches",
    "identity_cond",
    "load_split",
    "train_batches",
]
