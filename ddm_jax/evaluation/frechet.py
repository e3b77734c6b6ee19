"""Frechet distance between Gaussians fitted to features (FID when the features are Inception's).

d^2 = ||mu_1 - mu_2||^2 + Tr(C_1 + C_2 - 2 (C_1 C_2)^(1/2))   (Heusel et al. 2017, eq. 6).

Computed on the host in float64. Tr (C_1 C_2)^(1/2) = Tr (C_1^(1/2) C_2 C_1^(1/2))^(1/2): the
matrix inside is symmetric positive semi-definite, so its square root comes from a symmetric
eigen-decomposition with no complex parts; eigenvalues that round below zero (near-singular
covariances, fewer samples than features) are clipped to zero instead of adding an eps I offset.
"""

import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], unbiased covariance [F, F]) of features [N, F], N >= 2, in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features of shape {features.shape} must be [N, F] with N >= 2")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """M^(1/2) of a symmetric positive semi-definite M, eigenvalues clipped at zero."""
    eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """Tr (C_1 C_2)^(1/2) = sum of sqrt(eigenvalues of C_1^(1/2) C_2 C_1^(1/2))."""
    root1 = _symmetric_sqrt(cov1)
    eigenvalues = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu_1 - mu_2||^2 + Tr(C_1 + C_2 - 2 (C_1 C_2)^(1/2)) of N(mu_1, C_1) and N(mu_2, C_2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    features = mu1.shape[0]
    for name, value, shape in (
        ("mu2", mu2, (features,)),
        ("cov1", cov1, (features, features)),
        ("cov2", cov2, (features, features)),
    ):
        if value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}; expected {shape} to match mu1 {mu1.shape}")
    distance = np.sum(np.square(mu1 - mu2)) + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2)
    return float(max(distance, 0.0))


def batched_features(feature_fn, samples, batch_size: int) -> np.ndarray:
    """feature_fn over samples [N, ...] in batches of at most batch_size, concatenated: [N, F]."""
    return np.concatenate(
        [
            np.asarray(feature_fn(samples[start : start + batch_size]), np.float64)
            for start in range(0, len(samples), batch_size)
        ]
    )


def frechet_distance_of(feature_fn, samples_a, samples_b, batch_size: int) -> float:
    """Frechet distance between the feature statistics of two sample sets (feature_fn: [b, ...] -> [b, F])."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    statistics = [
        feature_statistics(batched_features(feature_fn, samples, batch_size)) for samples in (samples_a, samples_b)
    ]
    return frechet_distance(*statistics[0], *statistics[1])
