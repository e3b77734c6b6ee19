"""VDM's resolution-preserving score network (google-research/vdm ScoreUNet)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddm_jax.checks import ArgumentError, check, check_int
from ddm_jax.models.layers import (
    AttentionBlock,
    Dtype,
    GammaEmbedding,
    OutputHead,
    ResBlock,
    base2_fourier_features,
    check_feature_input,
    check_shared_fields,
    compute_dtype,
)


class ScoreNet(nn.Module):
    """Noise predictor eps_hat(z; gamma) at the input resolution (VDM's ScoreUNet).

    conv_in (on z, concatenated with its base-2 Fourier features when
    with_fourier_features) -> n_layers ResNet blocks -> middle (ResNet, attention when
    with_attention, ResNet) -> n_layers + 1 ResNet blocks, each on concat(h, skip) with the
    skips (conv_in and every down block output) taken last-in first-out -> GroupNorm,
    swish, zero-initialised conv to the C channels of z. Every block has width
    embedding_dim; the conditioning embedding (GammaEmbedding) has width 4 embedding_dim.

    Differences from the VDM code: the output is the prediction itself (no "+ z"), so it
    is exactly zero at init; GroupNorm works for any width; the middle attention follows
    with_attention; Fourier exponents are range(fourier_first, fourier_last + 1, step).

    Attributes:
      embedding_dim: block width and sinusoid width (VDM CIFAR-10: 128).
      n_layers: ResNet blocks on the way down (VDM: 32); n_layers + 1 on the way up.
      dropout: dropout rate inside the ResNet blocks, active when train=True.
      with_fourier_features, fourier_first, fourier_last, fourier_step: VDM's base-2
        Fourier features of z, exponents fourier_first..fourier_last (VDM: 6, 8, 1).
      with_attention: self-attention in the middle and after down/up blocks.
      attention_every: with attention, after every attention_every-th down and up block
        (VDM: 1, after every block); 0 keeps attention in the middle only.
      num_heads: attention heads (VDM: 1).
      gamma_min, gamma_max: the gamma range mapped to t in [0, 1] for the embedding.
      cond_dim: width of the optional `cond` vector; when set, `cond` is required.
      dtype: the computation dtype, jnp.float32 or jnp.bfloat16 (config: "float32" or
        "bfloat16"). Parameters are float32 either way, so the same parameters serve
        both. With bfloat16 the convolutions, dense layers and attention products run in
        bfloat16, while the gamma embedding, the Fourier features of z, GroupNorm
        statistics and the attention softmax stay float32 (see layers.py); z is cast to
        `dtype` after its Fourier features, and the output is float32.
    """

    embedding_dim: int = 128
    n_layers: int = 32
    dropout: float = 0.1
    with_fourier_features: bool = True
    fourier_first: int = 6
    fourier_last: int = 8
    fourier_step: int = 1
    with_attention: bool = False
    attention_every: int = 1
    num_heads: int = 1
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
        check_int("embedding_dim", self.embedding_dim, minimum=4)
        check_int("n_layers", self.n_layers, minimum=0)
        check_int("fourier_step", self.fourier_step, minimum=1)
        check(
            self.fourier_last >= self.fourier_first,
            "fourier_last",
            self.fourier_last,
            f"a value >= fourier_first={self.fourier_first}",
        )
        check_int("attention_every", self.attention_every, minimum=0)
        check_shared_fields(self.dropout, self.gamma_min, self.gamma_max, self.cond_dim, self.num_heads)
        compute_dtype("dtype", self.dtype)
        if self.with_attention:
            check(
                self.embedding_dim % self.num_heads == 0,
                "num_heads",
                self.num_heads,
                f"a divisor of embedding_dim={self.embedding_dim}",
            )

    @nn.nowrap
    def check_input_shape(self, shape) -> None:
        """Accepts any image shape (height, width, channels) with positive sizes."""
        check(
            len(shape) == 3 and min(shape) >= 1,
            "image_shape",
            tuple(shape),
            "(height, width, channels) with positive sizes",
        )

    @nn.nowrap
    def has_attention_after(self, block: int) -> bool:
        """Whether down/up block number `block` (from 0) is followed by attention."""
        return self.with_attention and self.attention_every > 0 and (block + 1) % self.attention_every == 0

    @nn.compact
    def __call__(
        self, z: jax.Array, gamma: jax.Array, *, cond: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """eps_hat for z [B, H, W, C], gamma [B] (or scalar), cond [B, cond_dim] -> float32
        [B, H, W, C]."""
        if z.ndim != 4:
            raise ArgumentError("z", f"an array of shape {tuple(z.shape)}", "shape [B, H, W, C]")
        self.check_input_shape(z.shape[1:])
        check_feature_input("cond_dim", self.cond_dim, cond, "cond", 2, z.shape[0])
        gamma = jnp.broadcast_to(gamma, z.shape[:1])
        emb = GammaEmbedding(
            self.embedding_dim,
            4 * self.embedding_dim,
            self.gamma_min,
            self.gamma_max,
            dtype=self.dtype,
            name="embedding",
        )(gamma, cond)

        def res_block(name):
            return ResBlock(self.embedding_dim, self.dropout, dtype=self.dtype, name=name)

        def attention_block(name):
            return AttentionBlock(self.num_heads, dtype=self.dtype, name=name)

        h = z
        if self.with_fourier_features:  # float32: the 2^8 pi z phases need it
            h = base2_fourier_features(z, self.fourier_first, self.fourier_last, self.fourier_step)
        # conv_in in float32: bfloat16's spacing near |z| = 1 (2^-7) is an 8-bit bin's width.
        h = nn.Conv(self.embedding_dim, (3, 3), name="conv_in")(h).astype(self.dtype)
        skips = [h]
        for i in range(self.n_layers):
            h = res_block(f"down_block_{i}")(h, emb, train=train)
            if self.has_attention_after(i):
                h = attention_block(f"down_attention_{i}")(h)
            skips.append(h)

        h = res_block("mid_block_0")(h, emb, train=train)
        if self.with_attention:
            h = attention_block("mid_attention")(h)
        h = res_block("mid_block_1")(h, emb, train=train)

        for i in range(self.n_layers + 1):
            h = res_block(f"up_block_{i}")(jnp.concatenate([h, skips.pop()], axis=-1), emb, train=train)
            if self.has_attention_after(i):
                h = attention_block(f"up_attention_{i}")(h)
        return OutputHead(dtype=self.dtype, name="head")(h, z.shape[-1])
