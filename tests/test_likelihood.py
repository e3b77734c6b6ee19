"""Exact likelihood through the probability-flow ODE against Gaussian closed forms.

With the optimal denoiser the PF-ODE maps z_0 linearly to z_1 = U diag(sqrt(v_1 / v_0)) U^T z_0
(see test_samplers), so with the prior N(0, I) at t = 1 the model density of z_0 is
N(0, U diag(v_0 / v_1) U^T) exactly: q(z_0) = N(0, C_0) up to v_1 - 1 = alpha_1^2 (l - 1) ~ 1e-4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from ddm_jax import diffusion
from ddm_jax.diffusion import likelihood
from gaussian_data import optimal_denoiser
from test_samplers import (GAMMA_0, GAMMA_1, correlated_denoiser, gamma_fn, in_eigenbasis,
                           marginal_variances)

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
        (hutchinson, probe): jax.jit(lambda rng, z, hutchinson=hutchinson, probe=probe:
                                     likelihood.ode_log_likelihood(rng, z, correlated_denoiser("v"), gamma_fn,
                                                                   parameterization="v", hutchinson=hutchinson,
                                                                   probe=probe))
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
    bpd, _ = jax.jit(lambda rng, k: likelihood.ode_bits_per_dim(
        rng, k, optimal_denoiser(S), gamma_fn, vocab_size=VOCAB_SIZE, hutchinson=False))(
        jax.random.PRNGKey(2), k)
    expected = discretised_gaussian_nats(k[::256], S**2 + np.exp(GAMMA_0)) / (4 * np.log(2.0))
    np.testing.assert_allclose(np.asarray(bpd).reshape(8, 256).mean(-1), expected, atol=2e-3)
    assert np.std(np.asarray(bpd)) > 1e-3  # u does move the estimate


def test_user_mistakes_raise():
    k = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="vocab_size=1"):
        likelihood.ode_bits_per_dim(jax.random.PRNGKey(0), k, optimal_denoiser(S), gamma_fn, vocab_size=1)
    with pytest.raises(ValueError, match="probe='sphere'"):
        likelihood.ode_log_likelihood(jax.random.PRNGKey(0), k.astype(jnp.float32), optimal_denoiser(S),
                                      gamma_fn, probe="sphere")
    with pytest.raises(ValueError, match="parameterization='noise'"):
        likelihood.ode_log_likelihood(jax.random.PRNGKey(0), k.astype(jnp.float32), optimal_denoiser(S),
                                      gamma_fn, parameterization="noise")
