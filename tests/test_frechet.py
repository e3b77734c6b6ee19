"""Frechet distance against an independent scipy computation, and its basic properties."""

import numpy as np
import pytest
import scipy.linalg

from ddm_jax.evaluation import frechet


def random_features(seed, n=400, f=12, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((f, f)) / np.sqrt(f)
    return rng.standard_normal((n, f)) @ mixing + shift * rng.standard_normal(f)


def scipy_frechet(a, b):
    """pytorch-fid's recipe: scipy.linalg.sqrtm of C_1 C_2, real part."""
    mu1, mu2 = a.mean(0), b.mean(0)
    cov1, cov2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov1 @ cov2).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * root)


@pytest.mark.parametrize("seeds", [(0, 1), (2, 3), (4, 4)])
def test_matches_scipy_sqrtm_on_random_features(seeds):
    a, b = random_features(seeds[0]), random_features(seeds[1] + 100, n=300, shift=0.5)
    distance = frechet.frechet_distance(*frechet.feature_statistics(a), *frechet.feature_statistics(b))
    np.testing.assert_allclose(distance, scipy_frechet(a, b), rtol=1e-8)
    assert distance > 0.1


def test_statistics_are_the_sample_mean_and_unbiased_covariance():
    a = random_features(5, n=50, f=4)
    mean, cov = frechet.feature_statistics(a)
    centred = a - a.mean(0)
    np.testing.assert_allclose(mean, a.sum(0) / 50)
    np.testing.assert_allclose(cov, centred.T @ centred / 49)


def test_gaussians_with_known_distance():
    """Commuting covariances: d^2 = |mu_1 - mu_2|^2 + sum (sqrt(l_1) - sqrt(l_2))^2."""
    l1, l2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    rotation = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))[0]
    cov1, cov2 = (rotation * l1) @ rotation.T, (rotation * l2) @ rotation.T
    mu1, mu2 = np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 0.0])
    expected = 5.0 + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    np.testing.assert_allclose(frechet.frechet_distance(mu1, cov1, mu2, cov2), expected, rtol=1e-10)


def test_zero_for_identical_statistics_and_symmetric():
    a, b = random_features(6), random_features(7, shift=1.0)
    stats_a, stats_b = frechet.feature_statistics(a), frechet.feature_statistics(b)
    assert frechet.frechet_distance(*stats_a, *stats_a) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(
        frechet.frechet_distance(*stats_a, *stats_b), frechet.frechet_distance(*stats_b, *stats_a), rtol=1e-10
    )


def test_near_singular_covariances_give_a_finite_real_distance():
    """Fewer samples than features: rank-deficient covariances, where sqrtm of C_1 C_2 goes complex."""
    a, b = random_features(8, n=10, f=32), random_features(9, n=10, f=32)
    distance = frechet.frechet_distance(*frechet.feature_statistics(a), *frechet.feature_statistics(b))
    assert np.isfinite(distance) and distance > 0
    np.testing.assert_allclose(distance, scipy_frechet(a, b), rtol=1e-4)


def test_frechet_distance_of_batches_features_like_one_pass():
    a, b = random_features(10, n=103, f=5), random_features(11, n=77, f=5)
    feature_fn = lambda x: np.tanh(x) * 2.0
    distance = frechet.frechet_distance_of(feature_fn, a, b, batch_size=16)
    np.testing.assert_allclose(distance, scipy_frechet(feature_fn(a), feature_fn(b)), rtol=1e-8)


def test_user_mistakes_raise():
    with pytest.raises(ValueError, match="batch_size=0"):
        frechet.frechet_distance_of(lambda x: x, np.ones((4, 2)), np.ones((4, 2)), batch_size=0)
    with pytest.raises(ValueError, match="N >= 2"):
        frechet.feature_statistics(np.ones((1, 3)))
    with pytest.raises(ValueError, match="cov2"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
