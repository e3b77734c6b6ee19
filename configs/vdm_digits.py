"""VDM on scikit-learn's 8x8 digits (values 0..16, offline): the `make run` default.

A small continuous-time VDM with a learned monotone schedule that trains on 2 CPU cores in
minutes and reports test bits/dim (experiments/results/vdm_digits.md).

  python -m ddm_jax.main --config=configs/vdm_digits.py --workdir=workdirs/vdm_digits
  python -m ddm_jax.main --workdir=workdirs/vdm_digits --mode=eval          # the saved config
  python -m ddm_jax.main --config=configs/vdm_digits.py --workdir=/tmp/d --config.model.T=100
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "digits"  # a TFDS name, "folder:/path" or "npz:/path" (docs/data.md)
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; None: TFDS's default
    config.data.vocab_size = ml_collections.config_dict.placeholder(int)  # None: taken from the data (17 here)
    config.data.augment = ml_collections.config_dict.placeholder(str)  # None, or "dihedral" (square images)
    config.data.eval_split = "test"  # the split evaluated for test bits/dim
    config.data.image_size = ml_collections.config_dict.placeholder(tuple)  # "folder:" data only: (H, W) resize
    config.data.download = False  # may an unprepared TFDS dataset be downloaded here (needs the network)

    config.model = ml_collections.ConfigDict()
    # fixed_linear | learned_linear | learned_monotone | cosine | ddpm_linear | scaled_linear
    config.model.schedule = "learned_monotone"
    config.model.gamma_min = -13.3  # gamma(0) = -log SNR at t = 0 (initial value when learned)
    config.model.gamma_max = 5.0  # gamma(1) at t = 1 (initial value when learned)
    config.model.learn_endpoints = True  # learned_monotone: learn gamma(0), gamma(1) too
    config.model.schedule_features = 1024  # learned_monotone: width of its monotone network
    config.model.ddpm_betas = (1e-4, 0.02)  # ddpm_linear: (beta_1, beta_N), N = T + 1
    config.model.T = 0  # 0: continuous time; else the number of discrete steps
    config.model.parameterization = "eps"  # what the network predicts: eps | x0 | v | score
    config.model.weighting = "elbo"  # the training loss: elbo (bits/dim) | simple (DDPM's L_simple)
    config.model.antithetic_time_sampling = True  # low-discrepancy t over the batch
    config.model.network = "score_net"  # score_net (VDM's) | unet (DDPM's); settings below
    config.model.score_net = ml_collections.ConfigDict(
        dict(
            embedding_dim=32,  # width of every block
            n_layers=4,  # ResNet blocks down (n_layers + 1 up)
            dropout=0.0,  # dropout rate in the ResNet blocks
            with_fourier_features=True,  # base-2 Fourier features of z
            fourier_first=6,  # their exponents: fourier_first..fourier_last
            fourier_last=8,
            fourier_step=1,
            with_attention=False,  # self-attention in the middle block and after blocks
            dtype="float32",  # computation dtype: float32 | bfloat16 (parameters stay float32)
        )
    )
    config.model.unet = ml_collections.ConfigDict(
        dict(
            ch=32,  # base width
            ch_mult=(1, 2),  # width multipliers per resolution level
            num_res_blocks=1,  # ResNet blocks per level
            attn_resolutions=(4,),  # feature-map heights with attention
            dropout=0.0,
            num_heads=1,
            dtype="float32",
        )
    )

    config.optimizer = ml_collections.ConfigDict(
        dict(
            lr=2e-3,  # peak learning rate
            warmup_steps=200,  # linear warmup from 0
            b1=0.9,  # AdamW moments
            b2=0.99,
            eps=1e-8,
            weight_decay=0.01,  # decoupled, on every parameter
            grad_clip_norm=1.0,  # global-norm clipping; 0 or None: none
            lr_schedule="constant",  # constant | cosine (to 0 at decay_steps)
            decay_steps=0,  # cosine only
        )
    )

    config.training = ml_collections.ConfigDict(
        dict(
            seed=0,  # parameters, data order and every draw of t and noise
            batch_size=64,  # global batch, split over all devices of all processes
            num_steps=6000,  # train steps (a rerun resumes up to here); experiments/results/vdm_digits.md
            substeps=1,  # steps per compiled call
            ema_decay=0.999,  # of the parameters evaluated and sampled
            log_every=100,  # steps between train metrics and progress lines
            eval_every=2000,  # steps between test bits/dim
            checkpoint_every=2000,  # steps between checkpoints
            keep_checkpoints=3,  # the newest kept
            sample_every=6000,  # steps between sample grids
            num_samples=64,  # images per grid
            sample_steps=200,  # ancestral steps per sample
        )
    )

    config.eval = ml_collections.ConfigDict(
        dict(
            batch_size=360,  # examples per eval batch (the whole digits test split)
            num_time_samples=4,  # draws of (t, eps) averaged per test example
        )
    )
    return config
