"""Ancestral sampling of p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)) (seed Algorithm 2, VDM eq. 33)."""
import jax
import jax.numpy as jnp

from ddm_jax.diffusion.parameterization import check_parameterization, eps_from
from ddm_jax.diffusion.process import alpha_sigma, broadcast_to_data, posterior_coefficient


def ancestral_step(noise, z_t, eps_hat, gamma_s, gamma_t):
    """z_s = (alpha_s / alpha_t)(z_t - sigma_t c eps_hat) + sqrt(sigma_s^2 c) noise, c = -expm1(gamma_s - gamma_t).

    With DDPM's betas this is Algorithm 2's update with sigma_t^2 = beta~_t.
    """
    gamma_s, gamma_t = broadcast_to_data(gamma_s, z_t), broadcast_to_data(gamma_t, z_t)
    c = posterior_coefficient(gamma_s, gamma_t)
    alpha_s, _ = alpha_sigma(gamma_s)
    alpha_t, sigma_t = alpha_sigma(gamma_t)
    mean = (alpha_s / alpha_t) * (z_t - sigma_t * c * eps_hat)
    return mean + jnp.sqrt(jax.nn.sigmoid(gamma_s) * c) * noise


def ancestral_sample(rng, denoise_fn, gamma_fn, shape, *, T: int, parameterization: str = "eps",
                     z_1=None):
    """z_0 from z_1 ~ N(0, I) by T ancestral steps on the grid t_i = i / T: an array of `shape`.

    The noise of step i is normal(fold_in(rng, i)); z_1 is normal(fold_in(rng, T)) unless given.
    """
    if T < 1:
        raise ValueError(f"sampling steps T={T} must be >= 1")
    check_parameterization(parameterization)
    batch = shape[0]
    z = jax.random.normal(jax.random.fold_in(rng, T), shape) if z_1 is None else z_1

    def step(j, z_t):
        i = T - j
        gamma_t = gamma_fn(jnp.full((batch,), i / T))
        gamma_s = gamma_fn(jnp.full((batch,), (i - 1) / T))
        eps_hat = eps_from(denoise_fn(z_t, gamma_t), z_t, gamma_t, parameterization)
        noise = jax.random.normal(jax.random.fold_in(rng, i - 1), shape)
        return ancestral_step(noise, z_t, eps_hat, gamma_s, gamma_t)

    return jax.lax.fori_loop(0, T, step, z)
