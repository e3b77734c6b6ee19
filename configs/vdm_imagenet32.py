"""VDM on ImageNet 32x32 (TFDS downsampled_imagenet/32x32, van den Oord et al. 2016's version).

Settings: vdm_cifar10's, with the score network of google-research/vdm's configs/imagenet32.py
(the paper's code): 256 channels, 32 ResNet blocks, dropout 0.1, no attention; batch 128, AdamW
lr 2e-4, EMA 0.9999, gamma in [-13.3, 5] agree with that file. Not established: that file uses a
learned *linear* schedule ('learnable_scalar') and 100 warmup steps, where this config keeps
vdm_cifar10's learned monotone schedule and 5000 warmup steps; the paper's own batch size for
ImageNet was not checked. Evaluation is on the "validation" split (there is no "test" split).

The pipeline holds the training split in host memory: about 1.28 million x 32 x 32 x 3 bytes
= 3.9 GB per process. The data must be prepared by hand once (nothing is downloaded at run
time): put train_32x32.tar and valid_32x32.tar (formerly at http://image-net.org/small/; see
tensorflow/datasets#4662) in MANUAL_DIR, then build it (the tfds command needs apache-beam; the
pipeline's error for unprepared data gives a plain-Python equivalent) and train:

  tfds build downsampled_imagenet/32x32 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR
  python -m ddm_jax.main --config=configs/vdm_imagenet32.py --workdir=workdirs/vdm_imagenet32 \
      --config.data.data_dir=DATA_DIR
"""

from configs import vdm_cifar10


def get_config():
    config = vdm_cifar10.get_config()
    config.data.dataset = "downsampled_imagenet/32x32"
    config.data.eval_split = "validation"

    config.model.score_net.embedding_dim = 256  # blocks, dropout, attention: as vdm_cifar10
    return config
