"""VDM on downsampled ImageNet, 32x32 or 64x64 (van den Oord et al. 2016's version; TFDS
downsampled_imagenet/32x32 and /64x64), following google-research/vdm's configs/imagenet32.py
and configs/imagenet64.py.

  python -m ddm_jax.main --config=configs/vdm_imagenet.py:32 --workdir=workdirs/vdm_imagenet32 \\
      --config.data.data_dir=DATA_DIR
  python -m ddm_jax.main --config=configs/vdm_imagenet.py:64 --workdir=workdirs/vdm_imagenet64 \\
      --config.data.data_dir=DATA_DIR

The data must be prepared by hand once (nothing is downloaded at run time): put train_32x32.tar
and valid_32x32.tar (or the 64x64 ones; formerly at http://image-net.org/small/, see
tensorflow/datasets#4662) in MANUAL_DIR, then
  tfds build downsampled_imagenet/32x32 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR
(the pipeline's error for unprepared data gives a plain-Python equivalent). The pipeline holds
the training split in host memory: about 3.9 GB per process at 32x32 and 15.7 GB at 64x64; it
refuses to start on a host with less available. Evaluation is on the "validation" split.

The same as the official configs: the learned linear schedule ("learnable_scalar") starting at
[-13.3, 5], continuous time, the score network with 256 channels and 32 (32x32) or 64 (64x64)
ResNet blocks, dropout 0.1, Fourier features, no attention, batch 128, AdamW (lr 2e-4, b1 0.9,
b2 0.99, weight decay 0.01) after 100 warmup steps without decay or clipping, EMA 0.9999.
Departures: those of configs/vdm_cifar10.py (weight decay on every parameter, one step per call,
whole-split evaluation, seed 0). Not established: the official repository's input pipeline has no
64x64 branch, so its imagenet64 config may not be the one behind the paper's figure.
"""

import ml_collections


def get_config(resolution: str = "32"):
    if resolution not in ("32", "64"):
        raise ValueError(f"--config=configs/vdm_imagenet.py:{resolution}: expected ':32' or ':64'")
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.dataset = f"downsampled_imagenet/{resolution}x{resolution}"  # prepared by hand (docstring)
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # where it was prepared
    config.data.vocab_size = ml_collections.config_dict.placeholder(int)  # None: taken from the data (256)
    config.data.augment = ml_collections.config_dict.placeholder(str)  # None, or "dihedral"
    config.data.eval_split = "validation"  # the dataset has no "test" split
    config.data.image_size = ml_collections.config_dict.placeholder(tuple)  # "folder:" data only: (H, W) resize
    config.data.download = False  # may an unprepared TFDS dataset be downloaded here (needs the network)

    config.model = ml_collections.ConfigDict()
    config.model.schedule = "learned_linear"  # official "learnable_scalar"
    config.model.gamma_min = -13.3  # initial gamma(0)
    config.model.gamma_max = 5.0  # initial gamma(1)
    config.model.learn_endpoints = True  # learned_monotone only
    config.model.schedule_features = 1024  # learned_monotone only
    config.model.ddpm_betas = (1e-4, 0.02)  # ddpm_linear only
    config.model.T = 0  # continuous time
    config.model.parameterization = "eps"  # eps | x0 | v | score
    config.model.weighting = "elbo"  # elbo | simple
    config.model.antithetic_time_sampling = True  # low-discrepancy t over the batch
    config.model.network = "score_net"  # score_net | unet
    config.model.score_net = ml_collections.ConfigDict(
        dict(
            embedding_dim=256,  # official sm_n_embd
            n_layers=32 if resolution == "32" else 64,  # official sm_n_layer
            dropout=0.1,  # official sm_pdrop
            with_fourier_features=True,
            fourier_first=6,
            fourier_last=8,
            fourier_step=1,
            with_attention=False,
            dtype="float32",  # computation dtype: float32 | bfloat16
        )
    )
    config.model.unet = ml_collections.ConfigDict(
        dict(
            ch=128,  # a DDPM-style UNet, for --config.model.network=unet
            ch_mult=(1, 2, 2, 2) if resolution == "32" else (1, 2, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(16,),
            dropout=0.1,
            num_heads=1,
            dtype="float32",
        )
    )

    config.optimizer = ml_collections.ConfigDict(
        dict(
            lr=2e-4,  # official learning_rate
            warmup_steps=100,  # official num_steps_lr_warmup
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            weight_decay=0.01,
            grad_clip_norm=0.0,  # none, as the official code
            lr_schedule="constant",  # official lr_decay=False
            decay_steps=0,
        )
    )

    config.training = ml_collections.ConfigDict(
        dict(
            seed=0,
            batch_size=128,  # official batch_size_train
            num_steps=10_000_000,
            substeps=1,
            ema_decay=0.9999,  # official ema_rate
            log_every=1000,
            eval_every=10_000,
            checkpoint_every=10_000,
            keep_checkpoints=3,
            sample_every=50_000,
            num_samples=64,
            sample_steps=1000,
        )
    )

    config.eval = ml_collections.ConfigDict(
        dict(
            batch_size=500,  # examples per eval batch
            num_time_samples=1,  # draws of (t, eps) per validation image
        )
    )
    return config
