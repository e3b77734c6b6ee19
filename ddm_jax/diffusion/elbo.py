"""The VDM evidence lower bound as pure functions, in nats per example.

-log p(k) <= reconstruction + prior + diffusion   (Kingma et al. 2021, "Variational Diffusion Models", eq. 11)
  1. reconstruction: -E_{q(z_0|x)} log p(k | z_0), a softmax over the V data values per dimension.
  2. prior:          KL(q(z_1 | x) || N(0, I)), in closed form.
  3. diffusion:      continuous time (T = 0): 1/2 E_t [gamma'(t) ||eps - eps_hat(z_t; gamma_t)||^2],
                     T steps:                 T/2 E_i [expm1(gamma_t - gamma_s) ||eps - eps_hat||^2].
DDPM's L_simple = E ||eps - eps_hat||^2 (Ho et al. 2020, Algorithm 1) is the diffusion term with
w(t) = 2 (`WEIGHTINGS`); docs/conventions.md states every convention used here.

Randomness is drawn per example from (rng, row): row b of a batch gets the same t and noise
whichever device or process holds it, so a batch split over devices (jit over a mesh, pmap,
several hosts) sees the draws of the whole batch. `rows` [b] are the positions of a shard's
examples in the batch (default: the whole batch, 0..B-1).
"""

import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax.checks import check_choice, check_int
from ddm_jax.diffusion.parameterization import PARAMETERIZATIONS, target_and_eps_scale
from ddm_jax.diffusion.process import alpha_sigma, encode, q_sample


