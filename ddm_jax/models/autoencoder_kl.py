"""diffusers' AutoencoderKL, the VAE of latent diffusion, in Flax.

Rombach et al. (2022), "High-Resolution Image Synthesis with Latent Diffusion Models",
Sec. 3.1: an encoder to a diagonal Gaussian posterior q(z | x) = N(mean, exp(logvar)) over
latents with `latent_channels` channels at 1 / 2^(blocks - 1) of the image resolution, and
a decoder back to images in [-1, 1]. Diffusion runs on scaling_factor * z (the module
exposes `scaling_factor`; encode and decode do not apply it).

Layout (diffusers' vae.py): Encoder = conv_in, DownEncoderBlock2D blocks (layers_per_block
resnets, then a stride-2 conv after (0, 1, 0, 1) zero padding, except in the last block),
mid block (resnet, single-head spatial self-attention, resnet), GroupNorm, SiLU, conv_out to
2 latent_channels; quant_conv (1x1). Decoder = post_quant_conv (1x1, applied before it),
conv_in, mid block, UpDecoderBlock2D blocks (layers_per_block + 1 resnets, then nearest 2x
upsampling and a conv, except in the last block), GroupNorm, SiLU, conv_out. All GroupNorms
have eps 1e-6. Images and latents are NHWC.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddm_jax.checks import check, check_choice
from ddm_jax.diffusion import per_example_normal
from ddm_jax.models.sd_layers import Attention, Downsample2D, Dtype, ResnetBlock2D, Upsample2D, conv, group_norm

EPS = 1e-6  # every GroupNorm of diffusers' VAE
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this range


class VAEMidBlock(nn.Module):
    """diffusers' UNetMidBlock2D as the VAE uses it: resnets_0 -> attentions_0 (one head over
    all channels, with its own GroupNorm and residual) -> resnets_1; attentions_0 is left out
    when `add_attention` is False."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        h = ResnetBlock2D(self.channels, self.groups, EPS, dtype=self.dtype, name="resnets_0")(h)
        if self.add_attention:
            attention = Attention(
                1, self.channels, bias=True, norm_num_groups=self.groups, dtype=self.dtype, name="attentions_0"
            )
            h = attention(h)
        return ResnetBlock2D(self.channels, self.groups, EPS, dtype=self.dtype, name="resnets_1")(h)


class ResnetStack(nn.Module):
    """DownEncoderBlock2D (resample "down") or UpDecoderBlock2D (resample "up"): `num_layers`
    resnets_i, then the down/upsampler (downsamplers_0 / upsamplers_0) when `resample`."""

    channels: int
    num_layers: int
    groups: int
    resample: str | None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            h = ResnetBlock2D(self.channels, self.groups, EPS, dtype=self.dtype, name=f"resnets_{i}")(h)
        if self.resample == "down":
            h = Downsample2D(self.channels, padding=0, dtype=self.dtype, name="downsamplers_0")(h)
        elif self.resample == "up":
            h = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(h)
        return h


def output_head(h: jax.Array, features: int, groups: int, dtype: Dtype) -> jax.Array:
    """conv_out(silu(conv_norm_out(h))), the last layers of the encoder and the decoder.
    Call inside a compact method: the layers belong to the caller."""
    return conv(features, 3, "conv_out", dtype)(nn.silu(group_norm(groups, EPS, "conv_norm_out", dtype)(h)))


