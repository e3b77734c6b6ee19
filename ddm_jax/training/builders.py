"""The builder layer: the one place that reads ConfigDicts and maps them to objects.

Below this layer, functions and modules take keyword arguments and raise
`ddm_jax.checks.ArgumentError` naming their own arguments; here `config_fields` renames such an
error to the config field the argument came from (`T=-1` becomes `model.T=-1`), so a user sees
the field to change. Everything here runs before any compilation.
"""

import dataclasses

import flax.linen as nn
import ml_collections

from ddm_jax.checks import ArgumentError, check, check_choice, check_int, check_interval, config_fields, nearest_fields
from ddm_jax.data import AUGMENT_COND_DIM, DatasetSpec, check_augment, check_eval_split, dataset_spec
from ddm_jax.diffusion import SCHEDULES, WEIGHTINGS
from ddm_jax.diffusion import build_schedule as schedule_by_name
from ddm_jax.diffusion.samplers import check_settings
from ddm_jax.evaluation.generate import check_guidance_scale
from ddm_jax.models import NETWORKS, load_diffusers
from ddm_jax.models.autoencoder_kl import DECODER_NLL
from ddm_jax.models.clip_tokenizer import default_tokenizer
from ddm_jax.models.diffusers_io import module_from_config
from ddm_jax.models.latent_diffusion import LatentDiffusion, schedule_from_scheduler_config
from ddm_jax.models.layers import compute_dtype
from ddm_jax.models.vdm import VDM
from ddm_jax.training.autoencoder_task import AutoencoderTask, decoder_likelihood
from ddm_jax.training.optimizer import validate_optimizer_config
from ddm_jax.training.text_to_image_task import TextToImageTask, text_encoder_lr_scale
from ddm_jax.training.vdm_task import BETA_SCHEDULES, VDMTask, model_architecture

LEARNED_SCHEDULES = ("learned_linear", "learned_monotone")
TASKS = ("vdm", "autoencoder", "text_to_image")
EVERY_N_STEPS_FIELDS = ("log_every", "eval_every", "checkpoint_every", "sample_every")
POSITIVE_TRAINING_FIELDS = ("batch_size", "substeps", "keep_checkpoints", "num_samples")
EVAL_FIELDS = {  # the eval section's positive integers, by task
    "vdm": ("batch_size", "num_time_samples"),
    "autoencoder": ("batch_size",),
    "text_to_image": ("batch_size", "num_examples", "sampling_steps"),
}
FAMILY_PAD_IDS = {"quick_gelu": 49407, "gelu": 0}  # SD-1's OpenAI CLIP pads with the end token, SD-2's with "!"


def as_module_attributes(settings: dict) -> dict:
    """Config values as module attributes: lists become tuples (attributes must be hashable)."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()}


# Model -------------------------------------------------------------------------------------------


def build_schedule(model: ml_collections.ConfigDict) -> nn.Module:
    """The gamma schedule of config.model: `schedule` and its settings (gamma_min/max, the learned
    monotone net's `schedule_features` and `learn_endpoints`, DDPM's `ddpm_betas` with T + 1 betas)."""
    with config_fields("model"):
        check_choice("schedule", model.schedule, SCHEDULES)
    if model.schedule in BETA_SCHEDULES:
        with config_fields("model", num_betas="model.T", beta_start="model.ddpm_betas", beta_end="model.ddpm_betas"):
            check(model.T >= 1, "T", model.T, f"an integer >= 1 for schedule={model.schedule!r} (N = T + 1 betas)")
            settings = {"num_betas": model.T + 1}
            if model.schedule == "ddpm_linear":
                settings.update(beta_start=model.ddpm_betas[0], beta_end=model.ddpm_betas[1])
            return schedule_by_name(model.schedule, **settings)
    settings = {"gamma_min": model.gamma_min, "gamma_max": model.gamma_max}
    if model.schedule == "learned_monotone":
        settings.update(n_features=model.schedule_features, learn_endpoints=model.learn_endpoints)
    with config_fields("model", n_features="model.schedule_features"):
        return schedule_by_name(model.schedule, **settings)


def build_network(model: ml_collections.ConfigDict, cond_dim: int | None = None) -> nn.Module:
    """The network config.model.network names, with the attributes of config.model.<network>, the
    schedule's gamma range and a `cond_dim` conditioning vector when given."""
    with config_fields("model"):
        check_choice("network", model.network, NETWORKS)
    cls = NETWORKS[model.network]
    prefix = f"model.{model.network}"
    # gamma_min/gamma_max come from the schedule's settings and cond_dim from the data's augmentation.
    fields = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in ("parent", "name", "gamma_min", "gamma_max", "cond_dim")
    ]
    settings = as_module_attributes(model[model.network].to_dict())
    for key in settings:
        if key not in fields:
            raise ArgumentError(f"{prefix}.{key}", settings[key], f"a field of {prefix}{nearest_fields(key, fields)}")
    with config_fields(prefix, gamma_min="model.gamma_min", gamma_max="model.gamma_max"):
        if "dtype" in settings:
            settings["dtype"] = compute_dtype("dtype", settings["dtype"])
        return cls(gamma_min=model.gamma_min, gamma_max=model.gamma_max, cond_dim=cond_dim, **settings)


