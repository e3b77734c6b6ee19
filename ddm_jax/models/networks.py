"""The VDM half's noise-prediction networks eps_hat(z_t; gamma_t), by name, and their denoise_fn.

Both are Flax linen modules called as `net.apply(variables, z, gamma, *, cond=None,
train=False, ...)` with z [B, H, W, C] and gamma = -log SNR [B]; `as_denoise_fn` turns
one into the `denoise_fn(z_t, gamma_t)` the diffusion losses and samplers take.

Both take a computation `dtype` (jnp.float32 or jnp.bfloat16): parameters are float32 for
either, and the output is float32.
"""

from collections.abc import Callable

import flax.linen as nn
import jax

from ddm_jax.models.score_net import ScoreNet
from ddm_jax.models.unet import UNet

NETWORKS = {"score_net": ScoreNet, "unet": UNet}


def as_denoise_fn(
    net: nn.Module, variables, *, train: bool = False, rng: jax.Array | None = None, **conditioning
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """denoise_fn(z_t, gamma_t) -> eps_hat with variables, train, the dropout rng and the
    conditioning (cond=, context=, control=) closed over. Call it inside the jitted
    function that receives `variables` as an argument; every call uses the same `rng`."""
    rngs = None if rng is None else {"dropout": rng}
    return lambda z, gamma: net.apply(variables, z, gamma, train=train, rngs=rngs, **conditioning)
