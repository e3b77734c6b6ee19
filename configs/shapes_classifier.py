"""The shapes attribute classifier: it reads the attributes of generated images for prompt scoring
and gives the features of the Frechet distance on shapes (ddm_jax.evaluation.shapes_metrics).

A three-stage CNN (ddm_jax.evaluation.classifier) with the heads shapes_metrics.HEADS, reading
the image with its palette colours and colour boundaries (shapes_metrics.classifier_inputs),
trained with AdamW on the shapes train split: 3000 steps, 2615 s (about 44 minutes) for the
committed weights on a slow 2-core AMD EPYC shared with other jobs, 375 s for an earlier instance
on the earlier sessions' faster, also shared, cores (experiments/results/shapes_classifier.md).
It writes DIR/classifier.npz and the record RESULTS/shapes_classifier.{npz,md,json};
experiments/results/shapes_classifier.npz, committed, is the project's classifier, the one every
text-to-image record is judged by, so a retraining needs a new --results (the script refuses to
overwrite it).

  python -m experiments.train_shapes_classifier --config=configs/shapes_classifier.py \\
      --workdir=workdirs/shapes_classifier --results=workdirs/shapes_classifier/results
  python -m experiments.train_shapes_classifier --config=configs/shapes_classifier.py --workdir=/tmp/c \\
      --results=/tmp/c/results --config.data.dataset=shapes/64 --config.classifier.channels='(32, 64, 128, 128)'
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "shapes/32"  # a shapes configuration: "shapes/32", "shapes/64" or a prepared "shapes/NAME"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS default when None

    config.classifier = ml_collections.ConfigDict()
    config.classifier.channels = (32, 64, 128)  # output channels of each conv + 2x2 pooling stage
    config.classifier.features = 128  # width of the penultimate layer: the Frechet distance's features
    config.classifier.pooling = "max"  # "max" keeps small shapes and thin outlines; "avg" blurs them
    config.classifier.global_max = True  # also read each stage's maximum over positions (what is present)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.lr = 3e-3  # AdamW peak learning rate
    config.optimizer.weight_decay = 1e-4  # AdamW decoupled weight decay
    config.optimizer.schedule = "cosine"  # "constant", or linear warmup then cosine decay to lr / 100
    config.optimizer.warmup_steps = 100  # steps of linear warmup from 0 (cosine schedule)

    config.training = ml_collections.ConfigDict()
    config.training.seed = 0  # initialisation and batch order
    config.training.batch_size = 64  # images per step
    config.training.num_steps = 3000  # AdamW steps (about 10 epochs of the 20000 train images)
    config.training.max_blur = 0.8  # training images blurred with weight ~ U[0, max_blur] (shapes_metrics.degrade)
    config.training.max_noise = 8  # then noise uniform in [-a, a] per channel, a ~ U{0..max_noise}

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 500  # images per classifier call when scoring
    return config
