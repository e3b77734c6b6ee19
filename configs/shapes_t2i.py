"""Stage 2 of the shapes text-to-image base: a Stable-Diffusion-layout latent diffusion model.

The same model classes as SD (CLIP text transformer, UNet2DConditionModel with cross-attention,
AutoencoderKL, scaled-linear betas, eps prediction) at a small size, trained on the captions and
8x8x4 latents of shapes/32 with the frozen stage-1 VAE (configs/shapes_vae.py), the eps loss
weighted by Min-SNR-5 (Hang et al. 2023; SD 1 uses L_simple, which scored lower here) and 10%
prompt dropout for classifier-free guidance. At the end the whole model is written as a diffusers
folder, WORKDIR/export/step_N, which `LatentDiffusion.load` and `--mode=generate` read like any SD
checkpoint. experiments/t2i_base.py runs both stages and measures the result.

  python -m ddm_jax.main --config=configs/shapes_t2i.py --workdir=workdirs/shapes_t2i \\
      --config.model.vae_folder=workdirs/shapes_vae/export/step_9000
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "text_to_image"  # vdm | autoencoder | text_to_image: what is trained

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "shapes/32"  # images and captions (docs/shapes.md)
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; None: TFDS's default
    config.data.download = False  # shapes is generated here; nothing to download
    config.data.eval_split = "test"  # held-out prompts and latents

    config.model = ml_collections.ConfigDict()
    config.model.vae_folder = "workdirs/shapes_vae/export/step_9000"  # the frozen stage-1 VAE (diffusers)
    config.model.text_encoder = ml_collections.ConfigDict(  # transformers' CLIPTextConfig keys
        dict(
            vocab_size=49408,  # CLIP's BPE vocabulary (the shipped tokenizer)
            hidden_size=64,  # width, also the UNet's cross_attention_dim
            intermediate_size=256,  # MLP width
            num_hidden_layers=2,  # transformer layers
            num_attention_heads=4,
            max_position_embeddings=40,  # context length (SD: 77); shapes captions have at most 29 BPE tokens
            hidden_act="quick_gelu",  # SD-1's OpenAI CLIP activation
        )
    )
    config.model.unet = ml_collections.ConfigDict(  # diffusers' UNet2DConditionModel config.json keys
        dict(
            sample_size=8,  # latents 8x8
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),  # 8x8 -> 4x4
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),  # widths per level
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=64,  # = text_encoder.hidden_size
            attention_head_dim=4,  # heads per transformer block (SD-1's meaning of the key)
        )
    )
    config.model.scheduler = ml_collections.ConfigDict(  # diffusers' scheduler_config.json keys
        dict(
            num_train_timesteps=1000,  # N betas
            beta_start=0.00085,  # SD's scaled-linear betas
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",  # epsilon | v_prediction
        )
    )
    config.model.weighting = "min_snr"  # the loss: min_snr (Min-SNR-5) | simple (SD 1's L_simple) | v_mse (SD 2's)
    config.model.prompt_dropout = 0.1  # probability of training on the empty prompt (guidance)
    config.model.train_text_encoder = True  # False: the text encoder stays at its initialisation
    config.model.text_encoder_lr_scale = 1.0  # its learning rate as a multiple of optimizer.lr
    # A diffusers text_encoder (its config model.text_encoder's) to start from; None: random.
    config.model.text_encoder_folder = ml_collections.config_dict.placeholder(str)

    config.optimizer = ml_collections.ConfigDict(
        dict(
            lr=2e-3,  # peak learning rate (1e-3 until 2026-12-02: shape 0.43 against 0.63, t2i_base_lr)
            warmup_steps=500,  # linear warmup from 0
            b1=0.9,  # AdamW moments
            b2=0.99,
            eps=1e-8,
            weight_decay=0.0,  # decoupled weight decay (not of the token rows no caption uses: text_to_image_task)
            grad_clip_norm=1.0,  # global-norm clipping; 0 or None: none
            lr_schedule="cosine",  # constant | cosine (to 0 at decay_steps)
            decay_steps=9000,  # cosine: the learning rate reaches 0 here
        )
    )

    config.training = ml_collections.ConfigDict(
        dict(
            seed=0,  # parameters, data order and every draw
            batch_size=64,  # global batch (250 ms a step on 2 CPU cores)
            num_steps=9000,  # train steps (18000 scores far higher, beyond the hour: t2i_base.md)
            substeps=1,  # steps per compiled call
            ema_decay=0.999,  # of the parameters evaluated and exported
            log_every=200,  # steps between train metrics and progress lines
            eval_every=3000,  # steps between held-out losses
            checkpoint_every=1000,  # steps between checkpoints
            keep_checkpoints=2,  # the newest kept
            sample_every=3000,  # steps between sample grids
            num_samples=16,  # held-out prompts in the grid
        )
    )

    config.eval = ml_collections.ConfigDict(
        dict(
            batch_size=500,  # images per VAE-encoding batch
            num_examples=512,  # held-out examples of the loss
            guidance_scale=4.0,  # of the sample grids
            sampler="dpm_solver_pp",  # a key of diffusion.SAMPLERS
            sampling_steps=25,  # its steps
        )
    )
    return config
