"""TFDS datasets and the input pipeline.

Importing this package registers the offline builders ("digits") with TFDS, so
`tfds.load("digits", data_dir=...)` works without a network.
"""

from ddm_jax.data.augment import AUGMENT_COND_DIM, augment_batch, check_augment, identity_cond
from ddm_jax.data.digits import Digits
from ddm_jax.data.pipeline import (
    DatasetSpec,
    check_eval_split,
    dataset_spec,
    eval_batches,
    load_split,
    train_batches,
)

__all__ = [
    "AUGMENT_COND_DIM",
    "DatasetSpec",
    "Digits",
    "augment_batch",
    "check_augment",
    "check_eval_split",
    "dataset_spec",
    "eval_batches",
    "identity_cond",
    "load_split",
    "train_batches",
]
