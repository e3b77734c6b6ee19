"""Fixtures shared by several test files (pytest finds them here; no test file imports another)."""

import pytest
import tensorflow_datasets as tfds

import ddm_jax.data  # noqa: F401 - registers the offline builders


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
    """A TFDS data_dir with the offline digits prepared in it, once per test session."""
    path = str(tmp_path_factory.mktemp("tfds_digits"))
    tfds.builder("digits", data_dir=path).download_and_prepare()
    return path
