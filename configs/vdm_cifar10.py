"""VDM on CIFAR-10 with the paper's settings (Kingma et al. 2021, Table 1 / Appendix B).

Continuous time, learned monotone schedule with gamma in [-13.3, 5.0], the resolution-
preserving score network (128 channels, 32 ResNet blocks, base-2 Fourier features,
dropout 0.1), batch 128, AdamW (lr 2e-4 with warmup, b2 = 0.99, weight decay 0.01),
EMA 0.9999. Needs cifar10 prepared for TFDS (`tfds build cifar10` on a machine online).

  python -m ddm_jax.main --config=configs/vdm_cifar10.py --workdir=workdirs/vdm_cifar10

bfloat16 computation with float32 parameters (on GPUs/TPUs with bfloat16 units; this holds
for the configs built on this one too):

  python -m ddm_jax.main --config=configs/vdm_cifar10.py --workdir=workdirs/vdm_cifar10_bf16 \
      --config.model.score_net.dtype=bfloat16
"""
import ml_collections

from configs import vdm_digits


def get_config():
    config = vdm_digits.get_config()
    config.data.dataset = "cifar10"

    config.model.score_net = ml_collections.ConfigDict(dict(
        embedding_dim=128, n_layers=32, dropout=0.1, with_fourier_features=True,
        fourier_first=6, fourier_last=8, fourier_step=1, with_attention=False,
        dtype="float32"))  # "bfloat16": bfloat16 compute, float32 parameters

    config.optimizer.lr = 2e-4
    config.optimizer.warmup_steps = 5000
    config.optimizer.grad_clip_norm = 1.0

    config.training.batch_size = 128
    config.training.num_steps = 10_000_000
    config.training.ema_decay = 0.9999
    config.training.log_every = 1000
    config.training.eval_every = 10_000
    config.training.checkpoint_every = 10_000
    config.training.sample_every = 50_000
    config.training.sample_steps = 1000

    config.eval.batch_size = 500
    return config
