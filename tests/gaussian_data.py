"""Closed forms for Gaussian data x ~ N(0, s^2 I), the reference the diffusion tests compare with."""
import numpy as np

from ddm_jax.diffusion import alpha_sigma, from_eps


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
