"""DDPM-style UNet with optional cross-attention to a context sequence and
ControlNet residual inputs.

The UNet is an encoder (conv_in, down path, middle block) and a decoder (up path,
output head), each a module of its own, so a ControlNet can train a copy of the
encoder (`UNet.build_encoder`, parameters under `params["encoder"]`) and feed its
outputs back as `control` residuals.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddm_jax.checks import ArgumentError, check, check_int, is_int
from ddm_jax.models.layers import (
    AttentionBlock,
    Dtype,
    GammaEmbedding,
    OutputHead,
    ResBlock,
    check_feature_input,
    check_optional_dim,
    check_shared_fields,
    compute_dtype,
)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling of [B, H, W, C] -> [B, 2H, 2W, C]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def add_control(h: jax.Array, skips: Sequence[jax.Array], control: Sequence[jax.Array]):
    """(h + control[-1], [skip_i + control[i]]): ControlNet residuals added to the
    encoder's skip activations and middle output. Raises ValueError on a count or shape
    mismatch (`UNet.control_shapes` gives the expected shapes)."""
    if len(control) != len(skips) + 1:
        raise ValueError(
            f"control has {len(control)} arrays; expected {len(skips) + 1}: one per skip "
            f"activation of UNet.encode ({len(skips)}) plus one for the middle output"
        )
    for i, (c, target) in enumerate(zip(control, [*skips, h], strict=True)):
        if c.shape != target.shape:
            raise ValueError(
                f"control[{i}] has shape {tuple(c.shape)}; expected {tuple(target.shape)} (see UNet.control_shapes)"
            )
    return h + control[-1], [s + c for s, c in zip(skips, control[:-1], strict=True)]


class UNetEncoder(nn.Module):
    """conv_in -> per level: num_res_blocks x (ResNet block, attention when the feature
    map height is in attn_resolutions), then a stride-2 conv except at the last level ->
    middle (ResNet, attention, ResNet).

    Returns (h, skips, emb): the middle output, the skip activations (conv_in output,
    every block output, every downsampling output, in that order) and the conditioning
    embedding [B, 4 ch], all in the computation dtype `dtype`. Attributes are the UNet's.
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    num_heads: int
    gamma_min: float
    gamma_max: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        z: jax.Array,
        gamma: jax.Array,
        *,
        cond: jax.Array | None = None,
        context: jax.Array | None = None,
        hint: jax.Array | None = None,
        train: bool = False,
    ):
        emb = GammaEmbedding(self.ch, 4 * self.ch, self.gamma_min, self.gamma_max, dtype=self.dtype, name="embedding")(
            gamma, cond
        )
        # conv_in in float32: bfloat16's spacing near |z| = 1 (2^-7) is an 8-bit bin's width.
        h = nn.Conv(self.ch, (3, 3), name="conv_in")(z).astype(self.dtype)
        if hint is not None:
            h = h + hint.astype(self.dtype)
        skips = [h]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = self.res_block(self.ch * mult, f"down_{level}_block_{i}")(h, emb, train=train)
                if h.shape[1] in self.attn_resolutions:
                    h = self.attention_block(f"down_{level}_attention_{i}")(h, context)
                skips.append(h)
            if level < len(self.ch_mult) - 1:
                downsample = nn.Conv(
                    h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype, name=f"down_{level}_downsample"
                )
                h = downsample(h)
                skips.append(h)
        h = self.res_block(h.shape[-1], "mid_block_0")(h, emb, train=train)
        h = self.attention_block("mid_attention")(h, context)
        h = self.res_block(h.shape[-1], "mid_block_1")(h, emb, train=train)
        return h, skips, emb

    @nn.nowrap
    def res_block(self, features: int, name: str) -> ResBlock:
        return ResBlock(features, self.dropout, dtype=self.dtype, name=name)

    @nn.nowrap
    def attention_block(self, name: str) -> AttentionBlock:
        return AttentionBlock(self.num_heads, dtype=self.dtype, name=name)


