"""Stage 1 of the shapes text-to-image base: Stable Diffusion's AutoencoderKL on shapes/32.

32x32x3 images to 8x8x4 latents, trained on the beta-weighted ELBO (a Gaussian or Laplace decoder
of fixed standard deviation, beta times the KL to N(0, I)). At the end the VAE is written as a diffusers
folder, WORKDIR/export/step_N/vae, with its scaling_factor set from the training latents; stage 2
(configs/shapes_t2i.py) reads it. experiments/t2i_base.py runs both stages.

  python -m ddm_jax.main --config=configs/shapes_vae.py --workdir=workdirs/shapes_vae
  python -m ddm_jax.main --workdir=workdirs/shapes_vae --mode=eval
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "autoencoder"  # vdm | autoencoder | text_to_image: what is trained

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "shapes/32"  # the offline captioned shapes (docs/shapes.md), 20000 / 2000
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; None: TFDS's default
    config.data.download = False  # shapes is generated here; nothing to download
    config.data.eval_split = "test"  # the split evaluated (PSNR, KL)

    config.model = ml_collections.ConfigDict()
    config.model.vae = ml_collections.ConfigDict(  # diffusers' AutoencoderKL config.json keys
        dict(
            block_out_channels=(16, 32, 32),  # three levels: 32x32 -> 16x16 -> 8x8
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,  # resnets per encoder level (decoder: one more)
            latent_channels=4,  # 8x8x4 latents, as SD's 4 channels
            norm_num_groups=8,  # GroupNorm groups (divides every width)
            sample_size=32,  # image size
        )
    )
    config.model.decoder_likelihood = "gaussian"  # gaussian | laplace (LDM's L1): p(x | decode(z))
    config.model.decoder_std = 0.05  # std of the decoder on [-1, 1]: 6.4 of 255 levels
    config.model.beta = 0.01  # weight of the KL in the loss (1: the ELBO)

    config.optimizer = ml_collections.ConfigDict(
        dict(
            # peak learning rate: 1e-3 until 2026-12-02 (PSNR 28.79 against 31.88 dB, t2i_base_vae_lr2),
            # 2e-3 until 2026-12-03 (31.88 against 32.73 dB, the latent model level: t2i_base_vae_lr4)
            lr=4e-3,
            warmup_steps=200,  # linear warmup from 0
            b1=0.9,  # AdamW moments
            b2=0.99,
            eps=1e-8,
            weight_decay=0.0,  # decoupled weight decay
            grad_clip_norm=1.0,  # global-norm clipping; 0 or None: none
            lr_schedule="cosine",  # constant | cosine (to 0 at decay_steps)
            decay_steps=9000,  # cosine: the learning rate reaches 0 here
        )
    )

    config.training = ml_collections.ConfigDict(
        dict(
            seed=0,  # parameters, data order and every draw
            batch_size=32,  # global batch (150 ms a step on 2 CPU cores)
            num_steps=9000,  # train steps (3000 and 6000 undertrain it: experiments/results/t2i_base.md)
            substeps=1,  # steps per compiled call
            ema_decay=0.995,  # of the parameters evaluated and exported
            log_every=100,  # steps between train metrics and progress lines
            eval_every=3000,  # steps between evaluations
            checkpoint_every=3000,  # steps between checkpoints
            keep_checkpoints=2,  # the newest kept
            sample_every=9000,  # steps between reconstruction grids
            num_samples=32,  # eval images in the grid, each over its reconstruction
        )
    )

    config.eval = ml_collections.ConfigDict(
        dict(
            batch_size=500,  # examples per eval batch
        )
    )
    return config
