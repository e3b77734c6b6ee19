"""VDM on ImageNet 64x64 (TFDS downsampled_imagenet/64x64, van den Oord et al. 2016's version).

vdm_imagenet32 with 64 ResNet blocks, as in google-research/vdm's configs/imagenet64.py (256
channels, dropout 0.1, no attention, batch 128). Not established: that repository's input
pipeline has no ImageNet 64x64 branch, so its config may not be the one behind the paper's
result; the schedule and warmup caveats of vdm_imagenet32 apply here too.

The pipeline holds the training split in host memory: about 1.28 million x 64 x 64 x 3 bytes
= 15.7 GB per process; it refuses to start on a host with less memory available. Prepare the
data by hand once with train_64x64.tar and valid_64x64.tar in MANUAL_DIR (see vdm_imagenet32):

  tfds build downsampled_imagenet/64x64 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR
  python -m ddm_jax.main --config=configs/vdm_imagenet64.py --workdir=workdirs/vdm_imagenet64 \
      --config.data.data_dir=DATA_DIR
"""
from configs import vdm_imagenet32


def get_config():
    config = vdm_imagenet32.get_config()
    config.data.dataset = "downsampled_imagenet/64x64"
    config.model.score_net.n_layers = 64
    return config
