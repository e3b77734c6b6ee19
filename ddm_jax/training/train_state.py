"""The training state and its pure update functions (usable under jit and pmap)."""

import jax
import jax.numpy as jnp
import optax
from flax import struct

from ddm_jax.checks import PyTree


@struct.dataclass
class TrainState:
    """step: int32 scalar; params and their exponential moving average; optimizer state."""

    step: jax.Array
    params: PyTree
    ema_params: PyTree
    opt_state: optax.OptState


# The uses of a run's key (jax.random.PRNGKey(training.seed)), each drawing from fold_in(key, its index).
RNG_STREAMS = ("params", "eval", "training_samples", "train", "sample_mode")


def stream_key(rng: jax.Array, stream: str) -> jax.Array:
    """The key of one use of a run's key (a name of RNG_STREAMS): different uses never share draws.

    params: the initial parameters; eval: held-out losses; training_samples: the sample grids of
    training; train: the train steps (each folds in its step); sample_mode: --mode=sample."""
    return jax.random.fold_in(rng, RNG_STREAMS.index(stream))


def create_train_state(params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0, EMA equal to params, fresh optimizer state."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        # A copy, so that params and ema_params never share a buffer (buffer donation).
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
    )


def ema_update(ema: PyTree, params: PyTree, decay: float | jax.Array) -> PyTree:
    """decay * ema + (1 - decay) * params, leafwise, keeping each EMA leaf's dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def apply_updates(
    state: TrainState,
    grads: PyTree,
    optimizer: optax.GradientTransformation,
    ema_decay: float | jax.Array,
) -> TrainState:
    """One optimizer step on `grads`, then the EMA of the new params, then step + 1."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(
        step=state.step + 1,
        params=params,
        ema_params=ema_update(state.ema_params, params, ema_decay),
        opt_state=opt_state,
    )
