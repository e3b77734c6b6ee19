"""Downsampled ImageNet (van den Oord et al. 2016) through TFDS, as the VDM paper uses it.

TFDS's `downsampled_imagenet/32x32` and `downsampled_imagenet/64x64` builders
read train_<size>.tar and valid_<size>.tar from http://image-net.org/small/,
which no longer serves them (tensorflow/datasets#4662, google-research/vdm#8).
The input pipeline therefore never starts that download: it asks for the
dataset to be prepared by hand (`not_prepared_expectation`). The archives hold
lossless PNG images of one size per config, a size the builder's image feature
leaves unspecified (`image_shape` supplies it). The splits are "train" and
"validation"; there is no "test" split.
"""

import tensorflow_datasets as tfds

BUILDER_NAME = "downsampled_imagenet"


def is_downsampled_imagenet(builder: tfds.core.DatasetBuilder) -> bool:
    return builder.name == BUILDER_NAME


def image_shape(builder: tfds.core.DatasetBuilder) -> tuple[int, int, int]:
    """(H, W, 3) from the config name "<H>x<W>"."""
    height, width = builder.builder_config.name.split("x")
    return int(height), int(width), 3


def not_prepared_expectation(name: str, builder: tfds.core.DatasetBuilder) -> str:
    """What an unprepared downsampled ImageNet needs: how to prepare it by hand, with the archives'
    names, sizes and sha256 (the `expected` part of the ArgumentError naming the dataset)."""
    suffix = f"_{builder.builder_config.name}.tar"
    archives = "\n".join(
        f"       {info.filename}  {int(info.size)} bytes  sha256 {info.checksum}"
        for info in builder.url_infos.values()
        if info.filename.endswith(suffix)
    )
    return (
        f"a dataset prepared under {builder.data_dir_root}; this one cannot be downloaded automatically: "
        "TFDS's source for it, http://image-net.org/small/, no longer serves the files (see "
        "tensorflow/datasets#4662 for copies of them). Prepare it by hand, once:\n"
        "  1. Put these archives of van den Oord et al.'s (2016) downsampled ImageNet in a directory "
        "MANUAL_DIR (TFDS checks their sizes and sha256):\n"
        f"{archives}\n"
        f"  2. tfds build {name} --manual_dir=MANUAL_DIR --data_dir=DATA_DIR\n"
        "     (the tfds command needs `pip install apache-beam`, tensorflow/datasets#5463; without it:\n"
        f"     python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='DATA_DIR')"
        ".download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir='MANUAL_DIR'))\")\n"
        "  3. Pass DATA_DIR as the data_dir (config: --config.data.data_dir=DATA_DIR)."
    )
