"""Latent text-to-image diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"): Stable Diffusion 1.x/2.x in ddm_jax's terms.

Diffusion runs on latents z = scaling_factor * E(x) of the VAE (`encode_images`); the UNet
predicts eps (or v, or x0) of z_t = alpha_t z + sigma_t eps given the text encoder's states of a
prompt. The scheduler config's N betas are the gamma schedule `DiscreteBetas` (t = 0 data,
gamma = -log SNR, exact at t_i = (i - 1) / (N - 1)), and the UNet, trained on SD's timestep
n in [0, N - 1], sees n = (N - 1) t(gamma) (`DiscreteBetas.timestep_of_gamma`), so
`denoise_fn(z, gamma)` serves every sampler of `ddm_jax.diffusion.SAMPLERS`.

The parameters are one pytree {"text_encoder", "unet", "vae"}; `LatentDiffusion.load` reads them
from a diffusers folder and `save` writes one (docs/diffusers_checkpoints.md).
"""

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ddm_jax.checks import ArgumentError, PyTree, check, check_choice, check_int, config_fields
from ddm_jax.diffusion import PARAMETERIZATIONS
from ddm_jax.diffusion.schedules import BETA_KINDS, DiscreteBetas
from ddm_jax.models.autoencoder_kl import AutoencoderKL, sample_latent
from ddm_jax.models.clip_text import CLIPTextModel, token_embedding
from ddm_jax.models.clip_tokenizer import (
    END_OF_TEXT,
    END_OF_TEXT_ID,
    MAX_LENGTH,
    CLIPTokenizer,
    check_text,
    default_tokenizer,
)
from ddm_jax.models.diffusers_io import DIFFUSERS_VERSION, dtype_name, load_diffusers, save_diffusers
from ddm_jax.models.unet_2d_condition import UNet2DConditionModel

SCHEDULER_CONFIG = pathlib.Path("scheduler", "scheduler_config.json")
TOKENIZER = pathlib.Path("tokenizer")
# diffusers' prediction_type -> ddm_jax's parameterization. diffusers' v is ours:
# v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022; DDPMScheduler.get_velocity).
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# Scheduler options that change the model or ask the sampler for something ddm_jax's samplers do
# not do, with the values accepted (diffusers' SD setting first). The sampling-only options
# (timestep_spacing, steps_offset, set_alpha_to_one, skip_prk_steps, ...) are ignored: the
# samplers choose their own time grid and end at t = 0, SD's timestep 0.
SCHEDULER_UNSUPPORTED = {
    "trained_betas": (None,),
    "rescale_betas_zero_snr": (False,),
    "thresholding": (False,),
    "clip_sample": (False,),
    "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
}
# The pad token of each family when the checkpoint does not name one: OpenAI CLIP (SD-1.x,
# quick_gelu) pads with its end token, OpenCLIP (SD-2.x, gelu) with "!" (id 0).
FAMILY_PAD_TOKENS = {"quick_gelu": END_OF_TEXT, "gelu": "!"}
TOKENIZER_CONFIG_FILES = ("special_tokens_map.json", "tokenizer_config.json")
MERGES_HEADER = "#version: 0.2"


# The scheduler config -----------------------------------------------------------------------------


