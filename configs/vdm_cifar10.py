"""VDM on CIFAR-10 (Kingma et al. 2021), following google-research/vdm's configs/cifar10.py.

  python -m ddm_jax.main --config=configs/vdm_cifar10.py --workdir=workdirs/vdm_cifar10
  python -m ddm_jax.main --config=configs/vdm_cifar10.py:aug --workdir=workdirs/vdm_cifar10_aug
  python -m ddm_jax.main --config=configs/vdm_cifar10.py --workdir=workdirs/vdm_cifar10_bf16 \\
      --config.model.score_net.dtype=bfloat16      # bfloat16 compute on GPUs/TPUs

Needs cifar10 prepared for TFDS where the network is reachable (`tfds build cifar10
--data_dir=DIR`, then --config.data.data_dir=DIR).

The same as the official config: the learned linear schedule ("learnable_scalar") with gamma
starting at [-13.3, 5], continuous time, antithetic times, the score network (128 channels, 32
ResNet blocks, dropout 0.1, base-2 Fourier features 2^6..2^8, no attention), batch 128, AdamW (lr
2e-4, b1 0.9, b2 0.99, eps 1e-8, weight decay 0.01) after 100 linear warmup steps and without decay,
no gradient clipping, EMA 0.9999, 10 million steps.
Departures from it: weight decay applies to every parameter (the official mask exempts biases);
one step per compiled call (it scans 1000); evaluation covers the whole test split with
eval.num_time_samples draws of (t, eps) per image (it averages 100 batches of 128); seed 0 (it
uses 1). The paper's CIFAR-10 figure (2.65 bits/dim) has not been reproduced with this code: that
takes millions of steps on accelerators.

":aug" selects the paper's augmented run (google-research/vdm's configs/cifar10_aug_paper.py):
the 8 symmetries of the square as conditioning (evaluated on the identity, so its bits/dim are
those of plain CIFAR-10), the learned monotone schedule ("learnable_nnet"), 256 channels,
attention, dropout 0.05, batch 1024; the departures above apply to it too.
"""

import ml_collections


def get_config(variant: str = ""):
    if variant not in ("", "aug"):
        raise ValueError(f"--config=configs/vdm_cifar10.py:{variant}: expected no variant or ':aug'")
    augmented = variant == "aug"
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "cifar10"  # TFDS cifar10: 32x32x3, 50000 train / 10000 test
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; None: TFDS's default
    config.data.vocab_size = ml_collections.config_dict.placeholder(int)  # None: taken from the data (256)
    config.data.augment = "dihedral" if augmented else None  # flips and quarter turns, as conditioning
    config.data.eval_split = "test"  # the split evaluated for test bits/dim
    config.data.image_size = ml_collections.config_dict.placeholder(tuple)  # "folder:" data only: (H, W) resize
    config.data.download = False  # may an unprepared TFDS dataset be downloaded here (needs the network)

    config.model = ml_collections.ConfigDict()
    config.model.schedule = "learned_monotone" if augmented else "learned_linear"  # see the docstring
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
            embedding_dim=256 if augmented else 128,  # official sm_n_embd
            n_layers=32,  # official sm_n_layer
            dropout=0.05 if augmented else 0.1,  # official sm_pdrop
            with_fourier_features=True,  # official with_fourier_features
            fourier_first=6,  # exponents 6..8, as the official code
            fourier_last=8,
            fourier_step=1,
            with_attention=augmented,  # official with_attention
            dtype="float32",  # computation dtype: float32 | bfloat16 (parameters stay float32)
        )
    )
    config.model.unet = ml_collections.ConfigDict(
        dict(
            ch=128,  # DDPM's CIFAR-10 UNet (Ho et al. 2020), for --config.model.network=unet
            ch_mult=(1, 2, 2, 2),  # width multipliers per level
            num_res_blocks=2,  # ResNet blocks per level
            attn_resolutions=(16,),  # attention at 16x16
            dropout=0.1,
            num_heads=1,
            dtype="float32",
        )
    )

    config.optimizer = ml_collections.ConfigDict(
        dict(
            lr=2e-4,  # official learning_rate
            warmup_steps=100,  # official num_steps_lr_warmup
            b1=0.9,  # official AdamW arguments
            b2=0.99,
            eps=1e-8,
            weight_decay=0.01,
            grad_clip_norm=0.0,  # none, as the official code
            lr_schedule="constant",  # official lr_decay=False
            decay_steps=0,  # cosine only
        )
    )

    config.training = ml_collections.ConfigDict(
        dict(
            seed=0,  # parameters, data order and every draw of t and noise
            batch_size=1024 if augmented else 128,  # official batch_size_train
            num_steps=10_000_000,  # official num_steps_train
            substeps=1,  # steps per compiled call
            ema_decay=0.9999,  # official ema_rate
            log_every=1000,  # official steps_per_logging
            eval_every=10_000,  # official steps_per_eval
            checkpoint_every=10_000,  # official steps_per_save
            keep_checkpoints=3,  # the newest kept
            sample_every=50_000,  # steps between sample grids
            num_samples=64,  # images per grid
            sample_steps=1000,  # ancestral steps per sample
        )
    )

    config.eval = ml_collections.ConfigDict(
        dict(
            batch_size=500,  # examples per eval batch
            num_time_samples=1,  # draws of (t, eps) averaged per test image
        )
    )
    return config