def sum_over_data_dims(x: jax.Array) -> jax.Array:
    """[B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).sum(-1)


def bits_per_dim(nats: jax.Array, num_dims: int) -> jax.Array:
    """nats / (D ln 2)."""
    return nats / (num_dims * np.log(2.0))


# 1. Reconstruction ---------------------------------------------------------------------------


def reconstruction_logits(z_0: jax.Array, gamma_0: jax.Array, vocab_size: int) -> jax.Array:
    """log N(z_0; alpha_0 x_v, sigma_0^2) over the V values x_v, up to a constant: [..., V].

    Written as -SNR_0 (z_0 / alpha_0 - x_v)^2 / 2, the form that stays accurate for gamma_0 << 0.
    """
    x_values = encode(jnp.arange(vocab_size), vocab_size)
    alpha_0, _ = alpha_sigma(gamma_0)
    return -0.5 * jnp.exp(-gamma_0) * jnp.square(z_0[..., None] / alpha_0 - x_values)


def reconstruction_loss(rng: jax.Array, k: jax.Array, gamma_0, *, vocab_size: int, rows=None) -> jax.Array:
    """-log p(k | z_0) with z_0 ~ q(z_0 | x), summed over dimensions: [B] nats.

    gamma_0 is a scalar (the schedule at t = 0); the noise of example b is `per_example_normal`'s.
    """
    z_0 = q_sample(encode(k, vocab_size), gamma_0, per_example_normal(rng, k.shape, rows))
    return decoder_nll(k, z_0, gamma_0, vocab_size)


def decoder_nll(k: jax.Array, z_0: jax.Array, gamma_0, vocab_size: int) -> jax.Array:
    """-log p(k | z_0), the softmax of `reconstruction_logits` at k, summed over dimensions: [B] nats."""
    logits = reconstruction_logits(z_0, gamma_0, vocab_size)
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), k[..., None].astype(jnp.int32), -1)
    return -sum_over_data_dims(log_p[..., 0])


# 2. Prior ------------------------------------------------------------------------------------


def prior_loss(x: jax.Array, gamma_1) -> jax.Array:
    """KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) = 1/2 (sigma_1^2 + alpha_1^2 x^2 - 1 - log sigma_1^2), summed: [B]."""
    sigma2 = jax.nn.sigmoid(gamma_1)
    alpha2 = jax.nn.sigmoid(-gamma_1)
    log_sigma2 = jax.nn.log_sigmoid(gamma_1)
    return sum_over_data_dims(0.5 * (sigma2 + alpha2 * jnp.square(x) - 1.0 - log_sigma2))


# Per-example randomness ----------------------------------------------------------------------


def batch_rows(rows, batch_size: int) -> jax.Array:
    """The rows of a shard as an array: `rows`, or 0..batch_size-1 when None."""
    return jnp.arange(batch_size) if rows is None else jnp.asarray(rows)


def shard_rows(local_batch_size: int, axis_name: str | None = None) -> tuple[jax.Array | None, int]:
    """(rows, B) of this shard's examples: under pmap over `axis_name`, shard i of n holds rows
    [i b, (i + 1) b) of a batch of B = n b; without an axis, (None, b): the whole batch."""
    if axis_name is None:
        return None, local_batch_size
    first = jax.lax.axis_index(axis_name) * local_batch_size
    return first + jnp.arange(local_batch_size), local_batch_size * jax.lax.axis_size(axis_name)


def per_example_uniform(rng: jax.Array, batch_size: int, rows=None) -> jax.Array:
    """U(0, 1) draws [b] whose example b is uniform(fold_in(rng, rows[b])) (rows default 0..batch_size-1)."""
    return jax.vmap(lambda row: jax.random.uniform(jax.random.fold_in(rng, row)))(batch_rows(rows, batch_size))


def per_example_normal(rng: jax.Array, shape, rows=None) -> jax.Array:
    """Noise [b, *shape[1:]] whose example b is normal(fold_in(rng, rows[b])) (rows default 0..b-1)."""
    rows = batch_rows(rows, shape[0])
    return jax.vmap(lambda row: jax.random.normal(jax.random.fold_in(rng, row), shape[1:]))(rows)


# 3. Diffusion --------------------------------------------------------------------------------


def sample_times(rng: jax.Array, batch_size: int, *, T: int = 0, antithetic: bool = True, rows=None) -> jax.Array:
    """t for the `rows` of a batch of `batch_size` (default: all B of them): in [0, 1) for T = 0,
    on the grid {1/T, ..., 1} for T > 0 steps.

    Low-discrepancy t_b = mod(u + b / B, 1) with one u per batch (VDM, appendix I.1), or i.i.d.
    uniform(fold_in(rng, b)), both in [0, 1). With T > 0, t is rounded up onto the grid, so
    s = t - 1/T >= 0.
    """
    if antithetic:
        t = jnp.mod(jax.random.uniform(rng) + batch_rows(rows, batch_size) / batch_size, 1.0)
    else:
        t = per_example_uniform(rng, batch_size, rows)
    if T > 0:
        t = (jnp.floor(t * T) + 1.0) / T
    return t


def diffusion_draws(
    rng: jax.Array, shape, *, T: int = 0, antithetic: bool = True, rows=None, batch_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """(t [b], eps [b, ...]) of the diffusion term's estimate for a shard of `shape` [b, ...].

    The shard holds `rows` of a batch of `batch_size` (default: the whole batch, b rows); `rng`
    splits into the times' and the noise's keys, so a shard sees the draws of the whole batch.
    """
    rng_t, rng_eps = jax.random.split(rng)
    batch_size = shape[0] if batch_size is None else batch_size
    t = sample_times(rng_t, batch_size, T=T, antithetic=antithetic, rows=rows)
    return t, per_example_normal(rng_eps, shape, rows)


def diffusion_weight(gamma_fn, t: jax.Array, *, T: int = 0) -> tuple[jax.Array, jax.Array]:
    """(gamma_t, w_t) such that the ELBO's diffusion term is 1/2 w_t ||eps - eps_hat||^2.

    Continuous time (VDM eq. 17): w_t = gamma'(t), by forward-mode autodiff of gamma_fn.
    T steps (VDM eq. 15):         w_t = T expm1(gamma_t - gamma_s), s = t - 1/T.
    """
    if T == 0:
        return jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
    gamma_t = gamma_fn(t)
    gamma_s = gamma_fn(t - 1.0 / T)
    return gamma_t, T * jnp.expm1(gamma_t - gamma_s)


MIN_SNR_GAMMA = 5.0  # The clip of "min_snr" (Hang et al. 2023's default).

# The weighting w(t) of the diffusion loss 1/2 E[w(t) ||eps - eps_hat||^2], given gamma_t and the
# ELBO's weight w_t: the ELBO itself; DDPM's L_simple = E||eps - eps_hat||^2 (Ho et al. 2020,
# eq. 14), i.e. w = 2; or Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via
# Min-SNR Weighting Strategy", eq. 8 in eps form): L_simple times min(SNR, gamma) / SNR, which
# keeps L_simple where SNR(t) <= gamma and down-weights the low-noise steps; or the MSE of
# v = alpha eps - sigma x (Salimans & Ho 2022, the loss of SD 2's v-prediction models):
# ||v - v_hat||^2 = (1 + 1/SNR) ||eps - eps_hat||^2, which weights the high-noise steps up. A new
# loss (e.g. a weighting of Kingma & Gao 2023) is one more entry here.
WEIGHTINGS = {
    "elbo": lambda gamma_t, elbo_weight: elbo_weight,
    "simple": lambda gamma_t, elbo_weight: jnp.full_like(elbo_weight, 2.0),
    "min_snr": lambda gamma_t, elbo_weight: 2.0 * jnp.minimum(1.0, MIN_SNR_GAMMA * jnp.exp(gamma_t)),
    "v_mse": lambda gamma_t, elbo_weight: 2.0 * (1.0 + jnp.exp(gamma_t)),
}


def loss_weight(weighting: str, gamma_t: jax.Array, elbo_weight: jax.Array) -> jax.Array:
    """w(t) of `weighting` (a key of WEIGHTINGS) at gamma_t, from the ELBO's weight w_t."""
    check_choice("weighting", weighting, WEIGHTINGS)
    return WEIGHTINGS[weighting](gamma_t, elbo_weight)


