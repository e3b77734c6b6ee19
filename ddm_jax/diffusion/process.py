"""The variance-preserving forward process, written in gamma = -log SNR.

alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t), z_t = alpha_t x + sigma_t eps.
Data are integers k in [0, V), encoded as x = 2 (k + 1/2) / V - 1.
"""

import jax
import jax.numpy as jnp


def encode(k: jax.Array, vocab_size: int) -> jax.Array:
    """Integer data k in [0, V) to the centres of V equal bins of [-1, 1]."""
    return 2.0 * (k.astype(jnp.float32) + 0.5) / vocab_size - 1.0


def decode(x: jax.Array, vocab_size: int) -> jax.Array:
    """Inverse of `encode`: the integer whose bin holds x (clipped to [0, V))."""
    k = jnp.floor((x + 1.0) * vocab_size / 2.0)
    return jnp.clip(k, 0, vocab_size - 1).astype(jnp.int32)


def alpha_sigma(gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) with alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma)."""
    return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def broadcast_to_data(per_example: jax.Array, data: jax.Array) -> jax.Array:
    """A [B] (or scalar) array reshaped to broadcast against [B, ...] data."""
    per_example = jnp.asarray(per_example)
    return per_example.reshape(per_example.shape + (1,) * (data.ndim - per_example.ndim))


def q_sample(x: jax.Array, gamma: jax.Array, eps: jax.Array) -> jax.Array:
    """A draw of the forward marginal q(z_t | x) = N(alpha_t x, sigma_t^2 I)."""
    alpha, sigma = alpha_sigma(broadcast_to_data(gamma, x))
    return alpha * x + sigma * eps


def posterior_coefficient(gamma_s: jax.Array, gamma_t: jax.Array) -> jax.Array:
    """c = 1 - SNR_t / SNR_s = -expm1(gamma_s - gamma_t), in (0, 1] for s < t."""
    return -jnp.expm1(gamma_s - gamma_t)


def posterior(z_t: jax.Array, x: jax.Array, gamma_s: jax.Array, gamma_t: jax.Array):
    """q(z_s | z_t, x) = N(mu_q, sigma_q^2 I) for s < t, in gamma form.

    With c = -expm1(gamma_s - gamma_t):
      mu_q = alpha_s ((1 - c) z_t / alpha_t + c x),  sigma_q^2 = sigma_s^2 c.
    This is DDPM's posterior (Ho et al. 2020, eqs. 6-7) with alphabar = sigmoid(-gamma).
    Returns (mu_q, sigma_q^2); sigma_q^2 has the shape of gamma broadcast to z_t.
    """
    gamma_s, gamma_t = broadcast_to_data(gamma_s, z_t), broadcast_to_data(gamma_t, z_t)
    c = posterior_coefficient(gamma_s, gamma_t)
    alpha_s, _ = alpha_sigma(gamma_s)
    alpha_t, _ = alpha_sigma(gamma_t)
    mean = alpha_s * ((1.0 - c) * z_t / alpha_t + c * x)
    return mean, jax.nn.sigmoid(gamma_s) * c
