"""What the network predicts, and exact conversions between the four choices.

With z = alpha x + sigma eps (alpha^2 + sigma^2 = 1):
  eps   : the noise,                      eps   = (z - alpha x) / sigma
  x0    : the data,                       x     = (z - sigma eps) / alpha
  v     : v = alpha eps - sigma x,        eps   = sigma z + alpha v
  score : grad log q(z_t) = -eps / sigma  (Tweedie)
"""

import jax.numpy as jnp

from ddm_jax.checks import check_choice
from ddm_jax.diffusion.process import alpha_sigma, broadcast_to_data

PARAMETERIZATIONS = ("eps", "x0", "v", "score")


def _coefficients(z, gamma):
    return alpha_sigma(broadcast_to_data(gamma, z))


def eps_from(prediction, z, gamma, parameterization: str):
    """The noise prediction eps_hat equivalent to `prediction` of the given kind."""
    alpha, sigma = _coefficients(z, gamma)
    if parameterization == "eps":
        return prediction
    if parameterization == "x0":
        return (z - alpha * prediction) / sigma
    if parameterization == "v":
        return sigma * z + alpha * prediction
    if parameterization == "score":
        return -sigma * prediction
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)


def from_eps(eps, z, gamma, parameterization: str):
    """The prediction of the given kind equivalent to the noise prediction `eps`."""
    alpha, sigma = _coefficients(z, gamma)
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return (z - sigma * eps) / alpha
    if parameterization == "v":
        return (eps - sigma * z) / alpha
    if parameterization == "score":
        return -eps / sigma
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)


def x0_from_eps(eps, z, gamma):
    """x_hat = (z - sigma eps_hat) / alpha."""
    alpha, sigma = _coefficients(z, gamma)
    return (z - sigma * eps) / alpha


def target_and_eps_scale(x, eps, z, gamma, parameterization: str):
    """The regression target of a parameterization and the factor that maps its error to eps-space.

    eps - eps_hat = +-scale * (target - prediction), exactly: + for eps and v, - for x0 and score
    (whose predictions fall as eps_hat rises), so |eps - eps_hat| = scale |target - prediction|, with
      eps: (eps, 1), x0: (x, alpha / sigma = exp(-gamma / 2)), v: (v, alpha), score: (-eps / sigma, sigma).
    Computing the loss this way never divides the prediction by a small sigma.
    """
    alpha, sigma = _coefficients(z, gamma)
    if parameterization == "eps":
        return eps, jnp.ones_like(alpha)
    if parameterization == "x0":
        return x, jnp.exp(-0.5 * broadcast_to_data(gamma, z))
    if parameterization == "v":
        return alpha * eps - sigma * x, alpha
    if parameterization == "score":
        return -eps / sigma, sigma
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
