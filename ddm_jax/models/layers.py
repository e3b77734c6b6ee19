"""Layers shared by the ScoreNet and the UNet.

Images are [B, H, W, C]; gamma = -log SNR is [B]; embeddings are [B, E];
token sequences (text context) are [B, L, D].

Mixed precision (Flax's standard pattern): every module here has a `dtype` field, the
computation dtype (float32 or bfloat16), passed to its Dense/Conv/DenseGeneral/GroupNorm
layers; parameters stay float32 (their default param_dtype), so a checkpoint is the same
for both. A few numerically sensitive parts are float32 whatever `dtype` is: the gamma
embedding (GammaEmbedding), GroupNorm statistics (flax computes them in float32), the
attention softmax (MultiHeadAttention.attention_weights) and the Fourier features of z
(base2_fourier_features, used before the network casts z to `dtype`).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddm_jax.checks import ArgumentError, check, check_int, check_interval, is_int

MAX_GROUPS = 32

# The computation dtypes a network may use, by their config names.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Dtype = Any  # a jnp dtype such as jnp.float32


def compute_dtype(argument: str, value) -> Dtype:
    """The jnp computation dtype `value` names: one of COMPUTE_DTYPES' names ("float32",
    "bfloat16") or that dtype itself. Raises ArgumentError naming `argument` otherwise."""
    if isinstance(value, str) or value is None:  # (np.dtype(None) would be float64)
        name = value
    else:
        try:
            name = jnp.dtype(value).name
        except TypeError:
            name = None
    if name not in COMPUTE_DTYPES:
        shown = value if isinstance(value, str) or name is None else name
        raise ArgumentError(argument, shown, f"one of {tuple(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def num_groups(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """The GroupNorm group count for `channels`: the largest divisor of `channels`
    that is at most `max_groups` and leaves at least 2 channels per group.

    This is DDPM/VDM's 32 for widths 64, 128, 256, ... and still works for small or odd
    widths (16 -> 8 groups, 48 -> 24). Groups of one channel are avoided: GroupNorm
    would then remove any per-channel shift, i.e. the added gamma/cond embedding.
    """
    largest = max(1, min(max_groups, channels // 2))
    return max(g for g in range(1, largest + 1) if channels % g == 0)


def group_norm(channels: int, name: str | None = None, dtype: Dtype = jnp.float32) -> nn.GroupNorm:
    """GroupNorm over `channels` channels with `num_groups(channels)` groups, returning
    `dtype` (flax computes its statistics and the normalisation in float32)."""
    return nn.GroupNorm(num_groups=num_groups(channels), name=name, dtype=dtype)


def zero_conv(features: int, kernel_size=(3, 3), name: str | None = None, dtype: Dtype = jnp.float32) -> nn.Conv:
    """Convolution whose kernel and bias start at exactly zero (it outputs 0 at init),
    computed in `dtype`."""
    return nn.Conv(
        features,
        kernel_size,
        kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        name=name,
    )


def sinusoidal_embedding(x: jax.Array, dim: int) -> jax.Array:
    """Transformer/Fairseq sinusoidal embedding of x [B] -> [B, dim].

    With h = dim // 2 and f_i = 10000^(-i / (h - 1)), i < h:
    [sin(x f_0), ..., sin(x f_{h-1}), cos(x f_0), ..., cos(x f_{h-1})], plus one zero
    column when dim is odd.
    """
    if dim < 4:
        raise ValueError(f"sinusoidal embedding width must be >= 4; got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = x.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def fourier_exponents(first: int, last: int, step: int) -> tuple[int, ...]:
    """The exponents n of the base-2 Fourier features: range(first, last + 1, step)."""
    return tuple(range(first, last + 1, step))


def base2_fourier_features(z: jax.Array, first: int, last: int, step: int) -> jax.Array:
    """VDM's base-2 Fourier features, concatenated to z along channels.

    For exponents n_0 < n_1 < ... (fourier_exponents) and channels c, let
    f[..., c * len(n) + i] = 2^{n_i} pi z[..., c]. Returns [z, sin(f), cos(f)], i.e.
    C (1 + 2 len(n)) channels. (The VDM paper's 2^n pi z; its code used 2^n 2 pi z.)

    Computed in at least float32, whatever z's dtype: with n = 8 the phase 2^8 pi z
    changes by pi for a change of 1/256 in z, so bfloat16's 8-bit mantissa would leave
    sin(f) and cos(f) meaningless. Cast the result to the computation dtype afterwards.
    """
    z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    exponents = jnp.asarray(fourier_exponents(first, last, step), dtype=z.dtype)
    freqs = jnp.pi * 2.0**exponents
    f = (z[..., :, None] * freqs).reshape(*z.shape[:-1], -1)
    return jnp.concatenate([z, jnp.sin(f), jnp.cos(f)], axis=-1)


def check_optional_dim(argument: str, value) -> None:
    """None or a positive integer (a feature width)."""
    check(value is None or (is_int(value) and value >= 1), argument, value, "None or a positive integer")


def check_shared_fields(dropout: float, gamma_min: float, gamma_max: float, cond_dim, num_heads: int) -> None:
    """Checks the attributes both networks have."""
    check_interval("dropout", dropout, 0.0, 1.0)
    check(gamma_min < gamma_max, "gamma_max", gamma_max, f"a value > gamma_min={gamma_min!r}")
    check_optional_dim("cond_dim", cond_dim)
    check_int("num_heads", num_heads, minimum=1)


def check_feature_input(field: str, dim: int | None, value: jax.Array | None, arg: str, rank: int, batch: int) -> None:
    """Raises ValueError unless `value` is None exactly when `dim` is None, and otherwise
    has rank `rank`, leading size `batch` and trailing size `dim`."""
    if dim is None and value is not None:
        raise ValueError(
            f"{field}=None, but `{arg}` of shape {tuple(value.shape)} was given; "
            f"set {field}={value.shape[-1]} to condition on it"
        )
    if dim is not None and value is None:
        raise ValueError(f"{field}={dim} needs a `{arg}` array with last axis {dim}; got {arg}=None")
    if value is not None and (value.ndim != rank or value.shape[0] != batch or value.shape[-1] != dim):
        expected = (batch, *(["L"] * (rank - 2)), dim)
        raise ValueError(
            f"{field}={dim} expects `{arg}` of shape ({', '.join(map(str, expected))}); got {tuple(value.shape)}"
        )


class GammaEmbedding(nn.Module):
    """Conditioning embedding of gamma (and an optional cond vector) -> [B, features].

    t = (gamma - gamma_min) / (gamma_max - gamma_min) in [0, 1];
    emb = swish(W2 swish(W1 sinusoid(1000 t) + Wc cond)), the cond term only when given.

    Computed in float32 throughout, whatever `dtype` (the network's computation dtype)
    is, and cast to `dtype` after the last Dense, where every ResBlock's projection takes
    it. The argument 1000 t must be float32: bfloat16's spacing near 1000 is 4, i.e. about
    0.07 in gamma, more than the gap between neighbouring steps of a 1000-step sampler,
    so those steps would get the same embedding. The three Dense layers stay float32 as
    well: the embedding costs O(B features^2), nothing beside the convolutions, and it
    carries the noise level that every block is conditioned on.
    """

    sinusoid_dim: int
    features: int
    gamma_min: float
    gamma_max: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, gamma: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        gamma = jnp.asarray(gamma)
        gamma = gamma.astype(jnp.promote_types(gamma.dtype, jnp.float32))
        t = (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
        h = nn.Dense(self.features, dtype=jnp.float32, name="dense_0")(
            sinusoidal_embedding(1000.0 * t, self.sinusoid_dim)
        )
        if cond is not None:
            h = h + nn.Dense(self.features, dtype=jnp.float32, name="cond_proj")(cond)
        h = nn.swish(h)
        return nn.swish(nn.Dense(self.features, dtype=jnp.float32, name="dense_1")(h)).astype(self.dtype)


class ResBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3 -> + Dense(emb) -> GroupNorm -> swish -> dropout
    -> zero-initialised conv3x3, plus the input (1x1 conv when the width changes).

    The block is the identity (or the 1x1 projection) at init. Computed in `dtype`.
    """

    features: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, *, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        h = nn.swish(group_norm(x.shape[-1], name="norm_0", dtype=self.dtype)(x))
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv_0")(h)
        h = h + nn.Dense(self.features, dtype=self.dtype, name="emb_proj")(emb)[:, None, None, :]
        h = nn.swish(group_norm(self.features, name="norm_1", dtype=self.dtype)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = zero_conv(self.features, name="conv_1", dtype=self.dtype)(h)
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class MultiHeadAttention(nn.Module):
    """Multi-head attention of queries x [B, N, C] over keys/values from
    context [B, L, Dc] -> [B, N, C], with a zero-initialised output projection.

    Self-attention is context = x. Projections are computed in `dtype`; the softmax in
    float32 (see attention_weights).
    """

    num_heads: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide the attention width; got {channels} channels")
        heads = (self.num_heads, channels // self.num_heads)
        q = nn.DenseGeneral(heads, dtype=self.dtype, name="query")(x)
        k = nn.DenseGeneral(heads, dtype=self.dtype, name="key")(context)
        v = nn.DenseGeneral(heads, dtype=self.dtype, name="value")(context)
        weights = self.attention_weights(q, k)
        out = jnp.einsum("bhnl,blhd->bnhd", weights, v)
        return nn.DenseGeneral(
            channels,
            axis=(-2, -1),
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="out",
        )(out)

    def attention_weights(self, q: jax.Array, k: jax.Array) -> jax.Array:
        """softmax_l(q_n . k_l / sqrt(d)) for q [B, N, h, d], k [B, L, h, d] -> [B, h, N, L].

        A method of its own so that editing code (prompt-to-prompt, null-text inversion)
        can read or replace attention maps with `nn.intercept_methods`.

        The logits come out of the product in float32 (accumulated in float32 when q and k
        are bfloat16) and the softmax is computed in float32: bfloat16's spacing between 64
        and 128 is 0.5, so rounding logits of that size could change a weight by a factor
        up to exp(0.25) = 1.28. The weights are returned in q's dtype (the compute dtype).
        """
        logits = jnp.einsum("bnhd,blhd->bhnl", q, k, preferred_element_type=jnp.float32)
        return jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1).astype(q.dtype)


class AttentionBlock(nn.Module):
    """x + SelfAttention(GroupNorm(x)) over the H*W positions of x [B, H, W, C]; when
    `context` [B, L, Dc] is given, then also h + CrossAttention(GroupNorm(h), context).

    Output projections are zero-initialised, so the block is the identity at init.
    Computed in `dtype`.
    """

    num_heads: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        batch, height, width, channels = x.shape

        def normalized_tokens(h, name):
            return group_norm(channels, name=name, dtype=self.dtype)(h).reshape(batch, height * width, channels)

        def attention(name):
            return MultiHeadAttention(self.num_heads, dtype=self.dtype, name=name)

        tokens = normalized_tokens(x, "norm_self")
        h = x + attention("self_attention")(tokens, tokens).reshape(x.shape)
        if context is not None:
            tokens = normalized_tokens(h, "norm_cross")
            h = h + attention("cross_attention")(tokens, context).reshape(x.shape)
        return h


class OutputHead(nn.Module):
    """GroupNorm -> swish -> zero-initialised conv3x3 to `out_channels` (0 at init).

    Computed in `dtype`; the result is float32, since the losses are computed in float32.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, out_channels: int) -> jax.Array:
        h = nn.swish(group_norm(h.shape[-1], name="norm_out", dtype=self.dtype)(h))
        return zero_conv(out_channels, name="conv_out", dtype=self.dtype)(h).astype(jnp.float32)
