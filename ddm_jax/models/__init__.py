"""Noise-prediction networks eps_hat(z_t; gamma_t): VDM's ScoreNet and a DDPM UNet.

Both are Flax linen modules called as `net.apply(variables, z, gamma, *, cond=None,
train=False, ...)` with z [B, H, W, C] and gamma = -log SNR [B]; `as_denoise_fn` turns
one into the `denoise_fn(z_t, gamma_t)` the diffusion losses and samplers take.

Both take a computation `dtype` (jnp.float32 or jnp.bfloat16; config "float32" or
"bfloat16"): parameters are float32 for either, and the output is float32.
"""
import dataclasses
from typing import Callable, Optional

import flax.linen as nn
import jax

from ddm_jax.models.layers import (
    COMPUTE_DTYPES,
    AttentionBlock,
    GammaEmbedding,
    MultiHeadAttention,
    OutputHead,
    ResBlock,
    base2_fourier_features,
    compute_dtype,
    fourier_exponents,
    num_groups,
    sinusoidal_embedding,
)
from ddm_jax.models.score_net import ScoreNet
from ddm_jax.models.unet import UNet, UNetDecoder, UNetEncoder, add_control

NETWORKS = {"score_net": ScoreNet, "unet": UNet}


def build_network(name: str, **kwargs) -> nn.Module:
    """The network `name` ("score_net" or "unet") built from its attributes `kwargs`
    (config `model.network` and `model.<name>`); lists become tuples, since module
    attributes must be hashable, and a `dtype` name ("float32" or "bfloat16") becomes
    the jnp dtype."""
    if name not in NETWORKS:
        raise ValueError(f"model.network={name!r} is not one of {tuple(NETWORKS)}")
    cls = NETWORKS[name]
    fields = tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"model.{name} has no field {unknown[0]!r}; its fields are {fields}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if "dtype" in kwargs:
        kwargs["dtype"] = compute_dtype(f"model.{name}.dtype", kwargs["dtype"])
    return cls(**kwargs)


def as_denoise_fn(
    net: nn.Module, variables, *, train: bool = False, rng: Optional[jax.Array] = None, **conditioning
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """denoise_fn(z_t, gamma_t) -> eps_hat with variables, train, the dropout rng and the
    conditioning (cond=, context=, control=) closed over. Call it inside the jitted
    function that receives `variables` as an argument; every call uses the same `rng`."""
    rngs = None if rng is None else {"dropout": rng}
    return lambda z, gamma: net.apply(variables, z, gamma, train=train, rngs=rngs, **conditioning)


__all__ = [
    "COMPUTE_DTYPES",
    "AttentionBlock",
    "GammaEmbedding",
    "MultiHeadAttention",
    "NETWORKS",
    "OutputHead",
    "ResBlock",
    "ScoreNet",
    "UNet",
    "UNetDecoder",
    "UNetEncoder",
    "add_control",
    "as_denoise_fn",
    "base2_fourier_features",
    "build_network",
    "compute_dtype",
    "fourier_exponents",
    "num_groups",
    "sinusoidal_embedding",
]
