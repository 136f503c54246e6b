"""The shared input checks and row normalisation of the vector algorithms."""
from __future__ import annotations

import numpy as np
import pytest

from datasel.ops.algos.arrays import float32_rows, prepared_rows, unit_rows


def test_float32_rows_converts_and_checks():
    out = float32_rows([[1, 2], [3, 4]])
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"Q must be 2-D \(n, d\), got shape \(3,\)"):
        float32_rows([1, 2, 3], "Q")
    with pytest.raises(ValueError, match="X contains NaN or infinite values"):
        float32_rows([[1.0, np.inf]])


def test_unit_rows_keeps_zero_rows_and_dtype():
    X = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
    np.testing.assert_allclose(unit_rows(X), [[0.6, 0.8], [0, 0], [0, -1]], rtol=0, atol=1e-15)
    assert unit_rows(X).dtype == np.float64
    assert unit_rows(X.astype(np.float32)).dtype == np.float32


def test_prepared_rows_by_metric():
    X = [[3.0, 4.0], [0.0, 0.0]]
    np.testing.assert_array_equal(prepared_rows(X, "l2"), X)
    np.testing.assert_allclose(prepared_rows(X, "cosine"), [[0.6, 0.8], [0, 0]], atol=1e-7)
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine', got 'dot'"):
        prepared_rows(X, "dot")
