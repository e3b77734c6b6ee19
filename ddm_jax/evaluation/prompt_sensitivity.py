"""How far one word of the prompt moves a latent diffusion model's prediction.

For prompt pairs (a_i, b_i) that differ in one word, clean latents x_i and SD timestep n:
z_i = alpha_n x_i + sigma_n eps_i (the same eps_i for a_i and b_i) and

  sensitivity(n) = RMS over i and the latent's dimensions of x0_hat(z_i; a_i) - x0_hat(z_i; b_i),

x0_hat the clean latent the model predicts (`diffusion.x0_from_eps` of its prediction, whatever
its parameterization). A word the model ignores moves nothing: 0. On the scaled latents (RMS
about 1) the figure reads as a fraction of the latent's scale; comparing words at the same n
shows which of them the model has learnt to use, and at which noise levels.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax.checks import PyTree, check
from ddm_jax.diffusion import eps_from, q_sample, x0_from_eps
from ddm_jax.models.latent_diffusion import LatentDiffusion


def clean_latent_change(
    model: LatentDiffusion,
    params: PyTree,
    latents: jax.Array,
    prompts: Sequence[str],
    other_prompts: Sequence[str],
    timesteps: Sequence[int],
    rng: jax.Array,
) -> dict[int, float]:
    """The sensitivity (module docstring) of `model` to the words prompts[i] and other_prompts[i] differ in.

    Args:
      model: the latent diffusion model.
      params: its parameters {"text_encoder", "unet", ...}.
      latents: scaled clean latents x [N, h, w, c] (`LatentDiffusion.encode_images`).
      prompts, other_prompts: N prompts each; pair i is noised from latents[i].
      timesteps: SD's timesteps n in [0, num_train_timesteps).
      rng: the key of the noise eps.

    Returns:
      {n: RMS change of the clean-latent prediction} for every n of `timesteps`.
    """
    check(
        len(prompts) == len(other_prompts) == len(latents), "prompts", len(prompts), "one per latent and other prompt"
    )
    num_steps = model.schedule.num_betas
    for n in timesteps:
        check(0 <= n < num_steps, "timesteps", n, f"SD timesteps in [0, {num_steps})")
    tokens = jnp.asarray(np.concatenate([model.tokenize(list(prompts)), model.tokenize(list(other_prompts))]))
    eps = jax.random.normal(rng, latents.shape)
    return {
        int(n): float(
            _clean_latent_change(
                model, params, latents, tokens, eps, model.gamma_fn(jnp.full((len(latents),), n / (num_steps - 1)))
            )
        )
        for n in timesteps
    }


@functools.partial(jax.jit, static_argnums=0)  # compiled once per model and shapes, not per call
def _clean_latent_change(model, params, latents, tokens, eps, gamma):
    z = jnp.concatenate([q_sample(latents, gamma, eps)] * 2)
    gamma = jnp.concatenate([gamma, gamma])
    context = model.encode_prompts(params["text_encoder"], tokens)
    prediction = model.predict(params["unet"], z, gamma, context)
    x0 = x0_from_eps(eps_from(prediction, z, gamma, model.parameterization), z, gamma)
    first, second = jnp.split(x0, 2)
    return jnp.sqrt(jnp.mean(jnp.square(first - second)))
