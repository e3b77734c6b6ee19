"""Closed forms for Gaussian data, the references the diffusion tests compare with.

Isotropic: x ~ N(0, s^2 I). Correlated: x ~ N(0, Sigma) with a full 3 x 3 covariance
Sigma = U diag(l) U^T. Then q(z_t) = N(0, C_t), C_t = U diag(v_t) U^T with v_t = alpha_t^2 l + sigma_t^2,
the optimal denoiser is E[eps | z_t] = sigma_t C_t^-1 z_t, and the probability-flow ODE is linear:
z_t = U diag(sqrt(v_t / v_1)) U^T z_1, the exact map every deterministic sampler approximates.
"""

import jax.numpy as jnp
import numpy as np

from ddm_jax import diffusion
from ddm_jax.diffusion import alpha_sigma, from_eps, schedules


def optimal_eps(z, gamma, s):
    """E[eps | z_t] = sigma z / (alpha^2 s^2 + sigma^2), written as a function of gamma only."""
    alpha, sigma = alpha_sigma(gamma.reshape(gamma.shape + (1,) * (z.ndim - 1)))
    return sigma * z / (alpha**2 * s**2 + sigma**2)


def optimal_denoiser(s, parameterization="eps"):
    def denoise_fn(z, gamma):
        return from_eps(optimal_eps(z, gamma, s), z, gamma, parameterization)

    return denoise_fn


def mse_per_dim(gamma, s):
    """E ||eps - E[eps | z]||^2 per dimension = Var(eps | z) = s^2 / (s^2 + exp(gamma))."""
    return s**2 / (s**2 + np.exp(gamma))


def continuous_diffusion_loss(gamma_0, gamma_1, s, num_dims):
    """D/2 int_{gamma_0}^{gamma_1} s^2 / (s^2 + e^gamma) dgamma = D/2 [gamma - log(s^2 + e^gamma)]."""
    antiderivative = lambda g: g - np.logaddexp(2 * np.log(s), g)
    return 0.5 * num_dims * (antiderivative(gamma_1) - antiderivative(gamma_0))


def discrete_diffusion_loss(gammas, s, num_dims):
    """D/2 sum_i expm1(gamma_i - gamma_{i-1}) Var(eps | z_{t_i}) over the grid gammas[0..T]."""
    gammas = np.asarray(gammas, np.float64)
    return 0.5 * num_dims * np.sum(np.expm1(np.diff(gammas)) * mse_per_dim(gammas[1:], s))


# Correlated Gaussian data under a cosine schedule ------------------------------------------------

GAMMA_0, GAMMA_1 = -10.0, 8.0
SCHEDULE = schedules.Cosine(GAMMA_0, GAMMA_1)  # nonlinear in t, so grids and gamma' are exercised
MIXING = np.array([[1.0, 0.0, 0.0], [0.6, 0.5, 0.0], [-0.3, 0.4, 0.3]])
COVARIANCE = MIXING @ MIXING.T
EIGENVALUES, EIGENVECTORS = np.linalg.eigh(COVARIANCE)


def gamma_fn(t):
    return SCHEDULE.apply({}, t)


def correlated_denoiser(parameterization="eps"):
    """The optimal prediction for x ~ N(0, COVARIANCE): eps_hat = sigma U diag(1 / v) U^T z."""
    vectors = jnp.asarray(EIGENVECTORS, jnp.float32)
    values = jnp.asarray(EIGENVALUES, jnp.float32)

    def denoise_fn(z, gamma):
        alpha, sigma = diffusion.alpha_sigma(gamma[:, None])
        eps = sigma * ((z @ vectors) / (alpha**2 * values + sigma**2)) @ vectors.T
        return diffusion.from_eps(eps, z, gamma, parameterization)

    return denoise_fn


def marginal_variances(gamma):
    """v = alpha^2 l + sigma^2 along the eigenvectors of Sigma (float64)."""
    alpha2 = 1.0 / (1.0 + np.exp(gamma))
    return alpha2 * EIGENVALUES + 1.0 - alpha2


def in_eigenbasis(diagonal):
    return (EIGENVECTORS * diagonal) @ EIGENVECTORS.T


def exact_flow(z_1, gamma):
    """The PF-ODE solution at gamma started from z_1 at gamma(1): U diag(sqrt(v / v_1)) U^T z_1."""
    return np.asarray(z_1, np.float64) @ in_eigenbasis(np.sqrt(marginal_variances(gamma) / marginal_variances(GAMMA_1)))
