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
from ddm_jax.diffusion import SCHEDULES
from ddm_jax.diffusion import build_schedule as schedule_by_name
from ddm_jax.models import NETWORKS
from ddm_jax.models.layers import compute_dtype
from ddm_jax.models.vdm import VDM
from ddm_jax.training.optimizer import validate_optimizer_config

LEARNED_SCHEDULES = ("learned_linear", "learned_monotone")
BETA_SCHEDULES = ("ddpm_linear", "scaled_linear")
EVERY_N_STEPS_FIELDS = ("log_every", "eval_every", "checkpoint_every", "sample_every")
POSITIVE_TRAINING_FIELDS = ("batch_size", "substeps", "keep_checkpoints", "num_samples", "sample_steps")


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


def architecture(model: ml_collections.ConfigDict) -> dict:
    """config.model as a checkpoint's fingerprint holds it: what fixes the parameters' meaning.

    Left out: the networks' compute dtype (the parameters stay float32), and T, weighting and
    antithetic time sampling, which change the loss but not the model, so a checkpoint can be
    evaluated with another T (a continuous-time model in discrete time, or the reverse) or resumed
    with another loss. The DDPM schedules' T, which fixes their betas, stays.
    """
    config = model.to_dict()
    for network in NETWORKS:
        config.get(network, {}).pop("dtype", None)
    for field in ("weighting", "antithetic_time_sampling") + (() if model.schedule in BETA_SCHEDULES else ("T",)):
        config.pop(field, None)
    return config


# The whole config ------------------------------------------------------------------------------


def check_training(training: ml_collections.ConfigDict, evaluation: ml_collections.ConfigDict) -> None:
    """The training and eval sections' integers, multiples and rates."""
    with config_fields("training"):
        for field in POSITIVE_TRAINING_FIELDS + EVERY_N_STEPS_FIELDS:
            check_int(field, training[field], minimum=1)
        check_int("num_steps", training.num_steps, minimum=0)
        for field in ("num_steps",) + EVERY_N_STEPS_FIELDS:
            check(
                training[field] % training.substeps == 0,
                field,
                training[field],
                f"a multiple of training.substeps={training.substeps} (steps run in calls of substeps)",
            )
        check_interval("ema_decay", training.ema_decay, 0.0, 1.0)
    with config_fields("eval"):
        check_int("batch_size", evaluation.batch_size, minimum=1)
        check_int("num_time_samples", evaluation.num_time_samples, minimum=1)


def check_data(data: ml_collections.ConfigDict, batch_size: int) -> DatasetSpec:
    """The dataset's spec, after checking the data section against it (prepares offline datasets)."""
    with config_fields("data", split="data.eval_split"):
        image_size = None if data.image_size is None else tuple(data.image_size)
        spec = dataset_spec(data.dataset, data.data_dir, image_size=image_size, download=data.download)
        if data.vocab_size is not None:
            check(
                data.vocab_size == spec.vocab_size,
                "vocab_size",
                data.vocab_size,
                f"{spec.vocab_size}, the vocabulary of dataset {spec.name!r} (or leave it unset)",
            )
        check_augment(data.augment, spec.image_shape)
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


def check_config(config: ml_collections.ConfigDict) -> tuple[DatasetSpec, VDM]:
    """Validates the whole config against the data; returns the dataset spec and the model.

    Reads no checkpoint and compiles nothing; the first error names its config field.
    """
    check_training(config.training, config.eval)
    validate_optimizer_config(config.optimizer)
    spec = check_data(config.data, config.training.batch_size)
    cond_dim = AUGMENT_COND_DIM.get(config.data.augment)
    return spec, build_vdm(config.model, spec.image_shape, spec.vocab_size, cond_dim=cond_dim)
