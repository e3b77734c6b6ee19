"""Evaluators: small objects that run on a state's parameters and return {name: value}.

As in big_vision, an evaluator is built once from the functions and data it needs (compiled
functions, a batch iterator factory, an rng) and then run on any parameters: during training on
the EMA parameters every few steps, and on a restored checkpoint by `--mode=eval` and
`--mode=sample`. They read no config; the experiment (ddm_jax.training) builds them.
"""

import os
from collections.abc import Callable, Iterable

import jax
import numpy as np

from ddm_jax.evaluation.bpd import evaluate_bpd
from ddm_jax.evaluation.images import sample_grid, save_samples


class BitsPerDim:
    """The ELBO in bits/dim over every example of a split, with its standard error and its terms.

    terms_fn(params, rng, batch) -> per-example terms (VDM.elbo_terms of the batch); batches() ->
    the split's batches, each with a boolean "mask" of real rows; every example averages
    `num_time_samples` draws of (t, eps) (`evaluate_bpd`).
    """

    def __init__(
        self, terms_fn: Callable, batches: Callable[[], Iterable[dict]], rng, *, num_dims: int, num_time_samples: int
    ):
        self.terms_fn, self.batches, self.rng = terms_fn, batches, rng
        self.num_dims, self.num_time_samples = num_dims, num_time_samples

    def run(self, params) -> dict:
        return evaluate_bpd(
            self.terms_fn,
            params,
            self.rng,
            self.batches(),
            num_dims=self.num_dims,
            num_time_samples=self.num_time_samples,
        )


class Samples:
    """Integer samples k = sample_fn(params, rng) written as a PNG grid (scaled up) and an .npz.

    Every process draws the same samples (the same rng); only the process with `write_files`
    writes them. `run(params, name)` returns {"grid": uint8 image, "png", "npz": paths, "nfe"}.
    """

    def __init__(self, sample_fn: Callable, rng, *, vocab_size: int, directory: str, write_files: bool):
        self.sample_fn, self.rng = sample_fn, rng
        self.vocab_size, self.directory, self.write_files = vocab_size, directory, write_files

    def run(self, params, name: str) -> dict:
        k, info = jax.device_get(self.sample_fn(params, self.rng))
        k = np.asarray(k)
        stem = os.path.join(self.directory, name)
        paths = (
            save_samples(stem, k, self.vocab_size) if self.write_files else {"png": f"{stem}.png", "npz": f"{stem}.npz"}
        )
        return {"grid": sample_grid(k, self.vocab_size), "nfe": int(info["nfe"]), **paths}
