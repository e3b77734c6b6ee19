"""The shapes attribute classifier: it reads generated images' attributes and gives the features
of the Frechet distance on shapes (ddm_jax.evaluation.shapes_metrics).

A three-stage CNN (ddm_jax.evaluation.classifier) with the heads shapes_metrics.HEADS, trained
with AdamW on the shapes train split in a few minutes on 2 CPU cores; it writes
DIR/classifier.npz and the per-head test accuracy in experiments/results/shapes_classifier.{md,json}.

  python -m experiments.train_shapes_classifier --config=configs/shapes_classifier.py \\
      --workdir=workdirs/shapes_classifier
  python -m experiments.train_shapes_classifier --config=configs/shapes_classifier.py --workdir=/tmp/c \\
      --config.data.dataset=shapes/64
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "shapes/32"  # a shapes configuration: "shapes/32", "shapes/64" or "shapes/NAME"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS default when None

    config.classifier = ml_collections.ConfigDict()
    config.classifier.channels = (32, 64, 128)  # output channels of each conv + 2x2 pooling stage
    config.classifier.features = 128  # width of the penultimate layer: the Frechet distance's features

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.lr = 3e-3  # AdamW learning rate, constant
    config.optimizer.weight_decay = 1e-4  # AdamW decoupled weight decay

    config.training = ml_collections.ConfigDict()
    config.training.seed = 0  # initialisation and batch order
    config.training.batch_size = 128  # images per step
    config.training.num_steps = 3000  # AdamW steps

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 500  # images per classifier call when scoring
    return config
