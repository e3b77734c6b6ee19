"""VDM on CIFAR-10 with the VDM paper's data augmentation: vdm_cifar10 plus flips and rotations.

Each training image is transformed by one of the 8 symmetries of the square (horizontal flip x
quarter turns), drawn uniformly, and the network is conditioned on the one-hot transformation;
evaluation conditions on the identity, so test bits/dim are those of un-augmented CIFAR-10.
The paper's augmented model is larger than vdm_cifar10's and trained with a larger batch
(google-research/vdm's configs/cifar10_aug_paper.py: 256 channels, attention, dropout 0.05,
batch 1024); this config changes only the data. Needs cifar10 prepared for TFDS.

  python -m ddm_jax.main --config=configs/vdm_cifar10_aug.py --workdir=workdirs/vdm_cifar10_aug
"""
from configs import vdm_cifar10


def get_config():
    config = vdm_cifar10.get_config()
    config.data.augment = "dihedral"
    return config