def build_vdm(model: ml_collections.ConfigDict, image_shape, vocab_size: int, cond_dim: int | None = None) -> VDM:
    """The VDM config.model describes, for data of `image_shape` with `vocab_size` values, its network
    conditioned on a `cond_dim` vector when given (e.g. the augmentation applied).

    Every check that needs no compilation happens here: names, ranges, and whether the network
    takes the image shape.
    """
    if model.weighting != "elbo" and model.schedule in LEARNED_SCHEDULES:
        raise ArgumentError(
            "model.weighting",
            model.weighting,
            f"'elbo' with the learned schedule {model.schedule!r} (another weighting gives its endpoints no "
            "ELBO gradient); or a fixed model.schedule (fixed_linear, cosine, ddpm_linear, scaled_linear)",
        )
    schedule = build_schedule(model)
    network = build_network(model, cond_dim)
    with config_fields(f"model.{model.network}"):
        network.check_input_shape(tuple(image_shape))
    with config_fields("model", vocab_size="data.vocab_size", antithetic="model.antithetic_time_sampling"):
        return VDM(
            schedule=schedule,
            network=network,
            vocab_size=vocab_size,
            T=model.T,
            parameterization=model.parameterization,
            weighting=model.weighting,
            antithetic=model.antithetic_time_sampling,
        )


# The whole config ------------------------------------------------------------------------------


def check_training(training: ml_collections.ConfigDict, evaluation: ml_collections.ConfigDict, kind: str) -> None:
    """The training and eval sections' integers, multiples and rates (those the task `kind` has)."""
    with config_fields("training"):
        for field in POSITIVE_TRAINING_FIELDS + (("sample_steps",) if kind == "vdm" else ()) + EVERY_N_STEPS_FIELDS:
            check_int(field, training[field], minimum=1)
        check_int("num_steps", training.num_steps, minimum=0)
        check_int("seed", training.seed, minimum=0)
        for field in ("num_steps",) + EVERY_N_STEPS_FIELDS:
            check(
                training[field] % training.substeps == 0,
                field,
                training[field],
                f"a multiple of training.substeps={training.substeps} (steps run in calls of substeps)",
            )
        check_interval("ema_decay", training.ema_decay, 0.0, 1.0)
    with config_fields("eval"):
        for field in EVAL_FIELDS[kind]:
            check_int(field, evaluation[field], minimum=1)


def check_device_split(config: ml_collections.ConfigDict, num_devices: int, kind: str) -> None:
    """The batches that are split over the mesh's devices split evenly: training.batch_size; the
    eval batches of a VDM and an autoencoder; the sample grid of a text-to-image model."""
    split = ("training", "num_samples") if kind == "text_to_image" else ("eval", "batch_size")
    for section, name in (("training", "batch_size"), split):
        value = config[section][name]
        check(
            value % num_devices == 0, f"{section}.{name}", value, f"a multiple of the {num_devices} devices of the mesh"
        )


def check_data(data: ml_collections.ConfigDict, batch_size: int) -> DatasetSpec:
    """The dataset's spec, after checking the data section against it (prepares offline datasets)."""
    with config_fields("data", split="data.eval_split"):
        image_size = data.get("image_size")
        image_size = None if image_size is None else tuple(image_size)
        spec = dataset_spec(data.dataset, data.data_dir, image_size=image_size, download=data.download)
        if data.get("vocab_size") is not None:
            check(
                data.vocab_size == spec.vocab_size,
                "vocab_size",
                data.vocab_size,
                f"{spec.vocab_size}, the vocabulary of dataset {spec.name!r} (or leave it unset)",
            )
        check_augment(data.get("augment"), spec.image_shape)
        check_eval_split(spec, data.eval_split)
    train_size = spec.split_sizes.get("train")
    if train_size is not None:
        check(
            batch_size <= train_size,
            "training.batch_size",
            batch_size,
            f"at most the {train_size} training examples of {spec.name!r}",
        )
    return spec


def check_rgb_images(spec: DatasetSpec) -> None:
    """The latent models take 8-bit RGB images."""
    check(
        spec.image_shape[-1] == 3 and spec.vocab_size == 256,
        "data.dataset",
        spec.name,
        f"a dataset of 8-bit RGB images; its images are {spec.image_shape} with {spec.vocab_size} values",
    )


def task_kind(config: ml_collections.ConfigDict) -> str:
    """config.task: what the config trains (a config without the field is a VDM's)."""
    kind = config.get("task", "vdm")
    with config_fields():
        check_choice("task", kind, TASKS)
    return kind


