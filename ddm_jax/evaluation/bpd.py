"""Test bits/dim: the ELBO averaged over every example of a split, with its standard error."""

import dataclasses
from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

TERMS = ("bpd", "reconstruction", "prior", "diffusion")


@dataclasses.dataclass
class MaskedMoments:
    """Running count, sum and sum of squares of per-example values, padding excluded."""

    count: float = 0.0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, values: np.ndarray, mask: np.ndarray) -> None:
        values = np.asarray(values, np.float64)[mask]
        self.count += values.size
        self.total += values.sum()
        self.total_sq += np.square(values).sum()

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def standard_error(self) -> float:
        variance = max(self.total_sq / self.count - self.mean**2, 0.0)
        return float(np.sqrt(variance / max(self.count - 1, 1)))


def evaluate_bpd(
    terms_fn: Callable, params, rng: jax.Array, batches: Iterable[dict], *, num_dims: int, num_time_samples: int = 1
) -> dict[str, float]:
    """Mean and standard error of the ELBO in bits/dim over all examples of `batches`.

    terms_fn(params, rng, batch) -> per-example terms [B] (nats; "bpd" in bits/dim), as
    VDM.elbo_terms returns them; each example's estimate averages `num_time_samples` draws of
    (t, eps). Batches carry what terms_fn reads and a boolean "mask" of real (not padding) examples.
    With several processes, each passes its rows (terms global arrays, masks its own rows in
    process order) and every process gets the statistics of all examples.
    Returns {"bpd", "bpd_stderr", "reconstruction_bpd", "prior_bpd", "diffusion_bpd", "num_examples"}.
    """
    moments = {name: MaskedMoments() for name in TERMS}
    for index, batch in enumerate(batches):
        mask = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True), bool)
        per_example = {name: 0.0 for name in TERMS}
        for sample in range(num_time_samples):
            terms = terms_fn(params, jax.random.fold_in(rng, index * num_time_samples + sample), batch)
            terms = multihost_utils.process_allgather({name: terms[name] for name in TERMS}, tiled=True)
            for name in TERMS:
                per_example[name] = per_example[name] + terms[name] / num_time_samples
        for name in TERMS:
            moments[name].add(per_example[name], mask)
    to_bpd = 1.0 / (num_dims * np.log(2.0))
    return {
        "bpd": moments["bpd"].mean,
        "bpd_stderr": moments["bpd"].standard_error,
        **{f"{name}_bpd": moments[name].mean * to_bpd for name in TERMS[1:]},
        "num_examples": int(moments["bpd"].count),
    }