class UNetDecoder(nn.Module):
    """Per level, from the lowest resolution: (num_res_blocks + 1) x (ResNet block on
    concat(h, skips.pop()), attention when the height is in attn_resolutions), then
    nearest-neighbour upsampling + conv3x3 except at the top -> output head
    (GroupNorm, swish, zero-initialised conv3x3 to out_channels). Computed in `dtype`; the
    output is float32. Attributes are the UNet's.
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        h: jax.Array,
        skips: Sequence[jax.Array],
        emb: jax.Array,
        *,
        out_channels: int,
        context: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        skips = list(skips)
        for level in reversed(range(len(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                block = ResBlock(
                    self.ch * self.ch_mult[level], self.dropout, dtype=self.dtype, name=f"up_{level}_block_{i}"
                )
                h = block(jnp.concatenate([h, skips.pop()], axis=-1), emb, train=train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttentionBlock(self.num_heads, dtype=self.dtype, name=f"up_{level}_attention_{i}")(h, context)
            if level > 0:
                upsample = nn.Conv(h.shape[-1], (3, 3), dtype=self.dtype, name=f"up_{level}_upsample")
                h = upsample(upsample_nearest(h))
        return OutputHead(dtype=self.dtype, name="head")(h, out_channels)


class UNet(nn.Module):
    """DDPM-style noise predictor eps_hat(z; gamma), optionally conditioned on a cond
    vector, cross-attending to a context sequence, and taking ControlNet residuals.

    Attributes:
      ch: base width; level l has width ch * ch_mult[l]; the embedding has width 4 ch.
      ch_mult: width multipliers per level; the image is halved len(ch_mult) - 1 times.
      num_res_blocks: ResNet blocks per level on the way down (one more on the way up).
      attn_resolutions: feature-map heights at which blocks are followed by attention
        (the middle block always has attention).
      dropout: dropout rate inside the ResNet blocks, active when train=True.
      num_heads: attention heads.
      context_dim: width of the `context` sequence [B, L, context_dim]; when set, every
        attention block also cross-attends to it and `context` is required.
      gamma_min, gamma_max: the gamma range mapped to t in [0, 1] for the embedding.
      cond_dim: width of the optional `cond` vector; when set, `cond` is required.
      dtype: the computation dtype, jnp.float32 or jnp.bfloat16 (config: "float32" or
        "bfloat16"). Parameters are float32 either way, so the same parameters serve
        both. With bfloat16 the convolutions, dense layers and attention products run in
        bfloat16, while the gamma embedding, GroupNorm statistics and the attention
        softmax stay float32 (see layers.py); `encode` returns activations in `dtype`,
        and the output is float32.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_heads: int = 1
    context_dim: int | None = None
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    cond_dim: int | None = None
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        self.check_fields()
        super().__post_init__()

    @nn.nowrap
    def check_fields(self) -> None:
        """Raises ArgumentError naming the first invalid attribute."""
        check_int("ch", self.ch, minimum=4)
        check(
            isinstance(self.ch_mult, tuple)
            and len(self.ch_mult) > 0
            and all(is_int(m) and m >= 1 for m in self.ch_mult),
            "ch_mult",
            self.ch_mult,
            "a non-empty tuple of positive integers",
        )
        check_int("num_res_blocks", self.num_res_blocks, minimum=1)
        check(
            isinstance(self.attn_resolutions, tuple) and all(is_int(r) and r >= 1 for r in self.attn_resolutions),
            "attn_resolutions",
            self.attn_resolutions,
            "a tuple of positive integers (feature-map heights)",
        )
        check_optional_dim("context_dim", self.context_dim)
        check_shared_fields(self.dropout, self.gamma_min, self.gamma_max, self.cond_dim, self.num_heads)
        compute_dtype("dtype", self.dtype)

    @nn.nowrap
    def check_input_shape(self, shape) -> None:
        """Raises ArgumentError unless `shape` is an image shape (height, width, channels)
        whose height and width the down path can halve len(ch_mult) - 1 times, and
        num_heads divides the width of every attention block at that size."""
        check(
            len(shape) == 3 and min(shape) >= 1,
            "image_shape",
            tuple(shape),
            "(height, width, channels) with positive sizes",
        )
        halvings = len(self.ch_mult) - 1
        factor = 2**halvings
        check(
            shape[0] % factor == 0 and shape[1] % factor == 0,
            "ch_mult",
            self.ch_mult,
            f"at most as many levels as the image (of shape {tuple(shape)}) can be halved: it halves the image "
            f"{halvings} times, so height and width must be divisible by {factor}",
        )
        attention_widths = [self.ch * self.ch_mult[-1]] + [
            self.ch * m for level, m in enumerate(self.ch_mult) if shape[0] // 2**level in self.attn_resolutions
        ]
        for width in attention_widths:
            check(
                width % self.num_heads == 0,
                "num_heads",
                self.num_heads,
                f"a divisor of every attention block's width; one has {width} channels",
            )

    @nn.nowrap
    def skip_shapes(self, shape) -> list[tuple[int, ...]]:
        """Shapes of the skip activations `encode` returns for an input of shape
        (*batch, H, W, C), in order: conv_in, then per level its blocks and its
        downsampling (all but the last level)."""
        self.check_input_shape(shape[-3:])
        *batch, height, width, _ = shape
        channels = self.ch
        shapes = [(*batch, height, width, channels)]
        for level, mult in enumerate(self.ch_mult):
            channels = self.ch * mult
            shapes += [(*batch, height, width, channels)] * self.num_res_blocks
            if level < len(self.ch_mult) - 1:
                height, width = height // 2, width // 2
                shapes.append((*batch, height, width, channels))
        return shapes

    @nn.nowrap
    def control_shapes(self, shape) -> list[tuple[int, ...]]:
        """Shapes of the `control` arrays for an input of shape (*batch, H, W, C): the
        skip shapes, then the middle output's (the same as the last skip's)."""
        skips = self.skip_shapes(shape)
        return [*skips, skips[-1]]

    @nn.nowrap
    def build_encoder(self, name: str | None = None) -> UNetEncoder:
        """An (unbound) encoder with this UNet's settings, e.g. a ControlNet's copy."""
        return UNetEncoder(
            ch=self.ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=self.attn_resolutions,
            dropout=self.dropout,
            num_heads=self.num_heads,
            gamma_min=self.gamma_min,
            gamma_max=self.gamma_max,
            dtype=self.dtype,
            name=name,
        )

    def setup(self):
        self.encoder = self.build_encoder()
        self.decoder = UNetDecoder(
            ch=self.ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=self.attn_resolutions,
            dropout=self.dropout,
            num_heads=self.num_heads,
            dtype=self.dtype,
        )

    def encode(
        self,
        z: jax.Array,
        gamma: jax.Array,
        *,
        cond: jax.Array | None = None,
        context: jax.Array | None = None,
        hint: jax.Array | None = None,
        train: bool = False,
    ):
        """(h, skips, emb) for z [B, H, W, C], gamma [B] (or scalar); see UNetEncoder.

        hint: optional [B, H, W, ch] features added to the conv_in output (ControlNet's
        encoded control image, for a ControlNet's copy of the encoder).
        """
        if z.ndim != 4:
            raise ArgumentError("z", f"an array of shape {tuple(z.shape)}", "shape [B, H, W, C]")
        self.check_input_shape(z.shape[1:])
        batch = z.shape[0]
        check_feature_input("cond_dim", self.cond_dim, cond, "cond", 2, batch)
        check_feature_input("context_dim", self.context_dim, context, "context", 3, batch)
        if hint is not None and hint.shape != (*z.shape[:3], self.ch):
            raise ValueError(
                f"hint must have shape {(*z.shape[:3], self.ch)} (z's [B, H, W] and "
                f"ch={self.ch}); got {tuple(hint.shape)}"
            )
        gamma = jnp.broadcast_to(gamma, (batch,))
        return self.encoder(z, gamma, cond=cond, context=context, hint=hint, train=train)

    def decode(
        self,
        h: jax.Array,
        skips: Sequence[jax.Array],
        emb: jax.Array,
        *,
        out_channels: int,
        context: jax.Array | None = None,
        control: Sequence[jax.Array] | None = None,
        train: bool = False,
    ) -> jax.Array:
        """eps_hat, float32 [B, H, W, out_channels], from `encode`'s (h, skips, emb), with the
        ControlNet residuals `control` (see add_control) added first when given."""
        check_feature_input("context_dim", self.context_dim, context, "context", 3, h.shape[0])
        if control is not None:
            h, skips = add_control(h, skips, control)
        return self.decoder(h, skips, emb, out_channels=out_channels, context=context, train=train)

    def __call__(
        self,
        z: jax.Array,
        gamma: jax.Array,
        *,
        cond: jax.Array | None = None,
        context: jax.Array | None = None,
        control: Sequence[jax.Array] | None = None,
        train: bool = False,
    ) -> jax.Array:
        """eps_hat for z [B, H, W, C], gamma [B], cond [B, cond_dim], context
        [B, L, context_dim], control (UNet.control_shapes) -> float32 [B, H, W, C]."""
        h, skips, emb = self.encode(z, gamma, cond=cond, context=context, train=train)
        return self.decode(h, skips, emb, out_channels=z.shape[-1], context=context, control=control, train=train)
