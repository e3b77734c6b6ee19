"""--mode=generate: the builder of configs/sd_generate.py and the run that writes its images.

As in `builders`, every config field is checked before anything is read or compiled, and an
ArgumentError of a function below is renamed to the config field (or flag) it came from.
"""

import math
import os

import jax
import ml_collections

from ddm_jax.checks import check, check_choice, check_int, check_interval, config_fields
from ddm_jax.diffusion import GRIDS
from ddm_jax.diffusion.samplers import check_settings
from ddm_jax.evaluation.generate import (
    as_prompt_list,
    check_guidance_interval,
    check_guidance_scale,
    generate,
    save_images,
)
from ddm_jax.models.clip_tokenizer import check_text
from ddm_jax.models.diffusers_io import LOAD_DTYPES
from ddm_jax.models.latent_diffusion import LatentDiffusion
from ddm_jax.training.sharding import make_mesh

PROMPT_FLAG = "--prompt"


def sampler_settings(config: ml_collections.ConfigDict) -> dict:
    """The sampler's own settings of the config: grid, and eta when set (ddim only)."""
    settings = {"grid": config.grid}
    if config.eta is not None:
        settings["eta"] = config.eta
    return settings


def check_generation_config(config: ml_collections.ConfigDict, prompts) -> list[str]:
    """Checks every field of configs/sd_generate.py that needs no checkpoint, and the prompts;
    returns the prompts, each repeated num_images times."""
    check(config is not None, "--config", None, "configs/sd_generate.py or a config like it")
    check(
        isinstance(config.checkpoint, str) and os.path.isdir(config.checkpoint),
        "checkpoint",
        config.checkpoint,
        "the folder of a diffusers checkpoint (--config.checkpoint=PATH)",
    )
    check_choice("dtype", config.dtype, tuple(LOAD_DTYPES))
    check_int("clip_skip", config.clip_skip, minimum=0)
    check_int("steps", config.steps, minimum=1)
    check_settings(config.sampler, sampler_settings(config))
    check_choice("grid", config.grid, GRIDS)
    if config.eta is not None:
        check_interval("eta", config.eta, 0.0, 1.0, closed_high=True)
    check_guidance_scale(config.guidance_scale)
    check_guidance_interval(config.guidance_interval)
    check_text("negative_prompt", config.negative_prompt)
    check_int("num_images", config.num_images, minimum=1)
    check_int("seed", config.seed)
    for field in ("height", "width"):
        if config[field] is not None:
            check_int(field, config[field], minimum=1)
    output = os.path.normpath(config.output)
    check(
        not os.path.isabs(output) and output.split(os.sep)[0] != "..",
        "output",
        config.output,
        "a folder inside --workdir (a relative path)",
    )
    with config_fields(prompts=PROMPT_FLAG):
        prompts = as_prompt_list("prompts", prompts)
    for k, prompt in enumerate(prompts):
        check_text(f"{PROMPT_FLAG}[{k}]", prompt)
    return [prompt for prompt in prompts for _ in range(config.num_images)]


def generate_from_config(config: ml_collections.ConfigDict, workdir: str, prompts: list[str]) -> list[str]:
    """Generates the images of `prompts` as configs/sd_generate.py describes and writes them as
    PNG files under workdir/config.output; returns their paths.

    The batch (prompts times num_images) is split over the first gcd(batch, devices) devices of
    this one process.
    Raises ArgumentError naming the config field (or --prompt) before anything is compiled.
    """
    batch = check_generation_config(config, prompts)
    check(jax.process_count() == 1, "--multihost", True, "one process for --mode=generate (it runs on its devices)")
    mesh = make_mesh(math.gcd(len(batch), jax.device_count()))
    with config_fields(folder="checkpoint"):
        model, params = LatentDiffusion.load(
            config.checkpoint, dtype=config.dtype, mesh=mesh, clip_skip=config.clip_skip
        )
    with config_fields(negative_prompts="negative_prompt"):
        images = generate(
            model,
            params,
            batch,
            rng=jax.random.key(config.seed),
            negative_prompts=config.negative_prompt,
            guidance_scale=config.guidance_scale,
            guidance_interval=config.guidance_interval,
            sampler=config.sampler,
            steps=config.steps,
            height=config.height,
            width=config.width,
            mesh=mesh,
            **sampler_settings(config),
        )
    return save_images(os.path.join(workdir, config.output), images)
