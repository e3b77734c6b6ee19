"""A Variational Diffusion Model: a gamma schedule and a noise-prediction network.

Parameters are the plain pytree {"schedule": ..., "network": ...}. The per-example ELBO
(DESIGN.md, VDM eq. 11) in nats:
  1. reconstruction -E log p(k | z_0),  2. prior KL(q(z_1 | x) || N(0, I)),
  3. diffusion, continuous (T = 0) or with T steps.
Training minimises bits/dim (loss="elbo") or DDPM's L_simple per dimension (loss="simple");
the ELBO terms are reported either way. A learned schedule's endpoints follow the ELBO and its
shape parameters follow the gradient of E[L_diffusion^2] (`value_and_grad`).

Under pmap, pass the data-parallel `axis_name`: each device's batch is then its shard of the
global batch, with the global batch's t and noise for its rows (diffusion.shard_rows), so the
terms equal those of the whole batch under jit. Dropout masks are drawn per device.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from ddm_jax.diffusion import (SHAPE_PARAMS, WEIGHTINGS, bits_per_dim,
                               build_schedule, check_parameterization, denoising_loss,
                               diffusion_weight, encode, per_example_normal, prior_loss,
                               reconstruction_logits, reconstruction_loss, sample_times, shard_rows)
from ddm_jax.diffusion.samplers import sample as run_sampler
from ddm_jax.models import NETWORKS, as_denoise_fn, build_network


@dataclasses.dataclass(frozen=True)
class VDM:
    schedule: nn.Module
    network: nn.Module
    vocab_size: int
    T: int = 0
    parameterization: str = "eps"
    loss: str = "elbo"
    antithetic: bool = True

    def __post_init__(self):
        check_parameterization(self.parameterization)
        if self.loss not in WEIGHTINGS:
            raise ValueError(f"model.loss={self.loss!r} is not one of {WEIGHTINGS}")
        if not (isinstance(self.T, int) and self.T >= 0):
            raise ValueError(f"model.T={self.T!r} must be 0 (continuous time) or a number of steps >= 1")
        if not (isinstance(self.vocab_size, int) and self.vocab_size >= 2):
            raise ValueError(f"data.vocab_size={self.vocab_size!r} must be an integer >= 2")

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
        return as_denoise_fn(self.network, {"params": network_params}, train=train,
                             rng=rng if train else None, cond=cond)

    def has_learned_shape(self, params) -> bool:
        return SHAPE_PARAMS in params["schedule"]

    # The ELBO ------------------------------------------------------------------------------------

    def schedule_values(self, schedule_params, t):
        """What the loss needs of the schedule: gamma_0, gamma_1, gamma_t and the diffusion weight w_t."""
        gamma_fn = self.gamma_fn(schedule_params)
        gamma_ends = gamma_fn(jnp.array([0.0, 1.0]))
        gamma_t, weight = diffusion_weight(gamma_fn, t, T=self.T)
        return {"gamma_0": gamma_ends[0], "gamma_1": gamma_ends[1], "gamma_t": gamma_t, "weight": weight}

    def terms_given_schedule(self, network_params, schedule, rng, k, *, cond=None, train=False,
                             axis_name=None):
        """Per-example terms [B]: reconstruction, prior, diffusion (nats), bpd, simple (L_simple / D), loss."""
        rng_recon, rng_eps, rng_dropout = jax.random.split(rng, 3)
        rows, _ = shard_rows(k.shape[0], axis_name)
        if axis_name is not None:
            rng_dropout = jax.random.fold_in(rng_dropout, jax.lax.axis_index(axis_name))
        x = encode(k, self.vocab_size)
        num_dims = math.prod(k.shape[1:])
        denoise_fn = self.denoise_fn(network_params, cond=cond, train=train, rng=rng_dropout)
        eps = per_example_normal(rng_eps, x.shape, rows)
        eps_mse = denoising_loss(x, eps, schedule["gamma_t"], 2.0, denoise_fn,
                                 parameterization=self.parameterization)
        terms = {
            "reconstruction": reconstruction_loss(rng_recon, k, schedule["gamma_0"], vocab_size=self.vocab_size,
                                                  rows=rows),
            "prior": prior_loss(x, schedule["gamma_1"]),
            "diffusion": 0.5 * schedule["weight"] * eps_mse,
            "simple": eps_mse / num_dims,
        }
        nats = terms["reconstruction"] + terms["prior"] + terms["diffusion"]
        terms["bpd"] = bits_per_dim(nats, num_dims)
        terms["loss"] = terms["bpd"] if self.loss == "elbo" else terms["simple"]
        return terms

    def times(self, rng, batch_size: int, axis_name=None):
        """t [b] of this shard's examples (the whole batch without `axis_name`)."""
        rows, global_batch_size = shard_rows(batch_size, axis_name)
        return sample_times(rng, global_batch_size, T=self.T, antithetic=self.antithetic, rows=rows)

    def elbo_terms(self, params, rng, k, *, cond=None, train=False, axis_name=None):
        """Per-example ELBO terms of a batch of integer data k [B, H, W, C], one time sample each."""
        rng_t, rng = jax.random.split(rng)
        schedule = self.schedule_values(params["schedule"], self.times(rng_t, k.shape[0], axis_name))
        return self.terms_given_schedule(params["network"], schedule, rng, k, cond=cond, train=train,
                                         axis_name=axis_name)

    def value_and_grad(self, params, rng, k, *, cond=None, axis_name=None):
        """((mean loss, per-example terms), gradients), in training mode (dropout on).

        One backward pass gives each example's cotangent at (gamma_t, w_t); the schedule's vjp maps it
        to the endpoint gradients, and, scaled by 2 L_diffusion (bits/dim), to the gradient of
        E[L_diffusion^2] for the shape parameters: the VDM's variance-minimising schedule update.
        Under pmap (`axis_name`) the loss and gradients are this shard's; the caller pmeans them.
        """
        rng_t, rng = jax.random.split(rng)
        t = self.times(rng_t, k.shape[0], axis_name)
        schedule, schedule_vjp = jax.vjp(lambda p: self.schedule_values(p, t), params["schedule"])

        def mean_loss(network_params, schedule):
            terms = self.terms_given_schedule(network_params, schedule, rng, k, cond=cond, train=True,
                                              axis_name=axis_name)
            return terms["loss"].mean(), terms

        (loss, terms), (network_grads, schedule_cotangent) = jax.value_and_grad(
            mean_loss, argnums=(0, 1), has_aux=True)(params["network"], schedule)
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

    def sample(self, params, rng, num: int, image_shape, *, steps: int, cond=None, sampler: str = "ancestral",
               return_nfe: bool = False, **settings):
        """Integer samples k [num, *image_shape]: z_0 by `sampler` (diffusion.SAMPLERS) in `steps` steps
        from z_1 ~ N(0, I), then k ~ p(k | z_0). `settings` go to the sampler (e.g. eta, grid).
        With return_nfe, (k, the number of network evaluations): `steps`, or the ODE solver's count."""
        rng_z, rng_k = jax.random.split(rng)
        gamma_fn = self.gamma_fn(params["schedule"])
        z_0 = run_sampler(sampler, rng_z, self.denoise_fn(params["network"], cond=cond), gamma_fn,
                          (num, *image_shape), steps=steps, parameterization=self.parameterization, **settings)
        z_0, nfe = z_0 if sampler == "ode" else (z_0, jnp.asarray(steps))
        logits = reconstruction_logits(z_0, gamma_fn(jnp.zeros(())), self.vocab_size)
        k = jax.random.categorical(rng_k, logits)
        return (k, nfe) if return_nfe else k