def schedule_from_scheduler_config(config: Mapping[str, Any]) -> tuple[DiscreteBetas, str]:
    """(gamma schedule, parameterization) of a diffusers scheduler config.

    beta_schedule ("linear" or "scaled_linear"), beta_start, beta_end and num_train_timesteps
    give `DiscreteBetas`; prediction_type ("epsilon", "v_prediction", "sample") gives "eps", "v"
    or "x0". Missing keys take diffusers' defaults (1000 linear betas from 1e-4 to 0.02, epsilon).

    Raises ArgumentError naming the key for an unknown beta_schedule or prediction_type, and for
    a set option of SCHEDULER_UNSUPPORTED (trained_betas, rescale_betas_zero_snr=true,
    thresholding=true, clip_sample=true, a learned variance_type).
    """
    for key, accepted in SCHEDULER_UNSUPPORTED.items():
        if key in config:
            check(config[key] in accepted, key, config[key], f"one of {accepted}: ddm_jax does not implement another")
    check_choice("beta_schedule", config.get("beta_schedule", "linear"), BETA_KINDS)
    check_choice("prediction_type", config.get("prediction_type", "epsilon"), PREDICTION_TYPES)
    with config_fields(num_betas="num_train_timesteps"):
        schedule = DiscreteBetas(
            kind=config.get("beta_schedule", "linear"),
            num_betas=config.get("num_train_timesteps", 1000),
            beta_start=config.get("beta_start", 1e-4),
            beta_end=config.get("beta_end", 0.02),
        )
    return schedule, PREDICTION_TYPES[config.get("prediction_type", "epsilon")]


def scheduler_config(schedule: DiscreteBetas, parameterization: str) -> dict[str, Any]:
    """The diffusers scheduler config of a schedule and parameterization: a DDIMScheduler with SD's
    sampling settings (diffusers' SD folders), which `schedule_from_scheduler_config` reads back."""
    prediction_types = {value: key for key, value in PREDICTION_TYPES.items()}
    check_choice("parameterization", parameterization, tuple(prediction_types))
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_schedule": schedule.kind,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "num_train_timesteps": schedule.num_betas,
        "prediction_type": prediction_types[parameterization],
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
    }


# The tokenizer folder -------------------------------------------------------------------------------


def declared_pad_token(tokenizer_folder: pathlib.Path) -> str | None:
    """The pad token that special_tokens_map.json, else tokenizer_config.json, names (a str, or
    transformers' {"content": str}), or None."""
    for name in TOKENIZER_CONFIG_FILES:
        path = tokenizer_folder / name
        pad = json.loads(path.read_text()).get("pad_token") if path.is_file() else None
        if pad is not None:
            return pad["content"] if isinstance(pad, Mapping) else pad
    return None


def load_tokenizer(folder: pathlib.Path, text_encoder: CLIPTextModel) -> tuple[CLIPTokenizer, int]:
    """(tokenizer, pad id) of a checkpoint for its text encoder.

    The tokenizer is `<folder>/tokenizer/`'s vocab.json and merges.txt when both exist, else the
    shipped OpenAI CLIP vocabulary. The pad token is the one the tokenizer folder declares, else
    the family's (FAMILY_PAD_TOKENS by the text encoder's hidden_act). Raises ArgumentError
    naming `folder` when the tokenizer has ids the text encoder's embedding does not (ids >=
    vocab_size), or the pad token is not in the vocabulary; naming the file when the folder lists
    added tokens (textual inversion, DreamBooth) that vocab.json lacks (`CLIPTokenizer.from_files`).
    """
    vocab, merges = folder / TOKENIZER / "vocab.json", folder / TOKENIZER / "merges.txt"
    has_files = vocab.is_file() and merges.is_file()
    tokenizer = CLIPTokenizer.from_files(vocab, merges) if has_files else default_tokenizer()
    source = f"the tokenizer in {folder / TOKENIZER}" if has_files else "the shipped CLIP vocabulary"
    pad_token = declared_pad_token(folder / TOKENIZER) or FAMILY_PAD_TOKENS[text_encoder.hidden_act]
    check(
        pad_token in tokenizer.encoder,
        "folder",
        str(folder),
        f"a pad token {pad_token!r} in the vocabulary of {source}",
    )
    largest = max(tokenizer.encoder.values())
    check(
        largest < text_encoder.vocab_size,
        "folder",
        str(folder),
        f"a tokenizer whose ids fit the text encoder's vocab_size={text_encoder.vocab_size}, but {source} has "
        f"ids up to {largest}; put the text encoder's own vocab.json and merges.txt in {folder / TOKENIZER}",
    )
    return tokenizer, tokenizer.encoder[pad_token]


