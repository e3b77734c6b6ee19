"""DDPM as the discrete special case: Algorithm 1 as a loss, Algorithm 2 as a sampler."""

import jax
import jax.numpy as jnp
import numpy as np
from gaussian_data import optimal_denoiser

from ddm_jax import diffusion
from ddm_jax.diffusion import schedules

S = 0.7
NUM_BETAS = 50
BETAS = np.linspace(1e-3, 0.25, NUM_BETAS)
ALPHABAR = np.cumprod(1 - BETAS)


def ddpm_gamma_fn():
    schedule = schedules.DiscreteBetas(kind="linear", num_betas=NUM_BETAS, beta_start=BETAS[0], beta_end=BETAS[-1])
    return lambda t: schedule.apply({}, t)


def numpy_optimal_eps(x_t, alphabar):
    return np.sqrt(1 - alphabar) * x_t / (alphabar * S**2 + 1 - alphabar)


def test_algorithm_1_is_the_simple_loss():
    """||eps - eps_theta(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t)||^2 on DDPM's grid."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((16, 4, 4, 1)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    index = rng.integers(2, NUM_BETAS + 1, 16)  # DDPM's t; t = 1 is the reconstruction term here
    t = (index - 1) / (NUM_BETAS - 1)
    eps_theta = lambda z, gamma: 0.5 * z + 0.1
    loss = diffusion.denoising_loss(jnp.asarray(x0), jnp.asarray(eps), ddpm_gamma_fn()(jnp.asarray(t)), 2.0, eps_theta)
    ab = ALPHABAR[index - 1][:, None, None, None]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    reference = ((eps - (0.5 * x_t + 0.1)) ** 2).reshape(16, -1).sum(-1)
    np.testing.assert_allclose(loss, reference, rtol=1e-3)


def test_ancestral_sampler_is_algorithm_2():
    """Same noise draws, independent float64 implementation of Algorithm 2 with sigma_t^2 = beta~_t."""
    rng = jax.random.PRNGKey(3)
    shape = (8, 3)
    T = NUM_BETAS - 1
    z_0, info = diffusion.ancestral_sample(rng, optimal_denoiser(S), ddpm_gamma_fn(), shape, steps=T)
    assert int(info["nfe"]) == T
    x = np.asarray(jax.random.normal(jax.random.fold_in(rng, T), shape), np.float64)
    for index in range(NUM_BETAS, 1, -1):  # DDPM's t = N..2; t = 1 is the final, noiseless step
        beta, ab, ab_prev = BETAS[index - 1], ALPHABAR[index - 1], ALPHABAR[index - 2]
        noise = np.asarray(jax.random.normal(jax.random.fold_in(rng, index - 2), shape), np.float64)
        sigma = np.sqrt((1 - ab_prev) / (1 - ab) * beta)
        x = (x - beta / np.sqrt(1 - ab) * numpy_optimal_eps(x, ab)) / np.sqrt(1 - beta) + sigma * noise
    np.testing.assert_allclose(z_0, x, rtol=2e-3, atol=2e-3)
    # Algorithm 2's last step (t = 1, no noise) is the x0 prediction at z_0.
    gamma_0 = ddpm_gamma_fn()(jnp.zeros(shape[0]))
    x_hat = diffusion.x0_from_eps(optimal_denoiser(S)(z_0, gamma_0), z_0, gamma_0)
    ab = ALPHABAR[0]
    expected = (x - BETAS[0] / np.sqrt(1 - ab) * numpy_optimal_eps(x, ab)) / np.sqrt(1 - BETAS[0])
    np.testing.assert_allclose(x_hat, expected, rtol=2e-3, atol=2e-3)


def test_ancestral_samples_have_the_data_mean_and_variance():
    schedule = schedules.FixedLinear(-10.0, 8.0)
    gamma_fn = lambda t: schedule.apply({}, t)
    sample = jax.jit(lambda rng: diffusion.ancestral_sample(rng, optimal_denoiser(S), gamma_fn, (50_000, 2), steps=500))
    z_0 = np.asarray(sample(jax.random.PRNGKey(0))[0], np.float64)
    alpha_0, sigma_0 = (float(a) for a in diffusion.alpha_sigma(jnp.float32(-10.0)))
    expected_var = alpha_0**2 * S**2 + sigma_0**2
    assert abs(z_0.mean()) < 4 * np.sqrt(expected_var / z_0.size)
    assert abs(z_0.var() / expected_var - 1) < 0.02
