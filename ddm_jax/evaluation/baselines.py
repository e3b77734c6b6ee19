"""Reference likelihoods that a generative model of the same data should beat."""

import numpy as np


def per_pixel_categorical_bpd(train: np.ndarray, test: np.ndarray, vocab_size: int, pseudo_count: float = 0.5) -> float:
    """Test bits/dim of independent per-dimension categoricals fitted on `train`.

    p_d(v) = (n_d(v) + a) / (N + V a) with n_d(v) the train count of value v at dimension d
    (add-a smoothing; a = 1/2 is the Jeffreys prior). train, test: integer arrays [N, ...].
    """
    train = train.reshape(len(train), -1).astype(np.int64)
    test = test.reshape(len(test), -1).astype(np.int64)
    counts = np.stack([(train == v).sum(0) for v in range(vocab_size)], -1) + pseudo_count
    log_probs = np.log2(counts / counts.sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_probs[None], test[..., None], -1).mean())