def config_architecture(config: ml_collections.ConfigDict) -> dict:
    """What of the config fixes the meaning of a checkpoint's parameters: compared with a run's saved
    config, and part of every checkpoint's fingerprint."""
    kind = task_kind(config)
    if kind == "vdm":
        model = model_architecture(config.model)
    elif kind == "autoencoder":
        model = {"vae": config.model.vae.to_dict()}
    else:
        model = {name: config.model[name].to_dict() for name in ("text_encoder", "unet", "scheduler")}
        model["vae_folder"] = config.model.vae_folder
    return {"task": kind, "model": model, "data": {"dataset": config.data.dataset}}


def build_latent_diffusion(model: ml_collections.ConfigDict) -> tuple[LatentDiffusion, dict]:
    """The text-to-image model of config.model (text encoder and UNet from their config dicts, the
    stage-1 VAE from model.vae_folder, the schedule from model.scheduler) and the parameters loaded
    for it: {"vae"}, and {"text_encoder"} when model.text_encoder_folder names a text encoder to
    start from (it must be the one model.text_encoder describes)."""
    with config_fields("model.text_encoder"):
        text_encoder = module_from_config("text_encoder", model.text_encoder.to_dict())
    loaded = {}
    if model.text_encoder_folder is not None:
        with config_fields(folder="model.text_encoder_folder"):
            found, loaded["text_encoder"] = load_diffusers(model.text_encoder_folder, "text_encoder")
        check(
            found == text_encoder,
            "model.text_encoder_folder",
            model.text_encoder_folder,
            f"a text encoder as model.text_encoder describes ({text_encoder}), not {found}",
        )
    with config_fields("model.unet"):
        unet = module_from_config("unet", model.unet.to_dict())
    with config_fields("model.scheduler"):
        schedule, parameterization = schedule_from_scheduler_config(model.scheduler.to_dict())
    with config_fields(folder="model.vae_folder"):
        vae, loaded["vae"] = load_diffusers(model.vae_folder, "vae")
    with config_fields("model"):
        check_interval("prompt_dropout", model.prompt_dropout, 0.0, 1.0)
        check_choice("weighting", model.weighting, WEIGHTINGS)
        lr_scale = text_encoder_lr_scale(model)
        check(
            lr_scale > 0,
            "text_encoder_lr_scale",
            lr_scale,
            "a multiple > 0 of optimizer.lr (train_text_encoder=False freezes the text encoder)",
        )
        latent_diffusion = LatentDiffusion(
            text_encoder=text_encoder,
            unet=unet,
            vae=vae,
            schedule=schedule,
            tokenizer=default_tokenizer(),
            parameterization=parameterization,
            pad_token_id=FAMILY_PAD_IDS[text_encoder.hidden_act],
        )
    return latent_diffusion, loaded


def build_task(config: ml_collections.ConfigDict, mesh, rng, workdir: str):
    """The training task the config describes (training/vdm_task.py lists what a task does), after
    checking the whole config: reads no checkpoint and compiles nothing; the first error names its
    config field."""
    kind = task_kind(config)
    check_training(config.training, config.eval, kind)
    check_device_split(config, mesh.size, kind)
    validate_optimizer_config(config.optimizer)
    spec = check_data(config.data, config.training.batch_size)
    if kind == "vdm":
        cond_dim = AUGMENT_COND_DIM.get(config.data.augment)
        model = build_vdm(config.model, spec.image_shape, spec.vocab_size, cond_dim=cond_dim)
        return VDMTask(config, spec, model, mesh, rng, workdir)
    check_rgb_images(spec)
    augment = config.data.get("augment")
    check(augment is None, "data.augment", augment, f"None: the {kind} task trains on the images as they are")
    if kind == "autoencoder":
        with config_fields("model.vae"):
            vae = module_from_config("vae", config.model.vae.to_dict())
        with config_fields("model"):
            check(config.model.decoder_std > 0, "decoder_std", config.model.decoder_std, "a standard deviation > 0")
            check_choice("decoder_likelihood", decoder_likelihood(config.model), DECODER_NLL)
            check(config.model.beta >= 0, "beta", config.model.beta, "a weight >= 0")
        return AutoencoderTask(config, spec, vae, mesh, rng, workdir)
    model, loaded = build_latent_diffusion(config.model)
    with config_fields("eval"):
        check_settings(config.eval.sampler, {})
        check_guidance_scale(config.eval.guidance_scale)
    check(
        config.training.num_samples <= config.eval.num_examples,
        "training.num_samples",
        config.training.num_samples,
        f"at most eval.num_examples={config.eval.num_examples} (the sample grid's prompts are held-out examples)",
    )
    check(
        model.latent_shape(*spec.image_shape[:2])[-1] == model.vae.latent_channels,
        "data.dataset",
        spec.name,
        "images the VAE and UNet take",
    )
    return TextToImageTask(
        config, spec, model, loaded["vae"], mesh, rng, workdir, text_encoder_params=loaded.get("text_encoder")
    )
