"""VDM on the offline digits dataset (8x8, values 0..16): the `make run` default.

A small continuous-time VDM with a learned monotone schedule that trains on 2 CPU cores in
a few minutes and reports test bits/dim.

  python -m ddm_jax.main --config=configs/vdm_digits.py --workdir=workdirs/vdm_digits
  python -m ddm_jax.main --config=configs/vdm_digits.py --workdir=workdirs/vdm_digits --mode=eval
  python -m ddm_jax.main --config=configs/vdm_digits.py --workdir=/tmp/d --config.model.T=100
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "digits"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS default when None
    config.data.vocab_size = ml_collections.config_dict.placeholder(int)  # taken from the data when None
    config.data.augment = ml_collections.config_dict.placeholder(str)  # None | "dihedral" (square images)
    config.data.eval_split = "test"

    config.model = ml_collections.ConfigDict()
    config.model.schedule = "learned_monotone"  # fixed_linear | learned_linear | learned_monotone | cosine | ddpm_linear
    config.model.gamma_min = -13.3
    config.model.gamma_max = 5.0
    config.model.learn_endpoints = True  # learned_monotone only
    config.model.schedule_features = 1024  # learned_monotone only
    config.model.ddpm_betas = (1e-4, 0.02)  # ddpm_linear only: (beta_1, beta_N), N = T + 1
    config.model.T = 0  # 0: continuous time; else the number of discrete steps
    config.model.parameterization = "eps"  # eps | x0 | v | score
    config.model.loss = "elbo"  # elbo | simple (DDPM's L_simple)
    config.model.antithetic_time_sampling = True
    config.model.network = "score_net"  # score_net | unet
    # dtype: the networks' computation dtype, "float32" | "bfloat16"; parameters stay float32.
    config.model.score_net = ml_collections.ConfigDict(dict(
        embedding_dim=32, n_layers=4, dropout=0.0, with_fourier_features=True,
        fourier_first=6, fourier_last=8, fourier_step=1, with_attention=False, dtype="float32"))
    config.model.unet = ml_collections.ConfigDict(dict(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_heads=1,
        dtype="float32"))

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=2e-3, warmup_steps=200, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01,
        grad_clip_norm=1.0, schedule="constant", decay_steps=0))

    config.training = ml_collections.ConfigDict(dict(
        seed=0, batch_size=64, num_steps=8000, substeps=1, ema_decay=0.999,
        log_every=100, eval_every=2000, checkpoint_every=2000, keep_checkpoints=3,
        sample_every=4000, num_samples=64, sample_steps=200))

    config.eval = ml_collections.ConfigDict(dict(batch_size=360, num_time_samples=4))
    return config
