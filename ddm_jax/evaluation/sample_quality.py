"""Sample quality in a classifier's eyes: Frechet distance of its features and its class distribution.

For samples S and reference data R (e.g. the test split), with a classifier's penultimate
features f and logits l:
  frechet_distance                 d^2 between Gaussians fitted to f(S) and f(R) (frechet.py);
  class_distribution               p_c = fraction of S whose argmax_c l is c, [classes];
  reference_class_distribution     q_c, the same over R;
  class_total_variation            TV(p, q) = 1/2 sum_c |p_c - q_c|, in [0, 1];
  mean_max_probability             mean over S of max_c softmax(l)_c (confident samples: near 1);
  reference_mean_max_probability   the same over R.
A sampler that misses or over-weights classes raises the total variation even when its images
look fine one by one; blurry or ambiguous samples lower the mean max-probability.
"""

import numpy as np
import scipy.special

from ddm_jax.evaluation import frechet


def class_distribution(logits: np.ndarray) -> np.ndarray:
    """Fraction of rows of logits [N, classes] whose argmax is each class: [classes], sums to 1."""
    return np.bincount(np.argmax(logits, axis=1), minlength=logits.shape[1]) / len(logits)


def mean_max_probability(logits: np.ndarray) -> float:
    """Mean over rows of logits [N, classes] of max_c softmax(logits)_c."""
    return float(scipy.special.softmax(logits, axis=1).max(axis=1).mean())


def sample_quality(features_fn, logits_fn, samples, reference, batch_size: int) -> dict:
    """The figures of this module's docstring for samples against reference ([N, ...] each).

    features_fn: [b, ...] -> [b, F]; logits_fn: [b, ...] -> [b, classes]; both are applied in
    batches of at most batch_size (e.g. a TrainedClassifier's `features` and `logits`).
    The distributions are numpy arrays [classes]; the other values are floats.
    """
    distance = frechet.frechet_distance_of(features_fn, samples, reference, batch_size)
    sample_logits, reference_logits = (
        frechet.batched_features(logits_fn, images, batch_size) for images in (samples, reference)
    )
    p, q = class_distribution(sample_logits), class_distribution(reference_logits)
    return {
        "frechet_distance": distance,
        "class_distribution": p,
        "reference_class_distribution": q,
        "class_total_variation": float(0.5 * np.abs(p - q).sum()),
        "mean_max_probability": mean_max_probability(sample_logits),
        "reference_mean_max_probability": mean_max_probability(reference_logits),
    }
