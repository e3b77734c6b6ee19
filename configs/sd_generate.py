"""Text-to-image with a Stable Diffusion 1.x/2.x checkpoint in diffusers format (--mode=generate).

Each --prompt (repeat the flag for several) gives num_images images, written as PNG files
<workdir>/<output>/NNNN.png, numbered on from those already there; their paths are printed.

  python -m ddm_jax.main --mode=generate --config=configs/sd_generate.py --workdir=workdirs/sd \\
      --config.checkpoint=/path/to/stable-diffusion-v1-5 --prompt="a photograph of an astronaut riding a horse"
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    # The diffusers folder: unet/, vae/, text_encoder/, scheduler/ and, optionally, tokenizer/.
    config.checkpoint = ml_collections.config_dict.placeholder(str)
    config.dtype = (
        "float32"  # float32 | bfloat16 | float16: parameters and computation (the VAE stays float32 in float16)
    )
    config.clip_skip = 0  # text-encoder layers to skip (0: the last layer, as SD-1/2 were trained)
    config.sampler = "ddim"  # ancestral | ddim | dpm_solver_pp | ode
    config.steps = 50  # sampling steps (the ODE solver's initial steps)
    config.grid = "uniform"  # time grid: uniform (in t, SD's timesteps) | log_snr | edm
    config.eta = ml_collections.config_dict.placeholder(float)  # ddim only: 0 deterministic .. 1 ancestral
    config.guidance_scale = 7.5  # s = 1 + w of Ho & Salimans' eq. 6 (diffusers'); 1: the conditional model alone
    # (gamma_low, gamma_high): guide only where gamma_low < -log SNR <= gamma_high (Kynkaanniemi et al. 2024),
    # e.g. --config.guidance_interval=-2.55,2.13 for EDM's sigma in (0.28, 2.9]; None: at every step
    config.guidance_interval = ml_collections.config_dict.placeholder(tuple)
    config.negative_prompt = ""  # the unconditional half of guidance for every prompt ("": the empty prompt)
    config.num_images = 1  # images per prompt
    config.seed = 0  # the key of the latents and of the sampler's noise
    config.height = ml_collections.config_dict.placeholder(int)  # pixels; None: the UNet's sample_size x 8
    config.width = ml_collections.config_dict.placeholder(int)  # pixels; None: the UNet's sample_size x 8
    config.output = "images"  # folder for the PNG files, relative to --workdir
    return config
