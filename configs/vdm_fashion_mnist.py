"""VDM on Fashion-MNIST (Xiao et al. 2017): 28x28 grayscale, 60000 train / 10000 test, offline.

The data come from Debian's `dataset-fashion-mnist` files (installed by `make` where apt is
available; the `fashion_mnist_debian` builder downloads the same files elsewhere when
data.download=True). A continuous-time VDM with a learned monotone schedule: its 3000 steps take
about 35 minutes of training alone on the record's 2 CPU cores (650 ms a step); the recorded run
took 97.4 minutes of training and evaluation, sharing those cores and paused for about 30
(experiments/results/vdm_fashion_mnist.md).

  python -m ddm_jax.main --config=configs/vdm_fashion_mnist.py --workdir=workdirs/vdm_fashion_mnist
  python -m ddm_jax.main --workdir=workdirs/vdm_fashion_mnist --mode=eval
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "fashion_mnist_debian"  # 28x28x1, vocab 256, ten classes (unused here)
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; None: TFDS's default
    config.data.vocab_size = ml_collections.config_dict.placeholder(int)  # None: taken from the data (256)
    config.data.augment = ml_collections.config_dict.placeholder(str)  # None, or "dihedral"
    config.data.eval_split = "test"  # the split evaluated for test bits/dim
    config.data.image_size = ml_collections.config_dict.placeholder(tuple)  # "folder:" data only
    config.data.download = False  # may the builder download the files where Debian's are absent

    config.model = ml_collections.ConfigDict()
    config.model.schedule = "learned_monotone"  # fixed_linear | learned_linear | learned_monotone | ...
    config.model.gamma_min = -13.3  # initial gamma(0)
    config.model.gamma_max = 5.0  # initial gamma(1)
    config.model.learn_endpoints = True  # learned_monotone: learn gamma(0), gamma(1) too
    config.model.schedule_features = 1024  # learned_monotone: width of its monotone network
    config.model.ddpm_betas = (1e-4, 0.02)  # ddpm_linear: (beta_1, beta_N), N = T + 1
    config.model.T = 0  # 0: continuous time; else the number of discrete steps
    config.model.parameterization = "eps"  # eps | x0 | v | score
    config.model.weighting = "elbo"  # elbo (bits/dim) | simple (DDPM's L_simple)
    config.model.antithetic_time_sampling = True  # low-discrepancy t over the batch
    config.model.network = "score_net"  # score_net (VDM's) | unet (DDPM's)
    config.model.score_net = ml_collections.ConfigDict(
        dict(
            embedding_dim=32,  # width of every block
            n_layers=2,  # ResNet blocks down (n_layers + 1 up), all at 28x28
            dropout=0.0,  # dropout rate in the ResNet blocks
            with_fourier_features=True,  # base-2 Fourier features of z: the fine detail of 256 levels
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
            ch_mult=(1, 2, 2),  # 28 -> 14 -> 7
            num_res_blocks=1,  # ResNet blocks per level
            attn_resolutions=(7,),  # feature-map heights with attention
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
            num_steps=3000,  # train steps (650 ms each at batch 64 on 2 CPU cores: about 35 minutes alone)
            substeps=1,  # steps per compiled call
            ema_decay=0.999,  # of the parameters evaluated and sampled
            log_every=100,  # steps between train metrics and progress lines
            eval_every=1500,  # steps between test bits/dim
            checkpoint_every=1000,  # steps between checkpoints
            keep_checkpoints=3,  # the newest kept
            sample_every=3000,  # steps between sample grids
            num_samples=64,  # images per grid
            sample_steps=200,  # ancestral steps per sample
        )
    )

    config.eval = ml_collections.ConfigDict(
        dict(
            batch_size=500,  # examples per eval batch
            num_time_samples=1,  # draws of (t, eps) averaged per test image
        )
    )
    return config
