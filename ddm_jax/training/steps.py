"""The train step as a pure function: one AdamW step on the VDM loss, or several per call.

`train_steps` runs under jax.jit over a device mesh (the trainer's path: the batch sharded over
"data", the state replicated) and, with `axis_name`, under jax.pmap (`pmap_train_steps`); both
give the step of the global batch (tests/test_multidevice.py; with dropout, other draws of its masks).
"""

import functools
import math

import jax
import jax.numpy as jnp
import optax

from ddm_jax.diffusion import bits_per_dim
from ddm_jax.models.vdm import VDM
from ddm_jax.training.train_state import TrainState, apply_updates


def train_step(model: VDM, optimizer, ema_decay, state: TrainState, batch, rng, axis_name=None):
    """One AdamW step on the loss of batch {"image", optional "cond"}; metrics are batch means (and
    the diffusion term's variance over the batch).

    Under jax.pmap, `axis_name` is the data axis: each device holds its shard of the global batch,
    gradients and metrics are pmean'd over the axis, and the step equals the jit step on the
    global batch (the same per-example draws of t and noise; VDM docstring), except for dropout,
    whose masks are drawn per device (same distribution, other draws).
    """
    rng = jax.random.fold_in(rng, state.step)
    images = batch["image"]
    (_, terms), grads = model.value_and_grad(state.params, rng, images, cond=batch.get("cond"), axis_name=axis_name)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    state = apply_updates(state, grads, optimizer, ema_decay)
    mean = jnp.mean if axis_name is None else (lambda x: jax.lax.pmean(jnp.mean(x), axis_name))
    num_dims = math.prod(images.shape[1:])
    reconstruction, prior, diffusion = (
        bits_per_dim(terms[name], num_dims) for name in ("reconstruction", "prior", "diffusion")
    )
    metrics = {
        "loss": mean(terms["bpd"]),  # the ELBO in bits/dim with model.weighting="elbo", else the weighted bound
        "reconstruction_bpd": mean(reconstruction),
        "prior_bpd": mean(prior),
        "diffusion_bpd": mean(diffusion),
        "diffusion_bpd_variance": mean(jnp.square(diffusion - mean(diffusion))),
        "grad_norm": optax.tree.norm(grads),
    }
    return state, metrics


def train_steps(model: VDM, optimizer, ema_decay, state: TrainState, batches, rng, axis_name=None):
    """Several train steps in one call, on batches with leaves [substeps, B, ...]; metrics [substeps].

    The steps are traced one after the other rather than as a lax.scan: XLA:CPU (jaxlib 0.10.1)
    ran the scan's loop body about 40x slower than the same step outside a loop (2.0 s against
    0.05 s for the digits step), even with a single substep.
    """
    metrics = []
    for i in range(jax.tree.leaves(batches)[0].shape[0]):
        state, step_metrics = train_step(
            model, optimizer, ema_decay, state, jax.tree.map(lambda x: x[i], batches), rng, axis_name
        )
        metrics.append(step_metrics)
    return state, jax.tree.map(lambda *m: jnp.stack(m), *metrics)


PMAP_AXIS = "batch"


def pmap_train_steps(model: VDM, optimizer, ema_decay):
    """`train_steps` under jax.pmap over the local devices, pmean over PMAP_AXIS.

    Takes the state with a leading device axis (`sharding.stack_for_pmap`), batches
    [devices, substeps, b, ...] (`sharding.split_for_pmap`) and one rng; the state is donated.
    """
    return jax.pmap(
        functools.partial(train_steps, model, optimizer, ema_decay, axis_name=PMAP_AXIS),
        axis_name=PMAP_AXIS,
        in_axes=(0, 0, None),
        donate_argnums=(0,),
    )
