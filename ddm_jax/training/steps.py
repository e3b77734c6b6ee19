"""The train step as a pure function, and the loss functions of the models it trains.

A loss function is `loss_fn(params, rng, batch, axis_name) -> ((loss, metrics), grads)`: the mean
loss of the batch, scalar metrics of the whole batch (the key "loss" among them) and the gradients.
`train_step` applies one AdamW step with it; `train_steps` several per call. They run under
jax.jit over a device mesh (the trainer's path: the batch sharded over "data", the state
replicated) and, with `axis_name`, under jax.pmap (`pmap_train_steps`); both give the step of the
global batch (tests/test_multidevice.py; with dropout, other draws of its masks).
"""

import functools
import math

import jax
import jax.numpy as jnp
import optax

from ddm_jax.diffusion import bits_per_dim
from ddm_jax.models.vdm import VDM
from ddm_jax.training.train_state import TrainState, apply_updates


def batch_mean(x: jax.Array, axis_name=None) -> jax.Array:
    """The mean over the batch: this shard's, pmean'd over `axis_name` under pmap."""
    mean = jnp.mean(x)
    return mean if axis_name is None else jax.lax.pmean(mean, axis_name)


def train_step(loss_fn, optimizer, ema_decay, state: TrainState, batch, rng, axis_name=None):
    """One AdamW step on `loss_fn` (this module's docstring) for `batch`; returns the new state and
    the loss function's metrics with the gradient norm.

    Under jax.pmap, `axis_name` is the data axis: each device holds its shard of the global batch,
    gradients are pmean'd over the axis (the loss function pmeans its metrics), and the step equals
    the jit step on the global batch when every example's randomness depends on its row of the
    global batch (VDM's docstring), except for dropout, whose masks are drawn per device.
    """
    rng = jax.random.fold_in(rng, state.step)
    (_, metrics), grads = loss_fn(state.params, rng, batch, axis_name)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    state = apply_updates(state, grads, optimizer, ema_decay)
    return state, {**metrics, "grad_norm": optax.tree.norm(grads)}


def train_steps(loss_fn, optimizer, ema_decay, state: TrainState, batches, rng, axis_name=None):
    """Several train steps in one call, on batches with leaves [substeps, B, ...]; metrics [substeps].

    The steps are traced one after the other rather than as a lax.scan: XLA:CPU (jaxlib 0.10.1)
    ran the scan's loop body about 40x slower than the same step outside a loop (2.0 s against
    0.05 s for the digits step), even with a single substep.
    """
    metrics = []
    for i in range(jax.tree.leaves(batches)[0].shape[0]):
        batch = jax.tree.map(lambda x: x[i], batches)
        state, step_metrics = train_step(loss_fn, optimizer, ema_decay, state, batch, rng, axis_name)
        metrics.append(step_metrics)
    return state, jax.tree.map(lambda *m: jnp.stack(m), *metrics)


PMAP_AXIS = "batch"


def pmap_train_steps(loss_fn, optimizer, ema_decay):
    """`train_steps` under jax.pmap over the local devices, pmean over PMAP_AXIS.

    Takes the state with a leading device axis (`sharding.stack_for_pmap`), batches
    [devices, substeps, b, ...] (`sharding.split_for_pmap`) and one rng; the state is donated.
    """
    return jax.pmap(
        functools.partial(train_steps, loss_fn, optimizer, ema_decay, axis_name=PMAP_AXIS),
        axis_name=PMAP_AXIS,
        in_axes=(0, 0, None),
        donate_argnums=(0,),
    )


# Loss functions ------------------------------------------------------------------------------------


def vdm_loss_fn(model: VDM):
    """The VDM's loss function on batches {"image": integers [B, H, W, C], optional "cond"}: the
    weighted bound in bits/dim (`VDM.value_and_grad`), its terms in bits/dim, and the variance of
    the diffusion term over the batch."""

    def loss_fn(params, rng, batch, axis_name=None):
        images = batch["image"]
        (_, terms), grads = model.value_and_grad(params, rng, images, cond=batch.get("cond"), axis_name=axis_name)
        num_dims = math.prod(images.shape[1:])
        mean = functools.partial(batch_mean, axis_name=axis_name)
        reconstruction, prior, diffusion = (
            bits_per_dim(terms[name], num_dims) for name in ("reconstruction", "prior", "diffusion")
        )
        metrics = {
            "loss": mean(terms["bpd"]),  # the ELBO in bits/dim with weighting "elbo", else the weighted bound
            "reconstruction_bpd": mean(reconstruction),
            "prior_bpd": mean(prior),
            "diffusion_bpd": mean(diffusion),
            "diffusion_bpd_variance": mean(jnp.square(diffusion - mean(diffusion))),
        }
        return (metrics["loss"], metrics), grads

    return loss_fn
