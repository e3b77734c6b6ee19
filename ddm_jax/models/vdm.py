"""A Variational Diffusion Model (Kingma et al. 2021): a gamma schedule and a noise-prediction network.

Parameters are the plain pytree {"schedule": ..., "network": ...}. The per-example ELBO
(VDM eq. 11) in nats is the sum of the three public terms of `ddm_jax.diffusion`:
  1. reconstruction_loss,  2. prior_loss,  3. diffusion_loss (continuous, T = 0, or T steps),
with (rng_reconstruction, rng_diffusion, rng_dropout) = jax.random.split(rng, 3); `elbo_terms`
computes exactly those. Training minimises the weighted bound in bits/dim: the ELBO
(weighting="elbo") or, with weighting="simple", the reconstruction and prior terms plus DDPM's
L_simple, whose network gradient is L_simple's. A learned schedule's endpoints follow the ELBO and
its shape parameters follow the gradient of E[L_diffusion^2] (`value_and_grad`; VDM section 5.2).

Under pmap, pass the data-parallel `axis_name`: each device's batch is then its shard of the
global batch, with the global batch's t and noise for its rows (diffusion.shard_rows), so the
terms equal those of the whole batch under jit. Dropout masks are drawn per device.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from ddm_jax.checks import check_choice, check_int
from ddm_jax.diffusion import (
    PARAMETERIZATIONS,
    SHAPE_PARAMS,
    WEIGHTINGS,
    bits_per_dim,
    denoising_loss,
    diffusion_draws,
    diffusion_weight,
    encode,
    gamma_endpoints,
    loss_weight,
    prior_loss,
    reconstruction_logits,
    reconstruction_loss,
    sample,
    shard_rows,
)
from ddm_jax.models.networks import as_denoise_fn


class Draws(NamedTuple):
    """The randomness of one estimate of the terms for a shard: its rows, t and eps, and the keys
    of the reconstruction noise and of dropout."""

    rows: jax.Array | None
    t: jax.Array
    eps: jax.Array
    rng_reconstruction: jax.Array
    rng_dropout: jax.Array


@dataclasses.dataclass(frozen=True)
class VDM:
    """schedule: a gamma schedule module (`diffusion.SCHEDULES`); network: eps_hat(z, gamma) module;
    vocab_size: V of the integer data; T: 0 for continuous time, else the number of steps;
    parameterization: what the network predicts; weighting: the training loss (`diffusion.WEIGHTINGS`);
    antithetic: low-discrepancy time sampling."""

    schedule: nn.Module
    network: nn.Module
    vocab_size: int
    T: int = 0
    parameterization: str = "eps"
    weighting: str = "elbo"
    antithetic: bool = True

    def __post_init__(self):
        check_choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_int("T", self.T, minimum=0)
        check_int("vocab_size", self.vocab_size, minimum=2)

    # Parameters and the two functions the diffusion code takes ---------------------------------

    def init(self, rng, image_shape):
        rng_schedule, rng_network = jax.random.split(rng)
        schedule = self.schedule.init(rng_schedule, jnp.zeros((1,)))
        z = jnp.zeros((1, *image_shape))
        cond_dim = getattr(self.network, "cond_dim", None)
        cond = None if cond_dim is None else jnp.zeros((1, cond_dim))
        network = self.network.init(rng_network, z, jnp.zeros((1,)), cond=cond)
        return {"schedule": schedule.get("params", {}), "network": network.get("params", {})}

    def gamma_fn(self, schedule_params):
        return lambda t: self.schedule.apply({"params": schedule_params}, t)

    def denoise_fn(self, network_params, *, cond=None, train=False, rng=None):
        return as_denoise_fn(
            self.network, {"params": network_params}, train=train, rng=rng if train else None, cond=cond
        )

    def has_learned_shape(self, params) -> bool:
        return SHAPE_PARAMS in params["schedule"]

    # The ELBO ------------------------------------------------------------------------------------

    def draws(self, rng, shape, axis_name=None) -> Draws:
        """The draws of a shard of `shape` [b, ...] (the whole batch without `axis_name`)."""
        rng_reconstruction, rng_diffusion, rng_dropout = jax.random.split(rng, 3)
        rows, batch_size = shard_rows(shape[0], axis_name)
        t, eps = diffusion_draws(
            rng_diffusion, shape, T=self.T, antithetic=self.antithetic, rows=rows, batch_size=batch_size
        )
        if axis_name is not None:
            rng_dropout = jax.random.fold_in(rng_dropout, jax.lax.axis_index(axis_name))
        return Draws(rows, t, eps, rng_reconstruction, rng_dropout)

    def schedule_values(self, schedule_params, t) -> dict:
        """What the terms need of the schedule: gamma_0, gamma_1, gamma_t and the ELBO's weight w_t."""
        gamma_fn = self.gamma_fn(schedule_params)
        gamma_0, gamma_1 = gamma_endpoints(gamma_fn)
        gamma_t, weight = diffusion_weight(gamma_fn, t, T=self.T)
        return {"gamma_0": gamma_0, "gamma_1": gamma_1, "gamma_t": gamma_t, "weight": weight}

    def terms_given_schedule(self, network_params, schedule, draws: Draws, k, *, weighting, cond=None, train=False):
        """Per-example terms [B]: reconstruction, prior, diffusion (weighted by `weighting`), in nats,
        and bpd, their sum in bits/dim (the ELBO when weighting="elbo")."""
        x = encode(k, self.vocab_size)
        denoise_fn = self.denoise_fn(network_params, cond=cond, train=train, rng=draws.rng_dropout)
        weight = loss_weight(weighting, schedule["gamma_t"], schedule["weight"])
        terms = {
            "reconstruction": reconstruction_loss(
                draws.rng_reconstruction, k, schedule["gamma_0"], vocab_size=self.vocab_size, rows=draws.rows
            ),
            "prior": prior_loss(x, schedule["gamma_1"]),
            "diffusion": denoising_loss(
                x, draws.eps, schedule["gamma_t"], weight, denoise_fn, parameterization=self.parameterization
            ),
        }
        terms["bpd"] = bits_per_dim(
            terms["reconstruction"] + terms["prior"] + terms["diffusion"], math.prod(k.shape[1:])
        )
        return terms

    def elbo_terms(self, params, rng, k, *, cond=None, train=False, axis_name=None):
        """The ELBO's per-example terms [B] of integer data k [B, H, W, C], one draw of (t, eps) each."""
        draws = self.draws(rng, k.shape, axis_name)
        schedule = self.schedule_values(params["schedule"], draws.t)
        return self.terms_given_schedule(
            params["network"], schedule, draws, k, weighting="elbo", cond=cond, train=train
        )

    def value_and_grad(self, params, rng, k, *, cond=None, axis_name=None):
        """((mean loss, per-example terms), gradients), in training mode (dropout on).

        One backward pass gives each example's cotangent at (gamma_t, w_t); the schedule's vjp maps it
        to the endpoint gradients, and, scaled by 2 L_diffusion (bits/dim), to the gradient of
        E[L_diffusion^2] for the shape parameters: the VDM's variance-minimising schedule update.
        Under pmap (`axis_name`) the loss and gradients are this shard's; the caller pmeans them.
        """
        draws = self.draws(rng, k.shape, axis_name)
        schedule, schedule_vjp = jax.vjp(lambda p: self.schedule_values(p, draws.t), params["schedule"])

        def mean_loss(network_params, schedule):
            terms = self.terms_given_schedule(
                network_params, schedule, draws, k, weighting=self.weighting, cond=cond, train=True
            )
            return terms["bpd"].mean(), terms

        (loss, terms), (network_grads, schedule_cotangent) = jax.value_and_grad(
            mean_loss, argnums=(0, 1), has_aux=True
        )(params["network"], schedule)
        (schedule_grads,) = schedule_vjp(schedule_cotangent)
        if self.has_learned_shape(params):
            scale = 2.0 * bits_per_dim(terms["diffusion"], math.prod(k.shape[1:]))
            variance_cotangent = {
                "gamma_0": jnp.zeros_like(schedule_cotangent["gamma_0"]),
                "gamma_1": jnp.zeros_like(schedule_cotangent["gamma_1"]),
                "gamma_t": scale * schedule_cotangent["gamma_t"],
                "weight": scale * schedule_cotangent["weight"],
            }
            (variance_grads,) = schedule_vjp(variance_cotangent)
            schedule_grads = {**schedule_grads, SHAPE_PARAMS: variance_grads[SHAPE_PARAMS]}
        return (loss, terms), {"schedule": schedule_grads, "network": network_grads}

    # Generation ----------------------------------------------------------------------------------

    def sample(
        self, params, rng, num: int, image_shape, *, steps: int, cond=None, sampler: str = "ancestral", **settings
    ):
        """(k, info): integer samples k [num, *image_shape] and the sampler's info (its "nfe").

        z_0 by `sampler` (a key of diffusion.SAMPLERS) in `steps` steps from z_1 ~ N(0, I), then
        k ~ p(k | z_0). `settings` go to the sampler (e.g. eta, grid).
        """
        rng_z, rng_k = jax.random.split(rng)
        gamma_fn = self.gamma_fn(params["schedule"])
        denoise_fn = self.denoise_fn(params["network"], cond=cond)
        z_0, info = sample(
            sampler,
            rng_z,
            denoise_fn,
            gamma_fn,
            (num, *image_shape),
            steps=steps,
            parameterization=self.parameterization,
            **settings,
        )
        gamma_0, _ = gamma_endpoints(gamma_fn)
        return jax.random.categorical(rng_k, reconstruction_logits(z_0, gamma_0, self.vocab_size)), info