def save_tokenizer(folder: pathlib.Path, tokenizer: CLIPTokenizer, pad_token_id: int) -> None:
    """Writes transformers' CLIPTokenizer files: vocab.json, merges.txt (by rank, after the
    "#version" header), special_tokens_map.json and tokenizer_config.json (model_max_length 77)."""
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    (folder / "merges.txt").write_text("\n".join([MERGES_HEADER, *map(" ".join, merges)]) + "\n", encoding="utf-8")
    special = {
        "bos_token": tokenizer.decoder[tokenizer.start_id],
        "eos_token": tokenizer.decoder[tokenizer.end_id],
        "unk_token": tokenizer.decoder[tokenizer.end_id],
        "pad_token": tokenizer.decoder[pad_token_id],
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    tokenizer_config = {
        **special,
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def model_index() -> dict[str, Any]:
    """diffusers' model_index.json of a StableDiffusionPipeline folder without safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


# The model --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LatentDiffusion:
    """A latent text-to-image diffusion model: three networks, a gamma schedule and what the UNet predicts.

    text_encoder: CLIP's text transformer; unet: the noise-prediction UNet; vae: the latent
    autoencoder (its `scaling_factor` scales the latents); schedule: the gamma schedule of the
    training betas; parameterization: "eps", "v" or "x0"; tokenizer: CLIP's BPE tokenizer
    (not compared: models with equal networks and schedule are equal); pad_token_id: the id
    after the end token in each row (49407 for SD-1.x, 0 for SD-2.x); clip_skip: how many of
    the text encoder's last layers to skip (0: its last layer, as SD-1/2 were trained).
    Parameters are {"text_encoder", "unet", "vae"}, each as its module's `apply` takes them.
    """

    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    schedule: DiscreteBetas
    tokenizer: CLIPTokenizer = dataclasses.field(compare=False)
    parameterization: str = "eps"
    pad_token_id: int = END_OF_TEXT_ID
    clip_skip: int = 0

    def __post_init__(self):
        check_choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        check_int("clip_skip", self.clip_skip, 0, self.text_encoder.num_hidden_layers)
        check(
            self.unet.cross_attention_dim == self.text_encoder.hidden_size,
            "unet",
            f"cross_attention_dim={self.unet.cross_attention_dim}",
            f"the text encoder's hidden_size={self.text_encoder.hidden_size}",
        )
        check(
            self.unet.in_channels == self.vae.latent_channels == self.unet.out_channels,
            "unet",
            f"in_channels={self.unet.in_channels}, out_channels={self.unet.out_channels}",
            f"the VAE's latent_channels={self.vae.latent_channels}",
        )

    # Files ---------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls, folder: str | pathlib.Path, *, dtype=jnp.float32, mesh: Mesh | None = None, clip_skip: int = 0
    ) -> tuple["LatentDiffusion", PyTree]:
        """(model, params) of a diffusers Stable Diffusion folder.

        Args:
          folder: holds unet/, vae/, text_encoder/ (`load_diffusers`), scheduler/scheduler_config.json
            and, optionally, tokenizer/ (`load_tokenizer`).
          dtype: float32, bfloat16 or float16, the parameters' and computations' dtype; with
            float16 the VAE stays float32 (SD's VAE overflows in float16, diffusers'
            force_upcast).
          mesh: every parameter is placed on it, replicated.
          clip_skip: text-encoder layers to skip, in [0, num_hidden_layers].

        Returns:
          The model and its parameters {"text_encoder", "unet", "vae"}.

        Raises ArgumentError before any computation: `folder` for a missing or mismatched
        component, `<path>: <key>` for a scheduler config it cannot honour, `clip_skip`.
        """
        folder = pathlib.Path(folder)
        path = folder / SCHEDULER_CONFIG
        check(path.is_file(), "folder", str(folder), f"a folder holding {SCHEDULER_CONFIG}")
        try:
            schedule, parameterization = schedule_from_scheduler_config(json.loads(path.read_text()))
        except ArgumentError as error:
            raise error.renamed(f"{path}: {error.argument}") from None
        text_encoder, text_params = load_diffusers(folder, "text_encoder", dtype=dtype, mesh=mesh)
        check_int("clip_skip", clip_skip, 0, text_encoder.num_hidden_layers)
        tokenizer, pad_token_id = load_tokenizer(folder, text_encoder)
        unet, unet_params = load_diffusers(folder, "unet", dtype=dtype, mesh=mesh)
        vae_dtype = jnp.float32 if dtype_name(dtype) == "float16" else dtype
        vae, vae_params = load_diffusers(folder, "vae", dtype=vae_dtype, mesh=mesh)
        model = cls(text_encoder, unet, vae, schedule, tokenizer, parameterization, pad_token_id, clip_skip)
        return model, {"text_encoder": text_params, "unet": unet_params, "vae": vae_params}

    def save(self, folder: str | pathlib.Path, params: PyTree) -> pathlib.Path:
        """Writes the model as a diffusers StableDiffusionPipeline folder: unet/, vae/, text_encoder/
        (`save_diffusers`, in the parameters' dtype), scheduler/scheduler_config.json, tokenizer/
        and model_index.json (no safety checker). `load` reads it back to an equal model.

        Raises ArgumentError, before writing anything, if `folder` already holds any of these or
        the parameterization has no diffusers prediction_type ("score").
        """
        folder = pathlib.Path(folder)
        names = ("unet", "vae", "text_encoder", SCHEDULER_CONFIG.parent, TOKENIZER, "model_index.json")
        existing = [str(name) for name in names if (folder / name).exists()]
        check(not existing, "folder", str(folder), f"a folder without {', '.join(existing)} (never overwritten)")
        config = scheduler_config(self.schedule, self.parameterization)
        for component in ("unet", "vae", "text_encoder"):
            save_diffusers(folder, component, getattr(self, component), params[component])
        (folder / SCHEDULER_CONFIG.parent).mkdir()
        (folder / SCHEDULER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_tokenizer(folder / TOKENIZER, self.tokenizer, self.pad_token_id)
        (folder / "model_index.json").write_text(json.dumps(model_index(), indent=2, sort_keys=True) + "\n")
        return folder

    def init(self, rng: jax.Array) -> PyTree:
        """Random parameters {"text_encoder", "unet", "vae"} (each module's own initialisers)."""
        keys = dict(zip(("text_encoder", "unet", "vae"), jax.random.split(rng, 3), strict=True))
        return {
            name: getattr(self, name).init(keys[name], *getattr(self, name).example_inputs())["params"] for name in keys
        }

    # Text -----------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str], argument: str = "prompts"):
        """CLIP input ids int32 [B, L] of the prompts, L = the text encoder's max_position_embeddings
        (77): [start, BPE ids, end, pad, ...], a prompt of more than L - 2 tokens cut to its first
        L - 2 with a UserWarning (`CLIPTokenizer.__call__`). Raises ArgumentError naming
        `argument`[i] for an item that is not a str of valid Unicode text (bytes, lone surrogates)."""
        check(isinstance(prompts, (list, tuple)), argument, prompts, "a list of str")
        for k, prompt in enumerate(prompts):
            check_text(f"{argument}[{k}]", prompt)
        return self.tokenizer(
            list(prompts), max_length=self.text_encoder.max_position_embeddings, pad_token_id=self.pad_token_id
        )

    def encode_prompts(self, text_encoder_params: PyTree, token_ids: jax.Array) -> jax.Array:
        """The text conditioning [B, L, hidden_size] (float32): the text encoder's last hidden
        state after its final layer norm, or that of layer N - clip_skip. The parameters may hold
        some rows of the token table only (`clip_text.with_token_embedding`), which `token_ids`
        then index."""
        rows = token_embedding(text_encoder_params).shape[0]
        text_encoder = self.text_encoder.clone(vocab_size=rows)
        return text_encoder.apply({"params": text_encoder_params}, token_ids, clip_skip=self.clip_skip)

    # Diffusion --------------------------------------------------------------------------------------

    def gamma_fn(self, t: jax.Array) -> jax.Array:
        """gamma(t) = -log SNR(t) of the training betas (`DiscreteBetas`)."""
        return self.schedule(t)

    def timestep(self, gamma: jax.Array) -> jax.Array:
        """SD's continuous timestep n = (N - 1) t(gamma) in [0, N - 1], which the UNet takes."""
        return self.schedule.timestep_of_gamma(gamma)

    def predict(self, unet_params: PyTree, z: jax.Array, gamma: jax.Array, context: jax.Array, **residuals):
        """The UNet's prediction (eps, v or x0: `parameterization`) at z [B, h, w, c] with noise level
        gamma [B] and text conditioning context [B, L, D]; `residuals` are the UNet's ControlNet
        inputs (down_residuals, mid_residual)."""
        variables = {"params": unet_params}
        return self.unet.apply(variables, z, self.timestep(gamma), context, **residuals)

    def conditional_fn(self, unet_params: PyTree):
        """(z, gamma, context) -> prediction, as `diffusion.guided_denoise_fn` takes it. (ControlNet
        residuals depend on z and gamma, and guidance doubles the batch: a controlled model computes
        them inside such a function, rather than closing over fixed ones.)"""
        return lambda z, gamma, context: self.predict(unet_params, z, gamma, context)

    def denoise_fn(self, unet_params: PyTree, context: jax.Array):
        """denoise_fn(z, gamma) -> prediction with the text conditioning `context` closed over: the
        function every sampler of `diffusion.SAMPLERS` takes (with parameterization=self.parameterization)."""
        return lambda z, gamma: self.predict(unet_params, z, gamma, context)

    # Images <-> latents -----------------------------------------------------------------------------

    def encode_images(self, vae_params: PyTree, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Diffusion latents of images [B, H, W, 3] in [-1, 1]: scaling_factor times the posterior
        mean, or times a draw of q(z | x) (`sample_latent`) when `rng` is given."""
        mean, logvar = self.vae.apply({"params": vae_params}, images, method="encode")
        latent = mean if rng is None else sample_latent(rng, mean, logvar)
        return self.vae.scaling_factor * latent

    def decode_latents(self, vae_params: PyTree, latents: jax.Array) -> jax.Array:
        """Images [B, H, W, 3], nominally in [-1, 1] (not clipped), of diffusion latents: the VAE's
        decoder at latents / scaling_factor."""
        return self.vae.apply({"params": vae_params}, latents / self.vae.scaling_factor, method="decode")

    def vae_factor(self) -> int:
        """Image pixels per latent position along each axis: 2^(VAE blocks - 1) (8 for SD)."""
        return 2 ** (len(self.vae.block_out_channels) - 1)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(h, w, c) of the latents of height x width images; each defaults to the UNet's sample_size
        times `vae_factor` (512 for SD-1.5, 768 for SD-2.1). Raises ArgumentError naming height or
        width unless it is a positive multiple of vae_factor * 2^(UNet blocks - 1)."""
        sample_size = self.unet.sample_size
        sizes = sample_size if isinstance(sample_size, (tuple, list)) else (sample_size, sample_size)
        multiple = self.vae_factor() * 2 ** (len(self.unet.block_out_channels) - 1)
        latent = []
        for argument, value, default in zip(("height", "width"), (height, width), sizes, strict=True):
            check(
                value is not None or default is not None,
                argument,
                None,
                "a size in pixels (the UNet's config has no sample_size)",
            )
            value = default * self.vae_factor() if value is None else value
            check_int(argument, value, minimum=1)
            check(
                value % multiple == 0, argument, value, f"a multiple of {multiple} (the VAE's and UNet's downsampling)"
            )
            latent.append(value // self.vae_factor())
        return (*latent, self.vae.latent_channels)
