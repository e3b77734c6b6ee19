"""The digits classifier whose penultimate features define the Frechet distance on digits.

A two-stage CNN (ddm_jax.evaluation.classifier) trained with AdamW on the digits train split
in well under a minute on 2 CPU cores; it reports test accuracy and writes DIR/classifier.npz,
plus the Frechet-distance sanity figures in experiments/results/digits_classifier.{md,json}.

  python -m experiments.train_digits_classifier --config=configs/digits_classifier.py \\
      --workdir=workdirs/digits_classifier
  python -m experiments.train_digits_classifier --config=configs/digits_classifier.py --workdir=/tmp/c \\
      --config.training.num_steps=100
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "digits"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS default when None

    config.classifier = ml_collections.ConfigDict(dict(channels=(32, 64), features=128))
    config.optimizer = ml_collections.ConfigDict(dict(lr=3e-3, weight_decay=1e-4))
    config.training = ml_collections.ConfigDict(dict(seed=0, batch_size=64, num_steps=400))
    config.eval = ml_collections.ConfigDict(dict(batch_size=360))
    return config
