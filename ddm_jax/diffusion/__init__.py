"""Diffusion as a latent-variable model: pure functions, no network, trainer or dataset.

Conventions (docs/conventions.md): t in [0, 1], t = 0 data, gamma(t) = -log SNR(t) increasing,
alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t), z_t = alpha_t x + sigma_t eps.
"""

from ddm_jax.diffusion.elbo import (
    WEIGHTINGS,
    bits_per_dim,
    decoder_nll,
    denoising_loss,
    diffusion_draws,
    diffusion_loss,
    diffusion_weight,
    loss_weight,
    per_example_normal,
    per_example_uniform,
    prior_loss,
    reconstruction_logits,
    reconstruction_loss,
    sample_times,
    shard_rows,
    sum_over_data_dims,
)
from ddm_jax.diffusion.guidance import guided_denoise_fn
from ddm_jax.diffusion.likelihood import ode_bits_per_dim, ode_log_likelihood
from ddm_jax.diffusion.parameterization import PARAMETERIZATIONS, eps_from, from_eps, target_and_eps_scale, x0_from_eps
from ddm_jax.diffusion.process import alpha_sigma, decode, encode, posterior, posterior_coefficient, q_sample
from ddm_jax.diffusion.samplers import (
    SAMPLERS,
    ancestral_sample,
    ancestral_step,
    ddim_invert,
    ddim_sample,
    ddim_step,
    dpm_solver_pp_sample,
    dpm_solver_pp_step,
    ode_sample,
    probability_flow_drift,
    sample,
)
from ddm_jax.diffusion.schedules import SCHEDULES, SHAPE_PARAMS, build_schedule, gamma_endpoints
from ddm_jax.diffusion.time_grids import GRIDS, time_grid
