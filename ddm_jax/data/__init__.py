"""TFDS datasets and the input pipeline.

Importing this package registers the offline builders ("digits") with TFDS, so
`tfds.load("digits", data_dir=...)` works without a network.
"""

from ddm_jax.data.digits import Digits
from ddm_jax.data.pipeline import DatasetSpec, dataset_spec, eval_batches, load_split, train_batches

__all__ = ["DatasetSpec", "Digits", "dataset_spec", "eval_batches", "load_split", "train_batches"]
