"""diffusers' UNet2DConditionModel in the Stable Diffusion 1.x / 2.x layouts, in Flax.

The latent noise-prediction network of latent diffusion (Rombach et al., 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", Sec. 3.3): the DDPM UNet of ResnetBlock2D
blocks with the timestep embedding added in every block, and Transformer2DModel blocks
(self-attention, cross-attention to the text tokens, GEGLU feed-forward) at chosen
resolutions. The module's fields are the keys of diffusers' config.json that SD-1/SD-2 use,
with diffusers' names and defaults; sub-modules carry diffusers' names (down_blocks_1,
attentions_0, transformer_blocks_0, attn2, ...), so the checkpoint maps onto the parameters
mechanically (ddm_jax.models.diffusers_io).

Block types: down CrossAttnDownBlock2D / DownBlock2D, mid UNetMidBlock2DCrossAttn, up
CrossAttnUpBlock2D / UpBlock2D. Heads per block follow diffusers: `num_attention_heads`
if given, else `attention_head_dim` (which in SD configs is the NUMBER of heads, an int or
one per down block); down block i and the up block at the same depth use entry i, the mid
block the last entry; each head has width channels // heads.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddm_jax.checks import check, check_choice, is_int
from ddm_jax.models.sd_layers import (
    GEGLU,
    Attention,
    Dense,
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    conv,
    group_norm,
    layer_norm,
    timestep_embedding,
)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

IntOrInts = int | tuple[int, ...]


def per_block(value: IntOrInts, num_blocks: int) -> tuple[int, ...]:
    """An int repeated for each block, or the per-block tuple itself."""
    return (value,) * num_blocks if isinstance(value, int) else tuple(value)


class BasicTransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock (layer_norm, GEGLU): pre-norm self-attention attn1,
    cross-attention attn2 to the text tokens, and the feed-forward ff.net_0 (GEGLU of width
    4 dim) -> ff.net_2, each added back to its input."""

    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        attention = lambda name: Attention(self.heads, self.dim_head, dtype=self.dtype, name=name)
        x = x + attention("attn1")(layer_norm(1e-5, "norm1", self.dtype)(x))
        x = x + attention("attn2")(layer_norm(1e-5, "norm2", self.dtype)(x), context)
        return x + FeedForward(4 * dim, dtype=self.dtype, name="ff")(layer_norm(1e-5, "norm3", self.dtype)(x))


class FeedForward(nn.Module):
    """diffusers' FeedForward with GEGLU: net_2(net_0(x)) (net_1 is dropout)."""

    inner_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.inner_dim, dtype=self.dtype, name="net_0")(x)
        return Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class Transformer2DModel(nn.Module):
    """diffusers' Transformer2DModel on continuous inputs: x + proj_out(blocks(proj_in(norm(x))))
    over the H*W positions, proj_in/proj_out as 1x1 convs (SD-1) or linear layers
    (`use_linear_projection`, SD-2); GroupNorm eps 1e-6 as in diffusers."""

    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        project = lambda name: (
            Dense(channels, dtype=self.dtype, name=name)
            if self.use_linear_projection
            else conv(channels, 1, name, self.dtype)
        )
        h = group_norm(self.groups, 1e-6, "norm", self.dtype)(x)
        h = project("proj_in")(h).reshape(batch, height * width, channels)
        for i in range(self.num_layers):
            block = BasicTransformerBlock(
                self.heads, channels // self.heads, self.dtype, name=f"transformer_blocks_{i}"
            )
            h = block(h, context)
        return x + project("proj_out")(h.reshape(x.shape))


