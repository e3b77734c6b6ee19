"""Exact likelihood through the probability-flow ODE against Gaussian closed forms.

With the optimal denoiser the PF-ODE maps z_0 linearly to z_1 = U diag(sqrt(v_1 / v_0)) U^T z_0
(tests/gaussian_data.py), so with the prior N(0, I) at t = 1 the model density of z_0 is
N(0, U diag(v_0 / v_1) U^T) exactly: q(z_0) = N(0, C_0) up to v_1 - 1 = alpha_1^2 (l - 1) ~ 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from gaussian_data import (
    GAMMA_0,
    GAMMA_1,
    correlated_denoiser,
    gamma_fn,
    in_eigenbasis,
    marginal_variances,
    optimal_denoiser,
)

from ddm_jax import diffusion
from ddm_jax.diffusion import likelihood

S = 0.5
VOCAB_SIZE = 256


def model_covariance():
    return in_eigenbasis(marginal_variances(GAMMA_0) / marginal_variances(GAMMA_1))


@pytest.fixture(scope="module")
def points():
    """A few z_0 ~ q(z_0) for the correlated data."""
    scale = np.linalg.cholesky(model_covariance())
    return jnp.asarray(np.random.default_rng(0).standard_normal((16, 3)) @ scale.T, jnp.float32)


@pytest.fixture(scope="module")
def log_likelihood():
    """One jitted ode_log_likelihood per (hutchinson, probe), reused across tests."""
    return {
        (hutchinson, probe): jax.jit(
            lambda rng, z, hutchinson=hutchinson, probe=probe: likelihood.ode_log_likelihood(
                rng, z, correlated_denoiser("v"), gamma_fn, parameterization="v", hutchinson=hutchinson, probe=probe
            )
        )
        for hutchinson, probe in [(False, "rademacher"), (True, "rademacher"), (True, "gaussian")]
    }


def test_exact_trace_gives_the_analytic_log_density(points, log_likelihood):
    log_p, nfe = log_likelihood[False, "rademacher"](jax.random.PRNGKey(0), points)
    expected = scipy.stats.multivariate_normal(np.zeros(3), model_covariance()).logpdf(np.asarray(points, np.float64))
    np.testing.assert_allclose(log_p, expected, atol=2e-3)
    assert 10 < int(nfe) < 2000


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(points, log_likelihood, probe):
    """Each of 2048 copies of one point draws its own probe; the mean matches, the spread does not vanish."""
    copies = jnp.broadcast_to(points[:1], (2048, 3))
    log_p, _ = log_likelihood[True, probe](jax.random.PRNGKey(1), copies)
    expected = scipy.stats.multivariate_normal(np.zeros(3), model_covariance()).logpdf(np.asarray(points[0]))
    spread = float(np.std(log_p))
    assert spread > 0.05
    assert abs(float(np.mean(log_p)) - expected) < 5 * spread / np.sqrt(2048)


def discretised_gaussian_nats(k, variance):
    """-log P(k) with P(k) = prod_d N(0, variance) mass of the bin of width 2 / V around encode(k)."""
    x = (2.0 * (np.asarray(k, np.float64) + 0.5)) / VOCAB_SIZE - 1.0
    scale, half = np.sqrt(variance), 1.0 / VOCAB_SIZE
    mass = scipy.stats.norm.cdf((x + half) / scale) - scipy.stats.norm.cdf((x - half) / scale)
    return -np.log(mass).sum(-1)


def test_dequantized_bits_per_dim_of_a_discretised_gaussian():
    """p_x = N(0, (S^2 + exp(gamma_0)) I) for x ~ N(0, S^2 I); the bound is tight for a fine vocabulary.

    Each of 8 points is repeated 256 times (a fresh u each), so the mean over u is compared.
    """
    x = S * np.random.default_rng(1).standard_normal((8, 4))
    k = jnp.repeat(diffusion.decode(jnp.asarray(x), VOCAB_SIZE), 256, axis=0)
    bpd, _ = jax.jit(
        lambda rng, k: likelihood.ode_bits_per_dim(
            rng, k, optimal_denoiser(S), gamma_fn, vocab_size=VOCAB_SIZE, hutchinson=False
        )
    )(jax.random.PRNGKey(2), k)
    expected = discretised_gaussian_nats(k[::256], S**2 + np.exp(GAMMA_0)) / (4 * np.log(2.0))
    np.testing.assert_allclose(np.asarray(bpd).reshape(8, 256).mean(-1), expected, atol=2e-3)
    assert np.std(np.asarray(bpd)) > 1e-3  # u does move the estimate


def test_user_mistakes_raise():
    k = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="vocab_size=1"):
        likelihood.ode_bits_per_dim(jax.random.PRNGKey(0), k, optimal_denoiser(S), gamma_fn, vocab_size=1)
    with pytest.raises(ValueError, match="dequantization='gaussian': expected one of"):
        likelihood.ode_bits_per_dim(
            jax.random.PRNGKey(0), k, optimal_denoiser(S), gamma_fn, vocab_size=5, dequantization="gaussian"
        )
    with pytest.raises(ValueError, match="probe='sphere'"):
        likelihood.ode_log_likelihood(
            jax.random.PRNGKey(0), k.astype(jnp.float32), optimal_denoiser(S), gamma_fn, probe="sphere"
        )
    with pytest.raises(ValueError, match="parameterization='noise'"):
        likelihood.ode_log_likelihood(
            jax.random.PRNGKey(0), k.astype(jnp.float32), optimal_denoiser(S), gamma_fn, parameterization="noise"
        )


def test_decoder_dequantized_bound_matches_an_independent_computation():
    """With the optimal denoiser, p_0(z_0) = N(0, alpha_0^2 S^2 + sigma_0^2); the bound
    -log p(k | z_0) - log p_0(z_0) + log q(z_0 | k) recomputed in numpy from the same z_0 draws."""
    vocab, gamma_0 = 17, GAMMA_0
    k = diffusion.decode(jnp.asarray(S * np.random.default_rng(3).standard_normal((64, 4))), vocab)
    rng = jax.random.PRNGKey(5)
    bpd, _ = jax.jit(
        lambda rng, k: likelihood.ode_bits_per_dim(
            rng, k, optimal_denoiser(S), gamma_fn, vocab_size=vocab, dequantization="decoder", hutchinson=False
        )
    )(rng, k)
    rng_dequantize, _ = jax.random.split(rng)
    eps = np.stack(
        [np.asarray(jax.random.normal(jax.random.fold_in(rng_dequantize, b), (4,)), np.float64) for b in range(64)]
    )
    alpha2, sigma2 = 1 / (1 + np.exp(gamma_0)), 1 / (1 + np.exp(-gamma_0))
    x = 2 * (np.asarray(k, np.float64) + 0.5) / vocab - 1
    z_0 = np.sqrt(alpha2) * x + np.sqrt(sigma2) * eps
    log_q = scipy.stats.norm.logpdf(z_0, np.sqrt(alpha2) * x, np.sqrt(sigma2)).sum(-1)
    log_p = scipy.stats.norm.logpdf(z_0, 0, np.sqrt(alpha2 * S**2 + sigma2)).sum(-1)
    values = 2 * (np.arange(vocab) + 0.5) / vocab - 1
    log_decoder = scipy.stats.norm.logpdf(z_0[..., None], np.sqrt(alpha2) * values, np.sqrt(sigma2))
    log_p_k = (
        np.take_along_axis(log_decoder, np.asarray(k)[..., None], -1)[..., 0] - scipy.special.logsumexp(log_decoder, -1)
    ).sum(-1)
    expected = (-log_p_k - log_p + log_q) / (4 * np.log(2.0))
    np.testing.assert_allclose(bpd, expected, rtol=1e-3, atol=2e-3)
