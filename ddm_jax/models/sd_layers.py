"""Layers shared by the Stable Diffusion UNet, its VAE and its CLIP text encoder.

Each layer mirrors the diffusers module of the same name (diffusers/models/resnet.py,
attention_processor.py, embeddings.py, activations.py, downsampling.py, upsampling.py):
same sub-module names (norm1, conv1, to_q, to_out_0, ...), same arithmetic, so that a
diffusers checkpoint maps onto the parameters key by key (`ddm_jax.models.diffusers_io`).

Images are NHWC [B, H, W, C]; token sequences are [B, N, D]. Every layer computes in its
`dtype` (float32, bfloat16 or float16) with the parameters it is given; the normalisation
statistics (flax's GroupNorm/LayerNorm), the sinusoidal timestep embedding and the
attention logits and softmax are float32 whatever `dtype` is.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any  # a jnp floating dtype


def group_norm(groups: int, eps: float, name: str, dtype: Dtype) -> nn.GroupNorm:
    """torch.nn.GroupNorm(groups, eps): per-group mean and (biased) variance, computed in
    float32 in two passes as torch does (flax's fast E[x^2] - E[x]^2 loses digits)."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def layer_norm(eps: float, name: str, dtype: Dtype) -> nn.LayerNorm:
    """torch.nn.LayerNorm over the last axis, two-pass float32 statistics."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class Dense(nn.Dense):
    """torch.nn.Linear on the last axis: flax's Dense (the same kernel [D_in, features] and bias)
    applied to x flattened to rows [prod(x.shape[:-1]), D_in].

    Only the speed differs. On a token tensor [B, N, D], the kernel gradient contracts two axes;
    XLA:CPU (jaxlib 0.10.1) lays it out as a transposed copy and a slower dot, about four times
    the time of the same gradient of rows (experiments/results/train_step_benchmark.md).
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.features)


def conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1, padding: int | None = None) -> nn.Conv:
    """torch.nn.Conv2d(kernel, stride, padding) on NHWC; `padding` defaults to kernel // 2."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


def timestep_embedding(
    timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10_000.0
) -> jax.Array:
    """diffusers' `get_timestep_embedding` (the DDPM/Transformer sinusoids) of timesteps [B] -> [B, dim].

    With h = dim // 2 and f_i = max_period^(-i / (h - freq_shift)), i < h, the embedding is
    [sin(t f), cos(t f)], or [cos(t f), sin(t f)] when `flip_sin_to_cos`, plus one zero
    column when dim is odd. Computed in float32 (the timesteps of SD are 0..999).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: linear_2(silu(linear_1(t_emb))) -> [B, features]."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_emb: jax.Array) -> jax.Array:
        h = nn.silu(Dense(self.features, dtype=self.dtype, name="linear_1")(t_emb))
        return Dense(self.features, dtype=self.dtype, name="linear_2")(h)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D (time_embedding_norm="default", the DDPM residual block):

    h = conv1(silu(norm1(x))) [+ time_emb_proj(silu(temb))]; h = conv2(silu(norm2(h)));
    out = (shortcut(x) + h) / output_scale_factor, where shortcut is the 1x1 `conv_shortcut`
    when the width changes. Without `temb` (the VAE) there is no time_emb_proj.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, "norm1", self.dtype)(x))
        h = conv(self.out_channels, 3, "conv1", self.dtype)(h)
        if temb is not None:
            h = h + Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2", self.dtype)(h))
        h = conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """diffusers' Downsample2D with a conv: a 3x3 stride-2 `conv` with `padding` on each side,
    or, for padding=0 (the VAE encoder), zero padding of one row and column at the bottom and
    right only (torch's F.pad(x, (0, 1, 0, 1))) before an unpadded conv."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, "conv", self.dtype, stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
    """diffusers' Upsample2D with a conv: nearest-neighbour 2x upsampling, then a 3x3 `conv`."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, "conv", self.dtype)(x)


def multi_head_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, *, causal: bool = False
) -> jax.Array:
    """softmax(q k^T / sqrt(d) [+ causal mask]) v per head (Vaswani et al., 2017, eq. 1).

    q [B, N, h d], k and v [B, M, h d] -> [B, N, h d]. The logits come out of the product in
    float32 and the softmax is float32 (diffusers' `upcast_attention`/`upcast_softmax`); with
    `causal`, query n attends to keys m <= n only (CLIP's text transformer).
    """
    batch, n, width = q.shape
    head_dim = width // num_heads
    split = lambda x: x.reshape(*x.shape[:2], num_heads, head_dim)
    logits = jnp.einsum("bnhd,bmhd->bhnm", split(q), split(k), preferred_element_type=jnp.float32)
    logits = logits * head_dim**-0.5
    if causal:
        m = k.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((n, m), dtype=bool)), logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhnm,bmhd->bnhd", weights, split(v)).reshape(batch, n, width)


class Attention(nn.Module):
    """diffusers' Attention projection layout: to_q, to_k, to_v (with bias when `bias`) and
    to_out_0 (always with bias) around multi-head attention of `heads` heads of width
    `dim_head`.

    Called on tokens x [B, N, C] with an optional `context` [B, M, D] (cross-attention;
    self-attention without it) -> [B, N, C]. With `norm_num_groups` set it is the VAE's
    spatial self-attention: x is an image [B, H, W, C], normalised by `group_norm`,
    attended over its H*W positions and added back to x (diffusers' residual_connection).
    """

    heads: int
    dim_head: int
    bias: bool = False
    norm_num_groups: int | None = None
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        tokens = x
        if self.norm_num_groups is not None:
            batch, height, width, channels = x.shape
            tokens = group_norm(self.norm_num_groups, self.norm_eps, "group_norm", self.dtype)(x)
            tokens = tokens.reshape(batch, height * width, channels)
        context = tokens if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda features, name, bias=self.bias: Dense(features, use_bias=bias, dtype=self.dtype, name=name)
        q, k, v = dense(inner, "to_q")(tokens), dense(inner, "to_k")(context), dense(inner, "to_v")(context)
        out = dense(x.shape[-1], "to_out_0", bias=True)(multi_head_attention(q, k, v, self.heads))
        if self.norm_num_groups is not None:
            return x + out.reshape(x.shape)
        return out


class GEGLU(nn.Module):
    """GEGLU (Shazeer, 2020, "GLU Variants Improve Transformer"): proj(x) = [a, g] ->
    a * gelu(g), with the exact (erf) GELU as torch's F.gelu."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a, g = jnp.split(Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return a * nn.gelu(g, approximate=False)