class UNetBlock(nn.Module):
    """The fields and sub-modules every UNet block shares (a base class; not called itself)."""

    out_channels: int
    num_layers: int
    heads: int | None  # None: no attentions (DownBlock2D / UpBlock2D)
    transformer_layers: int
    groups: int
    eps: float
    use_linear_projection: bool
    dtype: Dtype

    def resnet(self, i: int, scale: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(self.out_channels, self.groups, self.eps, scale, self.dtype, name=f"resnets_{i}")

    def attention(self, i: int) -> Transformer2DModel:
        return Transformer2DModel(
            self.heads,
            self.transformer_layers,
            self.groups,
            self.use_linear_projection,
            self.dtype,
            name=f"attentions_{i}",
        )


class DownBlock(UNetBlock):
    """diffusers' CrossAttnDownBlock2D (heads set) or DownBlock2D (heads None): num_layers x
    (resnet [-> attention]), then the stride-2 downsampler. Returns the output and the
    states the up path takes as skip connections (one per layer, and the downsampled one)."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, h, temb, context) -> tuple[jax.Array, list[jax.Array]]:
        states = []
        for i in range(self.num_layers):
            h = self.resnet(i)(h, temb)
            if self.heads is not None:
                h = self.attention(i)(h, context)
            states.append(h)
        if self.add_downsample:
            h = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(h)
            states.append(h)
        return h, states


class UpBlock(UNetBlock):
    """diffusers' CrossAttnUpBlock2D (heads set) or UpBlock2D (heads None): per layer,
    concatenate the last skip state along channels, resnet [-> attention]; then the
    nearest-neighbour upsampler."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, h, skips: Sequence[jax.Array], temb, context) -> jax.Array:
        for i in range(self.num_layers):
            h = self.resnet(i)(jnp.concatenate([h, skips[-1 - i]], axis=-1), temb)
            if self.heads is not None:
                h = self.attention(i)(h, context)
        if self.add_upsample:
            h = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(h)
        return h


class MidBlock(UNetBlock):
    """diffusers' UNetMidBlock2DCrossAttn: resnet -> attention -> resnet, the resnets dividing
    by `scale` (mid_block_scale_factor)."""

    scale: float = 1.0

    @nn.compact
    def __call__(self, h, temb, context) -> jax.Array:
        h = self.resnet(0, self.scale)(h, temb)
        h = self.attention(0)(h, context)
        return self.resnet(1, self.scale)(h, temb)


class UNet2DConditionModel(nn.Module):
    """diffusers' UNet2DConditionModel (SD-1.x/2.x subset), NHWC.

    `apply({"params": p}, sample [B, H, W, in_channels], timestep [B] or scalar (SD's 0..999,
    int or float), encoder_hidden_states [B, L, cross_attention_dim])` -> the prediction
    [B, H, W, out_channels] (eps or v, as the checkpoint was trained), float32. H and W must
    be multiples of 2^(number of blocks - 1).

    ControlNet residuals (Zhang et al., 2023): `down_residuals`, a sequence in diffusers'
    order of `down_block_additional_residuals` (conv_in's output, then each down block's
    per-layer and downsampled states), is added to the skip states; `mid_residual` to the
    mid block's output. Either may be given alone.

    Fields are diffusers' config.json keys (defaults as diffusers'); `dtype` is the
    computation dtype.
    """

    sample_size: int | tuple[int, ...] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrInts = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: IntOrInts = 1
    attention_head_dim: IntOrInts = 8
    num_attention_heads: IntOrInts | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False  # attention logits are always float32 here (see sd_layers)
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        self.check_fields()
        super().__post_init__()

    def check_fields(self) -> None:
        """Raises ArgumentError naming the first field diffusers would build differently or
        that this implementation does not support."""
        n = len(self.block_out_channels)
        check(n >= 1, "block_out_channels", self.block_out_channels, "at least one width")
        for key, types, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
        ):
            check(len(types) == n, key, types, f"{n} block types, one per block_out_channels entry")
            for i, block_type in enumerate(types):
                check_choice(f"{key}[{i}]", block_type, allowed)
        check_choice("mid_block_type", self.mid_block_type, MID_BLOCK_TYPES)
        check(is_int(self.cross_attention_dim), "cross_attention_dim", self.cross_attention_dim, "an integer")
        for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, int):
                check(len(value) == n, key, value, f"an integer or {n} integers, one per block")
        heads_key = "attention_head_dim" if self.num_attention_heads is None else "num_attention_heads"
        for i, (width, heads) in enumerate(zip(self.block_out_channels, self.heads_per_block(), strict=True)):
            check(width % heads == 0, heads_key, heads, f"head counts dividing block {i}'s width {width}")
            check(width % self.norm_num_groups == 0, "norm_num_groups", self.norm_num_groups, f"a divisor of {width}")
        check(self.conv_in_kernel % 2 == 1, "conv_in_kernel", self.conv_in_kernel, "an odd kernel size")
        check(self.conv_out_kernel % 2 == 1, "conv_out_kernel", self.conv_out_kernel, "an odd kernel size")

    def heads_per_block(self) -> tuple[int, ...]:
        """Attention heads of each down block: diffusers' `num_attention_heads or attention_head_dim`."""
        heads = self.num_attention_heads or self.attention_head_dim
        return per_block(heads, len(self.block_out_channels))

    def example_inputs(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The smallest inputs that build every parameter (for init and jax.eval_shape)."""
        size = 2 ** (len(self.block_out_channels) - 1)
        return (
            jnp.zeros((1, size, size, self.in_channels), self.dtype),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 1, self.cross_attention_dim), self.dtype),
        )

    def num_down_residuals(self) -> int:
        """How many skip states (and ControlNet down residuals) the down path produces."""
        layers = per_block(self.layers_per_block, len(self.block_out_channels))
        return 1 + sum(layers) + len(layers) - 1

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timestep: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
        down_residuals: Sequence[jax.Array] | None = None,
        mid_residual: jax.Array | None = None,
    ) -> jax.Array:
        n = len(self.block_out_channels)
        factor = 2 ** (n - 1)
        check(
            sample.ndim == 4 and sample.shape[1] % factor == 0 and sample.shape[2] % factor == 0,
            "sample",
            f"array of shape {sample.shape}",
            f"[B, H, W, C] with H and W multiples of {factor}",
        )
        if down_residuals is not None:
            check(
                len(down_residuals) == self.num_down_residuals(),
                "down_residuals",
                f"{len(down_residuals)} arrays",
                f"{self.num_down_residuals()} arrays (diffusers' down_block_additional_residuals)",
            )
        heads = self.heads_per_block()
        layers = per_block(self.layers_per_block, n)
        transformer_layers = per_block(self.transformer_layers_per_block, n)
        context = encoder_hidden_states.astype(self.dtype)
        settings = lambda i, up: dict(
            out_channels=self.block_out_channels[i],
            num_layers=layers[i] + up,
            transformer_layers=transformer_layers[i],
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            use_linear_projection=self.use_linear_projection,
            dtype=self.dtype,
        )

        timesteps = jnp.broadcast_to(jnp.asarray(timestep), (sample.shape[0],))
        t_emb = timestep_embedding(
            timesteps, self.block_out_channels[0], flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )
        temb_dim = self.time_embedding_dim or 4 * self.block_out_channels[0]
        temb = TimestepEmbedding(temb_dim, self.dtype, name="time_embedding")(t_emb.astype(self.dtype))

        h = sample.astype(self.dtype)
        if self.center_input_sample:
            h = 2 * h - 1.0
        h = conv(self.block_out_channels[0], self.conv_in_kernel, "conv_in", self.dtype)(h)
        skips = [h]
        for i, block_type in enumerate(self.down_block_types):
            block = DownBlock(
                **settings(i, 0),
                heads=heads[i] if block_type == "CrossAttnDownBlock2D" else None,
                add_downsample=i < n - 1,
                downsample_padding=self.downsample_padding,
                name=f"down_blocks_{i}",
            )
            h, states = block(h, temb, context)
            skips += states
        if down_residuals is not None:
            skips = [s + r.astype(self.dtype) for s, r in zip(skips, down_residuals, strict=True)]

        h = MidBlock(**settings(n - 1, 0), heads=heads[-1], scale=self.mid_block_scale_factor, name="mid_block")(
            h, temb, context
        )
        if mid_residual is not None:
            h = h + mid_residual.astype(self.dtype)

        for i, block_type in enumerate(self.up_block_types):
            depth = n - 1 - i  # the down block at the same resolution
            num_layers = layers[depth] + 1
            block = UpBlock(
                **settings(depth, 1),
                heads=heads[depth] if block_type == "CrossAttnUpBlock2D" else None,
                add_upsample=i < n - 1,
                name=f"up_blocks_{i}",
            )
            h = block(h, skips[-num_layers:], temb, context)
            skips = skips[:-num_layers]

        h = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, "conv_norm_out", self.dtype)(h))
        return conv(self.out_channels, self.conv_out_kernel, "conv_out", self.dtype)(h).astype(jnp.float32)
