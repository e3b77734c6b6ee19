"""Fixtures shared by several test files (pytest finds them here; no test file imports another),
and the test session's persistent compilation cache.

JAX's persistent compilation cache is on for the whole session, subprocesses included (they
inherit the environment): many tests compile the same tiny programs (the trainer's step in
several files, `python -m ddm_jax.main` in subprocesses), and XLA:CPU compilation is most of the
suite's time. The cache lives in ~/.cache/ddm_jax/jax_compilation_cache unless
JAX_COMPILATION_CACHE_DIR names another place.

The cache is empty on a fresh machine (CI), so the suite also compiles with XLA's backend
optimisation level at 0 and LLVM's expensive passes off (JAX_DISABLE_MOST_OPTIMIZATIONS): on 2
CPU cores that took a cold run from 15.6 to 9.8 minutes; the tests' programs are too small for
their run time to matter. The miscompile guard compiles its reproduction with them on.
"""

import os

import pytest

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ddm_jax", "jax_compilation_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import tensorflow_datasets as tfds  # noqa: E402 - after the environment JAX reads on import

import ddm_jax.data  # noqa: E402, F401 - registers the offline builders


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
    """A TFDS data_dir with the offline digits prepared in it, once per test session."""
    path = str(tmp_path_factory.mktemp("tfds_digits"))
    tfds.builder("digits", data_dir=path).download_and_prepare()
    return path
