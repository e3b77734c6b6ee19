"""The per-pixel categorical baseline against closed forms and a direct count."""

import numpy as np

from ddm_jax.evaluation.baselines import per_pixel_categorical_bpd


def test_every_value_equally_often_gives_log2_vocab():
    vocab = 5
    train = np.tile(np.arange(vocab)[:, None], (3, 4))  # each value 3 times at each of 4 dims
    test = np.random.default_rng(0).integers(0, vocab, (7, 4))
    assert per_pixel_categorical_bpd(train, test, vocab, pseudo_count=0.0) == np.log2(vocab)


def test_matches_a_direct_count():
    rng = np.random.default_rng(1)
    train, test = rng.integers(0, 3, (20, 2, 2)), rng.integers(0, 3, (6, 2, 2))
    expected = []
    for example in test.reshape(6, -1):
        for d, value in enumerate(example):
            column = train.reshape(20, -1)[:, d]
            expected.append(-np.log2((np.sum(column == value) + 0.5) / (20 + 3 * 0.5)))
    np.testing.assert_allclose(per_pixel_categorical_bpd(train, test, 3), np.mean(expected))
