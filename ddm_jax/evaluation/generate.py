"""Text-to-image generation with a latent diffusion model (`models.latent_diffusion.LatentDiffusion`).

prompts -> CLIP ids -> text states c; negative prompts (the empty prompt by default) -> c_null;
classifier-free guidance (Ho & Salimans 2022, eq. 6), prediction = p(c_null) + s (p(c) - p(c_null))
with s = 1 + w of eq. 6, as `diffusion.guided_denoise_fn` (both halves in one batched UNet call;
s = 1 one conditional call), at every noise level or in a limited interval of them (Kynkaanniemi
et al. 2024); latents z_1 ~ N(0, I), row b from fold_in(key, b) (`diffusion.per_example_normal`), so
an example's draw depends neither on the batch around it nor on the mesh; any sampler of
`diffusion.SAMPLERS` from t = 1 to t = 0; the VAE decodes z_0; uint8 RGB.

Everything from the ids to the decoded images is one jitted function whose arguments are the
parameters, the ids and the key (compiled once per model, sampler settings, guidance scale and
interval, and batch shape), on a device mesh: the batch split over its "data" axis, the parameters replicated.
"""

import functools
import math
import os
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ddm_jax.checks import PyTree, check, check_int, is_real
from ddm_jax.diffusion import guided_denoise_fn, per_example_normal, sample
from ddm_jax.diffusion.samplers import check_settings
from ddm_jax.evaluation.images import save_png
from ddm_jax.models.latent_diffusion import LatentDiffusion
from ddm_jax.training.sharding import batch_sharded, make_mesh, replicate

# Sampler arguments the pipeline sets itself.
PIPELINE_SETTINGS = ("parameterization", "z_1", "return_trajectory")


def as_prompt_list(argument: str, prompts: str | Sequence[str]) -> list[str]:
    """A str or a non-empty list/tuple of them, as a list (each item is checked by `tokenize`)."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    check(
        isinstance(prompts, (list, tuple)) and len(prompts) > 0, argument, prompts, "a str or a non-empty list of str"
    )
    return list(prompts)


def check_guidance_scale(guidance_scale) -> float:
    """A finite real number s, as a Python float (the jitted function is specialised on it)."""
    check(
        is_real(guidance_scale) and math.isfinite(guidance_scale),
        "guidance_scale",
        guidance_scale,
        "a finite real number",
    )
    return float(guidance_scale)


def check_guidance_interval(guidance_interval) -> tuple[float, float] | None:
    """None, or (gamma_low, gamma_high) as Python floats: real numbers (either may be infinite) with
    gamma_low < gamma_high."""
    if guidance_interval is None:
        return None
    bounds = tuple(guidance_interval) if isinstance(guidance_interval, (tuple, list)) else ()
    check(
        len(bounds) == 2 and all(is_real(bound) for bound in bounds) and bounds[0] < bounds[1],
        "guidance_interval",
        guidance_interval,
        "None or (gamma_low, gamma_high), real numbers with gamma_low < gamma_high (gamma = -log SNR)",
    )
    return float(bounds[0]), float(bounds[1])


def images_to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (clipped) to uint8 round(127.5 (x + 1)), as diffusers' image processor."""
    return np.round(127.5 * (np.clip(images, -1.0, 1.0) + 1.0)).astype(np.uint8)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "guidance_scale",
        "guidance_interval",
        "sampler",
        "steps",
        "latent_shape",
        "settings",
        "batch_sharding",
    ),
)
def sample_images(
    params: PyTree,
    token_ids: jax.Array,
    null_token_ids: jax.Array,
    rng: jax.Array,
    *,
    model: LatentDiffusion,
    guidance_scale: float,
    sampler: str,
    steps: int,
    latent_shape: tuple[int, int, int],
    settings: tuple[tuple[str, object], ...],
    batch_sharding: NamedSharding,
    guidance_interval: tuple[float, float] | None = None,
) -> tuple[jax.Array, dict]:
    """(images [B, H, W, 3] in [-1, 1], not clipped; the sampler's info) of the ids [B, L] of the
    prompts and of the unconditional (negative) prompts. `settings` are the sampler's other keyword
    settings as (name, value) pairs; `batch_sharding` splits the batch of the latents;
    `guidance_interval` as in `generate`."""
    rng_latents, rng_sampler = jax.random.split(rng)
    context = model.encode_prompts(params["text_encoder"], token_ids)
    null_context = model.encode_prompts(params["text_encoder"], null_token_ids)
    denoise_fn = guided_denoise_fn(
        model.conditional_fn(params["unet"]), context, null_context, guidance_scale, guidance_interval
    )
    z_1 = jax.lax.with_sharding_constraint(
        per_example_normal(rng_latents, (token_ids.shape[0], *latent_shape)), batch_sharding
    )
    z_0, info = sample(
        sampler,
        rng_sampler,
        denoise_fn,
        model.gamma_fn,
        z_1.shape,
        steps=steps,
        parameterization=model.parameterization,
        z_1=z_1,
        **dict(settings),
    )
    return model.decode_latents(params["vae"], z_0), info


