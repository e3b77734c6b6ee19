"""Flax linen networks: the VDM half's ScoreNet and DDPM UNet (`networks`), the VDM that ties one
to a gamma schedule (`vdm`), and the Stable-Diffusion-compatible models with their diffusers I/O.
"""

from ddm_jax.models.autoencoder_kl import AutoencoderKL, sample_latent
from ddm_jax.models.clip_text import CLIPTextModel
from ddm_jax.models.diffusers_io import load_diffusers, save_diffusers
from ddm_jax.models.latent_diffusion import LatentDiffusion
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
from ddm_jax.models.networks import NETWORKS, as_denoise_fn
from ddm_jax.models.score_net import ScoreNet
from ddm_jax.models.unet import UNet, UNetDecoder, UNetEncoder, add_control
from ddm_jax.models.unet_2d_condition import UNet2DConditionModel

__all__ = [
    "COMPUTE_DTYPES",
    "AttentionBlock",
    "AutoencoderKL",
    "CLIPTextModel",
    "GammaEmbedding",
    "LatentDiffusion",
    "MultiHeadAttention",
    "NETWORKS",
    "OutputHead",
    "ResBlock",
    "ScoreNet",
    "UNet",
    "UNet2DConditionModel",
    "UNetDecoder",
    "UNetEncoder",
    "add_control",
    "as_denoise_fn",
    "base2_fourier_features",
    "compute_dtype",
    "fourier_exponents",
    "load_diffusers",
    "num_groups",
    "sample_latent",
    "save_diffusers",
    "sinusoidal_embedding",
]