def denoising_loss(x, eps, gamma_t, weight, denoise_fn, *, parameterization: str = "eps") -> jax.Array:
    """1/2 w ||eps - eps_hat(z_t; gamma_t)||^2 summed over dimensions, for given t and eps: [B].

    The prediction is compared with its own target and mapped to eps-space by an exact factor
    (`target_and_eps_scale`), so equivalent predictions in any parameterization give this loss.
    """
    z_t = q_sample(x, gamma_t, eps)
    prediction = denoise_fn(z_t, gamma_t)
    target, scale = target_and_eps_scale(x, eps, z_t, gamma_t, parameterization)
    return 0.5 * weight * sum_over_data_dims(jnp.square(scale * (target - prediction)))


def diffusion_loss(
    rng: jax.Array,
    x: jax.Array,
    denoise_fn,
    gamma_fn,
    *,
    T: int = 0,
    parameterization: str = "eps",
    antithetic: bool = True,
    weighting: str = "elbo",
    rows=None,
    batch_size: int | None = None,
) -> jax.Array:
    """One-sample estimate of 1/2 E_{t, eps}[w(t) ||eps - eps_hat(z_t; gamma_t)||^2] per example: [B] nats.

    With weighting="elbo" this is the ELBO's diffusion term (continuous time for T = 0, else T
    steps); "simple" gives DDPM's L_simple summed over dimensions. Args:
      rng: the key of the draws (t, eps) (`diffusion_draws`).
      x: encoded data [B, ...] (this shard's rows of the batch when `rows` is given).
      denoise_fn: (z_t, gamma_t [B]) -> the prediction `parameterization` names.
      gamma_fn: t [B] -> gamma [B], increasing and differentiable.
      T: 0 for continuous time, else the number of steps (a Python int >= 0).
      parameterization: what denoise_fn predicts, a key of PARAMETERIZATIONS ("eps", "x0", "v",
        "score"); its error is mapped to eps-space exactly (`target_and_eps_scale`).
      antithetic: low-discrepancy times (one uniform per batch) instead of i.i.d. ones.
      weighting: w(t), a key of WEIGHTINGS ("elbo", "simple", "min_snr", "v_mse").
      rows, batch_size: this shard's positions in a batch of batch_size (default: all of x).
    """
    check_int("T", T, minimum=0)
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_choice("weighting", weighting, WEIGHTINGS)
    t, eps = diffusion_draws(rng, x.shape, T=T, antithetic=antithetic, rows=rows, batch_size=batch_size)
    gamma_t, elbo_weight = diffusion_weight(gamma_fn, t, T=T)
    weight = loss_weight(weighting, gamma_t, elbo_weight)
    return denoising_loss(x, eps, gamma_t, weight, denoise_fn, parameterization=parameterization)