class Encoder(nn.Module):
    """diffusers' vae.Encoder (double_z): image [B, H, W, C] -> [B, h, w, 2 latent_channels]."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    groups: int
    mid_block_add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        widths = self.block_out_channels
        h = conv(widths[0], 3, "conv_in", self.dtype)(x)
        for i, width in enumerate(widths):
            resample = "down" if i < len(widths) - 1 else None
            h = ResnetStack(width, self.layers_per_block, self.groups, resample, self.dtype, name=f"down_blocks_{i}")(h)
        h = VAEMidBlock(widths[-1], self.groups, self.mid_block_add_attention, self.dtype, name="mid_block")(h)
        return output_head(h, 2 * self.latent_channels, self.groups, self.dtype)


class Decoder(nn.Module):
    """diffusers' vae.Decoder: latent [B, h, w, latent_channels] -> image [B, H, W, out_channels]."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_block_add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        widths = self.block_out_channels[::-1]
        h = conv(widths[0], 3, "conv_in", self.dtype)(z)
        h = VAEMidBlock(widths[0], self.groups, self.mid_block_add_attention, self.dtype, name="mid_block")(h)
        for i, width in enumerate(widths):
            resample = "up" if i < len(widths) - 1 else None
            stack = ResnetStack(
                width, self.layers_per_block + 1, self.groups, resample, self.dtype, name=f"up_blocks_{i}"
            )
            h = stack(h)
        return output_head(h, self.out_channels, self.groups, self.dtype)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL, NHWC.

    `apply(v, x, method="encode")` -> (mean, logvar) of q(z | x), each [B, H/f, W/f,
    latent_channels] with f = 2^(len(block_out_channels) - 1), logvar clamped to [-30, 20]
    as diffusers does; `apply(v, z, method="decode")` -> the image, nominally in [-1, 1]
    (not clipped, as in diffusers). `apply(v, x)` decodes the posterior mean (used by init).
    Neither applies `scaling_factor`: the diffusion latent is scaling_factor * z
    (`sample_latent` draws z). Outputs are float32.

    Fields are diffusers' config.json keys (defaults as diffusers'); `dtype` is the
    computation dtype.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        self.check_fields()
        super().__post_init__()

    def check_fields(self) -> None:
        """Raises ArgumentError naming the first field this implementation does not support."""
        n = len(self.block_out_channels)
        check(n >= 1, "block_out_channels", self.block_out_channels, "at least one width")
        for key, types, allowed in (
            ("down_block_types", self.down_block_types, ("DownEncoderBlock2D",)),
            ("up_block_types", self.up_block_types, ("UpDecoderBlock2D",)),
        ):
            check(len(types) == n, key, types, f"{n} block types, one per block_out_channels entry")
            for i, block_type in enumerate(types):
                check_choice(f"{key}[{i}]", block_type, allowed)
        for width in self.block_out_channels:
            check(width % self.norm_num_groups == 0, "norm_num_groups", self.norm_num_groups, f"a divisor of {width}")

    def setup(self):
        common = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
            dtype=self.dtype,
        )
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        pointwise = lambda features, used: nn.Conv(features, (1, 1), dtype=self.dtype) if used else None
        self.quant_conv = pointwise(2 * self.latent_channels, self.use_quant_conv)
        self.post_quant_conv = pointwise(self.latent_channels, self.use_post_quant_conv)

    def example_inputs(self) -> tuple[jax.Array]:
        """The smallest input that builds every parameter (for init and jax.eval_shape)."""
        size = 2 ** (len(self.block_out_channels) - 1)
        return (jnp.zeros((1, size, size, self.in_channels), self.dtype),)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image x [B, H, W, in_channels] -> (mean, logvar) of the latent posterior, float32."""
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent z [B, h, w, latent_channels] (unscaled) -> image [B, H, W, out_channels], float32."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x)[0])


def sample_latent(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A reparameterised draw z = mean + exp(logvar / 2) eps, eps ~ N(0, I) from `rng`
    (Kingma & Welling, 2014), e.g. from `AutoencoderKL.encode`'s outputs."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) = 1/2 sum(exp(logvar) + mean^2 - 1 - logvar), per example: [B] nats."""
    kl = 0.5 * (jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(-1)


def gaussian_nll(x: jax.Array, x_hat: jax.Array, decoder_std: float) -> jax.Array:
    """-log N(x; x_hat, decoder_std^2 I) summed over dimensions, per example: [B] nats."""
    nll = 0.5 * jnp.square((x - x_hat) / decoder_std) + jnp.log(decoder_std) + 0.5 * jnp.log(2.0 * jnp.pi)
    return nll.reshape(nll.shape[0], -1).sum(-1)


def laplace_nll(x: jax.Array, x_hat: jax.Array, decoder_std: float) -> jax.Array:
    """-log Laplace(x; x_hat, b) with scale b = decoder_std / sqrt(2) (standard deviation decoder_std)
    summed over dimensions, per example: [B] nats; the L1 reconstruction of LDM's autoencoder
    (Rombach et al., 2022) as a likelihood."""
    scale = decoder_std / jnp.sqrt(2.0)
    nll = jnp.abs(x - x_hat) / scale + jnp.log(2.0 * scale)
    return nll.reshape(nll.shape[0], -1).sum(-1)


DECODER_NLL = {"gaussian": gaussian_nll, "laplace": laplace_nll}  # config.model.decoder_likelihood


def vae_terms(
    vae: AutoencoderKL,
    params,
    rng: jax.Array,
    x: jax.Array,
    *,
    decoder_std: float,
    beta: float,
    decoder_likelihood: str = "gaussian",
    rows=None,
) -> dict:
    """The VAE's per-example terms (Kingma & Welling 2014; beta-VAE, Higgins et al. 2017), [B] nats:

    reconstruction = -log p(x | decode(z)) with z = mean + exp(logvar / 2) eps,
    kl = KL(q(z | x) || N(0, I)), elbo = reconstruction + kl (the negative ELBO),
    loss = reconstruction + beta kl (beta < 1 trades the prior's fit for reconstructions).
    x: images in [-1, 1], [B, H, W, C]; example b's eps is normal(fold_in(rng, rows[b]))
    (`diffusion.per_example_normal`), so a shard of a batch draws what the whole batch would.
    decoder_likelihood: p(x | x_hat), "gaussian" (N(x_hat, decoder_std^2 I)) or "laplace" (of the
    same standard deviation; `laplace_nll`).
    """
    mean, logvar = vae.apply({"params": params}, x, method="encode")
    z = mean + jnp.exp(0.5 * logvar) * per_example_normal(rng, mean.shape, rows)
    x_hat = vae.apply({"params": params}, z, method="decode")
    reconstruction = DECODER_NLL[decoder_likelihood](x, x_hat, decoder_std)
    kl = gaussian_kl(mean, logvar)
    return {"reconstruction": reconstruction, "kl": kl, "elbo": reconstruction + kl, "loss": reconstruction + beta * kl}
