"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, app. D.2; FFJORD).

The PF-ODE dz/dt = f(t, z) (`samplers.probability_flow_drift`) carries the model's z_0
to z_1 deterministically; by the instantaneous change of variables d log p(z_t)/dt = -div f,

  log p_0(z_0) = log N(z_1; 0, I) + int_0^1 div f(z_t, t) dt,

solved jointly for (z_t, the integral) from t = 0 (data) to t = 1 (noise). The divergence is
exact (a sum over the D dimensions, D Jacobian-vector products: small D only) or Hutchinson's
unbiased estimate v^T (df/dz) v with one probe v per example, fixed for the whole solve.

For data x with the uniform dequantization the ODE starts at z_0 = alpha_0 x: the model of x
is z_0 / alpha_0, whose density is p_x(x) = alpha_0^D p_0(alpha_0 x) (`ode_bits_per_dim`
describes the decoder dequantization, which starts at z_0 ~ q(z_0 | x)). For x ~ N(0, S^2 I) and the optimal
denoiser, z_0 ~ N(0, (alpha_0^2 S^2 + sigma_0^2) I), so p_x = N(0, (S^2 + exp(gamma_0)) I).
"""

import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax.checks import check_choice, check_int
from ddm_jax.diffusion.elbo import bits_per_dim, decoder_nll, per_example_normal, sum_over_data_dims
from ddm_jax.diffusion.parameterization import PARAMETERIZATIONS
from ddm_jax.diffusion.process import encode, q_sample
from ddm_jax.diffusion.samplers import probability_flow_drift, solve_adaptive
from ddm_jax.diffusion.schedules import gamma_endpoints

PROBES = ("rademacher", "gaussian")


def divergence_probes(rng, shape, *, hutchinson: bool, probe: str = "rademacher") -> jax.Array:
    """Vectors v_p [P, *shape] with div f = sum_p v_p^T (df/dz) v_p, exactly or in expectation.

    Exact: the D standard basis vectors (P = D). Hutchinson: one probe (P = 1) with E[v v^T] = I,
    Rademacher (+-1) or standard normal.
    """
    if not hutchinson:
        num_dims = int(np.prod(shape[1:]))
        basis = jnp.eye(num_dims).reshape((num_dims, 1) + tuple(shape[1:]))
        return jnp.broadcast_to(basis, (num_dims,) + tuple(shape))
    if probe == "rademacher":
        return jax.random.rademacher(rng, (1,) + tuple(shape), jnp.float32)
    return jax.random.normal(rng, (1,) + tuple(shape))


def drift_and_divergence(drift, t, z, probes):
    """(f(t, z), sum_p v_p^T (df/dz) v_p [B]) by linearising f once and pushing each probe through."""
    f, jacobian_vector_product = jax.linearize(lambda z: drift(t, z), z)
    products = jax.vmap(jacobian_vector_product)(probes)
    return f, sum_over_data_dims(jnp.sum(probes * products, axis=0))


def standard_normal_log_density(z) -> jax.Array:
    """log N(z; 0, I) summed over dimensions: [B]."""
    return sum_over_data_dims(-0.5 * jnp.square(z) - 0.5 * np.log(2.0 * np.pi))


def ode_log_likelihood(
    rng,
    z_0,
    denoise_fn,
    gamma_fn,
    *,
    parameterization: str = "eps",
    hutchinson: bool = True,
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    initial_steps: int = 16,
):
    """log p_0(z_0) [B] nats under the PF-ODE model, and the NFE (see the module docstring).

    The batch is solved as one ODE (shared adaptive steps); rng draws the Hutchinson probes.
    """
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_choice("probe", probe, PROBES)
    drift = probability_flow_drift(denoise_fn, gamma_fn, parameterization)
    probes = divergence_probes(rng, z_0.shape, hutchinson=hutchinson, probe=probe)

    def augmented_drift(t, state):
        return drift_and_divergence(drift, t, state[0], probes)

    (z_1, divergence_integral), _, nfe = solve_adaptive(
        augmented_drift,
        (z_0, jnp.zeros(z_0.shape[0], z_0.dtype)),
        0.0,
        1.0,
        initial_steps=initial_steps,
        rtol=rtol,
        atol=atol,
    )
    return standard_normal_log_density(z_1) + divergence_integral, nfe


DEQUANTIZATIONS = ("uniform", "decoder")


def ode_bits_per_dim(
    rng,
    k,
    denoise_fn,
    gamma_fn,
    *,
    vocab_size: int,
    parameterization: str = "eps",
    dequantization: str = "uniform",
    hutchinson: bool = True,
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    initial_steps: int = 16,
):
    """Upper bound on -log2 P(k) / D for integer data k [B, ...]: [B], and the NFE.

    "uniform": x = encode(k) + u (2 / V), u ~ U(-1/2, 1/2)^D, uniform on the bin of width 2 / V
      around encode(k); by Jensen -log P(k) <= -E_u log p_x(x) - D log(2 / V), with
      log p_x(x) = log p_0(alpha_0 x) + D log alpha_0.
    "decoder": the VDM's own decoder and encoder around the ODE's density of z_0 (variational
      dequantization with q(z_0 | k) = N(alpha_0 x, sigma_0^2)):
      -log P(k) <= E_q [-log p(k | z_0) - log p_0(z_0) + log q(z_0 | k)],
      the ELBO with its prior and diffusion terms replaced by the exact ODE density: the figure
      to compare with the ELBO. A VDM trained on integer data with sigma_0 far below the bin
      width concentrates p_0 near the bin centres, where the uniform bound is loose; for a
      smooth density (Gaussian data) the uniform one is the tighter.
    One draw of u (or z_0) per example: an unbiased estimate of the bound.
    """
    check_int("vocab_size", vocab_size, minimum=2)
    check_choice("dequantization", dequantization, DEQUANTIZATIONS)
    rng_dequantize, rng_probe = jax.random.split(rng)
    num_dims = int(np.prod(k.shape[1:]))
    gamma_0, _ = gamma_endpoints(gamma_fn)
    log_alpha_0 = 0.5 * jax.nn.log_sigmoid(-gamma_0)
    x = encode(k, vocab_size)
    if dequantization == "uniform":
        bin_width = 2.0 / vocab_size
        x = x + (jax.random.uniform(rng_dequantize, k.shape) - 0.5) * bin_width
        z_0 = jnp.exp(log_alpha_0) * x
        nats_given_ode = lambda log_p_z: -(log_p_z + num_dims * log_alpha_0) - num_dims * np.log(bin_width)
    else:
        eps = per_example_normal(rng_dequantize, k.shape)
        z_0 = q_sample(x, gamma_0, eps)
        log_q = standard_normal_log_density(eps) - 0.5 * num_dims * jax.nn.log_sigmoid(gamma_0)
        decoder_nats = decoder_nll(k, z_0, gamma_0, vocab_size)
        nats_given_ode = lambda log_p_z: decoder_nats - log_p_z + log_q
    log_p_z, nfe = ode_log_likelihood(
        rng_probe,
        z_0,
        denoise_fn,
        gamma_fn,
        parameterization=parameterization,
        hutchinson=hutchinson,
        probe=probe,
        rtol=rtol,
        atol=atol,
        initial_steps=initial_steps,
    )
    return bits_per_dim(nats_given_ode(log_p_z), num_dims), nfe