LEARNED_SCHEDULES = ("learned_linear", "learned_monotone")


def schedule_from_config(cfg) -> nn.Module:
    """The schedule of config.model (its fields: schedule, gamma_min, gamma_max and per-schedule ones)."""
    if cfg.schedule == "ddpm_linear":
        if cfg.T < 1:
            raise ValueError(f"model.schedule='ddpm_linear' needs model.T >= 1 (N = T + 1 betas); got model.T={cfg.T}")
        beta_start, beta_end = cfg.ddpm_betas
        return build_schedule("ddpm_linear", num_betas=cfg.T + 1, beta_start=beta_start, beta_end=beta_end)
    kwargs = {"gamma_min": cfg.gamma_min, "gamma_max": cfg.gamma_max}
    if cfg.schedule == "learned_monotone":
        kwargs.update(n_features=cfg.schedule_features, learn_endpoints=cfg.learn_endpoints)
    return build_schedule(cfg.schedule, **kwargs)


def build_vdm(cfg, image_shape, vocab_size: int, cond_dim: int | None = None) -> VDM:
    """The VDM that config.model describes, for data of `image_shape` with `vocab_size` values,
    its network conditioned on a `cond_dim` vector when given (e.g. the augmentation applied).

    Every check that needs no compilation happens here: names, ranges, and whether the network
    takes the image shape.
    """
    if cfg.loss == "simple" and cfg.schedule in LEARNED_SCHEDULES:
        raise ValueError(
            f"model.loss='simple' gives a learned schedule no training signal; use a fixed "
            f"model.schedule (fixed_linear, cosine, ddpm_linear), not {cfg.schedule!r}")
    schedule = schedule_from_config(cfg)
    if cfg.network not in NETWORKS:
        raise ValueError(f"model.network={cfg.network!r} is not one of {tuple(NETWORKS)}")
    network = build_network(cfg.network, gamma_min=cfg.gamma_min, gamma_max=cfg.gamma_max,
                            cond_dim=cond_dim, **cfg[cfg.network].to_dict())
    network.check_input_shape(tuple(image_shape))
    return VDM(schedule=schedule, network=network, vocab_size=vocab_size, T=cfg.T,
               parameterization=cfg.parameterization, loss=cfg.loss,
               antithetic=cfg.antithetic_time_sampling)
