"""AdamW with global-norm clipping and a warmup learning-rate schedule.

Config fields (the `optimizer` section of an experiment config):
    lr, warmup_steps, b1, b2, eps, weight_decay, grad_clip_norm (0 or None: no
    clipping), lr_schedule ("constant", the default, or "cosine") and, for "cosine",
    decay_steps: the step at which the learning rate reaches 0 (warmup included,
    as in optax.warmup_cosine_decay_schedule).
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddm_jax.checks import check, check_choice, check_int, check_interval, config_fields

LR_SCHEDULES = ("constant", "cosine")
REQUIRED_FIELDS = ("lr", "warmup_steps", "b1", "b2", "eps", "weight_decay", "grad_clip_norm")


def validate_optimizer_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ArgumentError naming `optimizer.<field>` for a missing or invalid field."""
    with config_fields("optimizer"):
        for field in REQUIRED_FIELDS:
            check(field in cfg, field, None, "a value (the field is missing from the config)")
        check(cfg.lr > 0, "lr", cfg.lr, "a learning rate > 0")
        check_int("warmup_steps", cfg.warmup_steps, minimum=0)
        for field in ("b1", "b2"):
            check_interval(field, cfg[field], 0.0, 1.0)
        check(cfg.eps >= 0, "eps", cfg.eps, "a value >= 0")
        check(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "a value >= 0")
        check(
            cfg.grad_clip_norm is None or cfg.grad_clip_norm >= 0,
            "grad_clip_norm",
            cfg.grad_clip_norm,
            "a norm >= 0, or 0/None for no clipping",
        )
        lr_schedule = cfg.get("lr_schedule", "constant")
        check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        if lr_schedule == "cosine":
            check_int("decay_steps", cfg.get("decay_steps"), minimum=cfg.warmup_steps + 1)


def learning_rate_fn(cfg: ml_collections.ConfigDict) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The schedule step -> lr: linear warmup from 0 to `lr`, then constant or cosine to 0."""
    validate_optimizer_config(cfg)
    lr, warmup_steps = cfg.lr, cfg.warmup_steps
    cosine_end = cfg.decay_steps if cfg.get("lr_schedule", "constant") == "cosine" else None

    def learning_rate(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.minimum(step / warmup_steps, 1.0) if warmup_steps else jnp.ones_like(step)
        if cosine_end is None:
            return lr * warmup
        progress = jnp.clip((step - warmup_steps) / (cosine_end - warmup_steps), 0.0, 1.0)
        return lr * warmup * 0.5 * (1.0 + jnp.cos(math.pi * progress))

    return learning_rate


def make_optimizer(cfg: ml_collections.ConfigDict, learning_rate_scales=None) -> optax.GradientTransformation:
    """clip_by_global_norm (when grad_clip_norm > 0) followed by AdamW on the schedule.

    learning_rate_scales: None (every parameter follows the schedule), or {part: multiple} for
    parameters that are a dict of parts: each part's learning rate is that multiple of the
    schedule's (AdamW's whole update scaled, weight decay included). A part at 0 is frozen: the
    optimizer neither updates it nor keeps moments for it (optax.multi_transform), and clipping
    acts on the global norm of the trained parts' gradients. Multiples other than 0 and 1 add a
    stateless scaling, so the state of an optimizer without them keeps its structure.
    """
    adamw = optax.adamw(
        learning_rate=learning_rate_fn(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    optimizer = adamw if not cfg.grad_clip_norm else optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    if learning_rate_scales is None:
        return optimizer

    def labels(params):
        return {
            part: jax.tree.map(lambda _: "train" if learning_rate_scales[part] else "freeze", tree)
            for part, tree in params.items()
        }

    optimizer = optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)
    multiples = {part: multiple for part, multiple in learning_rate_scales.items() if multiple not in (0, 1)}
    if not multiples:
        return optimizer

    def scale_parts(updates, params=None):
        del params
        return {
            part: jax.tree.map(lambda u, m=multiples[part]: m * u, tree) if part in multiples else tree
            for part, tree in updates.items()
        }

    return optax.chain(optimizer, optax.stateless(scale_parts))