def generate(
    model: LatentDiffusion,
    params: PyTree,
    prompts: str | Sequence[str],
    *,
    rng: jax.Array,
    negative_prompts: str | Sequence[str] | None = None,
    guidance_scale: float = 7.5,
    guidance_interval: tuple[float, float] | None = None,
    sampler: str = "ddim",
    steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    mesh: Mesh | None = None,
    **sampler_settings,
) -> np.ndarray:
    """Images of text prompts, one per prompt.

    Args:
      model: the latent diffusion model (`LatentDiffusion.load`).
      params: its parameters {"text_encoder", "unet", "vae"}.
      prompts: a str or a list of str. A prompt of more than 75 tokens is cut to its first 75
        with a UserWarning (`CLIPTokenizer`).
      rng: split into the key of the initial latents (row b from fold_in(that key, b)) and that of
        the sampler's noise.
      negative_prompts: the unconditional half of guidance: None (the empty prompt), one str for
        every prompt, or one per prompt. Unused when guidance_scale is 1.
      guidance_scale: s = 1 + w of classifier-free guidance (Ho & Salimans' eq. 6; diffusers'
        guidance_scale); 1 is the conditional model alone (one UNet call per step), 0 the
        unconditional one.
      guidance_interval: None (guidance at every step) or (gamma_low, gamma_high): guidance only
        at the noise levels gamma_low < gamma <= gamma_high (gamma = -log SNR, EDM's sigma =
        exp(gamma / 2)), the conditional prediction alone (one UNet call) at the others.
      sampler: a key of `diffusion.SAMPLERS` ("ancestral", "ddim", "dpm_solver_pp", "ode").
      steps: sampling steps (the ODE solver's initial steps).
      height, width: image size in pixels; default the UNet's sample_size times the VAE's factor.
      mesh: a device mesh with a "data" axis (`training.sharding.make_mesh`) whose size divides
        the number of prompts; default the first gcd(prompts, devices) devices. The batch is
        split over it and the parameters replicated.
      **sampler_settings: the sampler's own settings, e.g. grid="log_snr", eta=0.5 (ddim).

    Returns:
      uint8 [B, height, width, 3] images, B = the number of prompts. With a deterministic sampler
      on a fixed grid (ddim with eta = 0, dpm_solver_pp) an image depends only on its prompt,
      negative prompt and row b of the key, not on the other prompts or the mesh.

    Raises ArgumentError, before anything is compiled, naming the argument at fault.
    """
    prompts = as_prompt_list("prompts", prompts)
    negatives = (
        [""] * len(prompts) if negative_prompts is None else as_prompt_list("negative_prompts", negative_prompts)
    )
    negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
    check(
        len(negatives) == len(prompts),
        "negative_prompts",
        f"{len(negatives)} prompts",
        f"one str, or one per prompt ({len(prompts)})",
    )
    guidance_scale = check_guidance_scale(guidance_scale)
    guidance_interval = check_guidance_interval(guidance_interval)
    check_int("steps", steps, minimum=1)
    check_settings(sampler, sampler_settings)
    for key in PIPELINE_SETTINGS:
        check(key not in sampler_settings, key, sampler_settings.get(key), "no value: the pipeline sets it")
    latent_shape = model.latent_shape(height, width)
    token_ids, null_token_ids = model.tokenize(prompts), model.tokenize(negatives, "negative_prompts")
    mesh = make_mesh(math.gcd(len(prompts), jax.device_count())) if mesh is None else mesh
    check(len(prompts) % mesh.size == 0, "prompts", f"{len(prompts)} prompts", f"a multiple of {mesh.size} (the mesh)")
    batch_sharding = batch_sharded(mesh)
    images, _ = sample_images(
        replicate(params, mesh),
        *jax.device_put((token_ids, null_token_ids), batch_sharding),
        rng,
        model=model,
        guidance_scale=guidance_scale,
        guidance_interval=guidance_interval,
        sampler=sampler,
        steps=steps,
        latent_shape=latent_shape,
        settings=tuple(sorted(sampler_settings.items())),
        batch_sharding=batch_sharding,
    )
    return images_to_uint8(np.asarray(jax.device_get(images)))


PNG_NAME = re.compile(r"(\d+)\.png")


def save_images(folder: str | os.PathLike, images: np.ndarray) -> list[str]:
    """Writes uint8 images [B, H, W, 3] as folder/NNNN.png, numbered on from the largest number
    already there (no file is overwritten); returns their paths. Creates the folder."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    taken = [int(match[1]) for name in os.listdir(folder) if (match := PNG_NAME.fullmatch(name))]
    first = max(taken, default=-1) + 1
    paths = [os.path.join(folder, f"{first + k:04d}.png") for k in range(len(images))]
    for path, image in zip(paths, images, strict=True):
        save_png(path, image)
    return paths
