"""Sampling time grids: decreasing times t_0 = 1 > t_1 > ... > t_steps = 0.

Each grid is an array [steps + 1] computed in JAX (steps static), so it works under jit and
for a learned gamma_fn whose parameters are traced. Grids defined in log-SNR are mapped to t
by inverting gamma_fn, which is strictly increasing, by bisection.
"""

import jax
import jax.numpy as jnp

from ddm_jax.checks import check_choice, check_int
from ddm_jax.diffusion.schedules import gamma_endpoints

GRIDS = ("uniform", "log_snr", "edm")

EDM_RHO = 7.0


def inverse_gamma(gamma_fn, gamma: jax.Array, *, iterations: int = 40) -> jax.Array:
    """t in [0, 1] with gamma_fn(t) = gamma, elementwise, by bisection on the increasing gamma_fn.

    Targets outside [gamma(0), gamma(1)] give the nearest endpoint. 40 halvings take the
    bracket below float32 resolution on [0, 1].
    """
    gamma = jnp.asarray(gamma, jnp.float32)

    def halve(_, bracket):
        low, high = bracket
        middle = 0.5 * (low + high)
        below = gamma_fn(middle) < gamma
        return jnp.where(below, middle, low), jnp.where(below, high, middle)

    low, high = jax.lax.fori_loop(0, iterations, halve, (jnp.zeros_like(gamma), jnp.ones_like(gamma)))
    return 0.5 * (low + high)


def _times_of_gammas(gamma_fn, gammas: jax.Array) -> jax.Array:
    """Interior points by inversion; the endpoints are exactly 1 and 0."""
    interior = inverse_gamma(gamma_fn, gammas[1:-1])
    return jnp.concatenate([jnp.ones((1,)), interior, jnp.zeros((1,))])


def uniform_grid(steps: int) -> jax.Array:
    """t_i = (steps - i) / steps: uniform in t."""
    return jnp.arange(steps, -1, -1, dtype=jnp.float32) / steps


def log_snr_grid(gamma_fn, steps: int) -> jax.Array:
    """gamma(t_i) = gamma(1) + (i / steps)(gamma(0) - gamma(1)): uniform in log-SNR = -gamma."""
    gamma_0, gamma_1 = gamma_endpoints(gamma_fn)
    return _times_of_gammas(gamma_fn, jnp.linspace(gamma_1, gamma_0, steps + 1))


def edm_grid(gamma_fn, steps: int, rho: float = EDM_RHO) -> jax.Array:
    """Karras et al. (2022), eq. 5: sigma_i^(1/rho) linear in i from sigma_max^(1/rho) to sigma_min^(1/rho).

    Here sigma is the noise level of z / alpha, sigma = sqrt(1 / SNR) = exp(gamma / 2), with
    sigma_max = exp(gamma(1) / 2) and sigma_min = exp(gamma(0) / 2); so
    gamma_i = 2 rho log((1 - i/steps) exp(gamma(1) / (2 rho)) + (i/steps) exp(gamma(0) / (2 rho))).
    The grid ends at sigma_min (t = 0) rather than appending sigma = 0.
    """
    gamma_0, gamma_1 = gamma_endpoints(gamma_fn)
    fraction = jnp.linspace(0.0, 1.0, steps + 1)
    root_sigma = (1.0 - fraction) * jnp.exp(gamma_1 / (2.0 * rho)) + fraction * jnp.exp(gamma_0 / (2.0 * rho))
    return _times_of_gammas(gamma_fn, 2.0 * rho * jnp.log(root_sigma))


def time_grid(name: str, gamma_fn, steps: int) -> jax.Array:
    """The grid `name` (one of GRIDS) with steps + 1 points from t = 1 down to t = 0."""
    check_choice("grid", name, GRIDS)
    check_int("steps", steps, minimum=1)
    if name == "uniform":
        return uniform_grid(steps)
    if name == "log_snr":
        return log_snr_grid(gamma_fn, steps)
    return edm_grid(gamma_fn, steps)
