"""Input checks and row normalisation shared by the vector algorithms (k-means, k-center, NovelSum, metrics)."""

from __future__ import annotations

import numpy as np

__all__ = ["float32_rows", "prepared_rows", "unit_rows"]

METRICS = ("l2", "cosine")


def float32_rows(X, name: str = "X") -> np.ndarray:
    """``X`` as a C-contiguous float32 (n, d) array; ValueError when it is not 2-D or not finite."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {X.shape}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not np.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return X


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in X's dtype; zero rows stay zero (cosine 0 to everything)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)


def prepared_rows(X, metric: str, name: str = "X") -> np.ndarray:
    """:func:`float32_rows`, unit-normalised when ``metric == "cosine"`` (``"l2"`` leaves rows as they are)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    Xf = float32_rows(X, name)
    return unit_rows(Xf) if metric == "cosine" else Xf
