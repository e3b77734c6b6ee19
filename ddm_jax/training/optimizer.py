"""AdamW with global-norm clipping and a warmup learning-rate schedule.

Config fields (the `optimizer` section of an experiment config):
    lr, warmup_steps, b1, b2, eps, weight_decay, grad_clip_norm (0 or None: no
    clipping), schedule ("constant", the default, or "cosine") and, for "cosine",
    decay_steps: the step at which the learning rate reaches 0 (warmup included,
    as in optax.warmup_cosine_decay_schedule).
"""
import math
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "cosine")
REQUIRED_FIELDS = ("lr", "warmup_steps", "b1", "b2", "eps", "weight_decay", "grad_clip_norm")


def _fail(field: str, value, expected: str) -> ValueError:
    return ValueError(f"optimizer.{field} = {value!r}: expected {expected}")


def validate_optimizer_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming `optimizer.<field>` for a missing or invalid field."""
    for field in REQUIRED_FIELDS:
        if field not in cfg:
            raise ValueError(f"optimizer.{field} is missing from the config")
    if not cfg.lr > 0:
        raise _fail("lr", cfg.lr, "a learning rate > 0")
    if not (isinstance(cfg.warmup_steps, int) and cfg.warmup_steps >= 0):
        raise _fail("warmup_steps", cfg.warmup_steps, "an integer >= 0")
    for field in ("b1", "b2"):
        if not 0 <= cfg[field] < 1:
            raise _fail(field, cfg[field], "a decay rate in [0, 1)")
    if not cfg.eps >= 0:
        raise _fail("eps", cfg.eps, "a value >= 0")
    if not cfg.weight_decay >= 0:
        raise _fail("weight_decay", cfg.weight_decay, "a value >= 0")
    if cfg.grad_clip_norm is not None and not cfg.grad_clip_norm >= 0:
        raise _fail("grad_clip_norm", cfg.grad_clip_norm, "a norm >= 0, or 0/None for no clipping")
    schedule = cfg.get("schedule", "constant")
    if schedule not in SCHEDULES:
        raise _fail("schedule", schedule, f"one of {SCHEDULES}")
    if schedule == "cosine":
        decay_steps = cfg.get("decay_steps")
        if not (isinstance(decay_steps, int) and decay_steps > cfg.warmup_steps):
            raise _fail(
                "decay_steps", decay_steps,
                f"an integer > optimizer.warmup_steps ({cfg.warmup_steps}) for the cosine schedule")


def learning_rate_fn(cfg: ml_collections.ConfigDict) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The schedule step -> lr: linear warmup from 0 to `lr`, then constant or cosine to 0."""
    validate_optimizer_config(cfg)
    lr, warmup_steps = cfg.lr, cfg.warmup_steps
    cosine_end = cfg.decay_steps if cfg.get("schedule", "constant") == "cosine" else None

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.minimum(step / warmup_steps, 1.0) if warmup_steps else jnp.ones_like(step)
        if cosine_end is None:
            return lr * warmup
        progress = jnp.clip((step - warmup_steps) / (cosine_end - warmup_steps), 0.0, 1.0)
        return lr * warmup * 0.5 * (1.0 + jnp.cos(math.pi * progress))

    return schedule


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """clip_by_global_norm (when grad_clip_norm > 0) followed by AdamW on the schedule."""
    adamw = optax.adamw(
        learning_rate=learning_rate_fn(cfg),
        b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if not cfg.grad_clip_norm:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
