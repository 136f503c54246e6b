"""How the engine sizes the batches of a map fill: small first, then by time, never below the op's floor."""
from __future__ import annotations

import numpy as np
import pytest

from datasel.ops.contract import Kind
from datasel.ops.registry import op

pytestmark = pytest.mark.usefixtures("cache_dir")

SIZES: list[int] = []


@pytest.fixture(autouse=True)
def probe_ops():
    """Two map ops that record their batch sizes, registered for these tests only."""
    from datasel.ops import registry

    @op("batch_probe", [], Kind.SCORES, role="map", version="1", chunk_rows=50, min_batch_rows=12)
    def batch_probe(state, batch):
        """Records the size of every batch it is given (a test op)."""
        SIZES.append(len(batch))
        return np.ones(len(batch))

    @op("batch_probe_free", [], Kind.SCORES, role="map", version="1", chunk_rows=50)
    def batch_probe_free(state, batch):
        """The same without a floor (a test op)."""
        SIZES.append(len(batch))
        return np.ones(len(batch))

    yield
    for name in ("batch_probe", "batch_probe_free"):
        registry._REGISTRY.pop(name, None)


def _pool(n):
    return [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(n)]


def test_batches_never_go_below_the_ops_floor(run_recipe):
    SIZES.clear()
    run_recipe("select batch_probe > 0", _pool(100), persist_seconds=1e-9)  # time would ask for 1 row
    assert SIZES and min(SIZES[:-1]) >= 12 and max(SIZES) <= 50 and sum(SIZES) == 100, SIZES


def test_without_a_floor_the_first_batch_is_small(run_recipe):
    SIZES.clear()
    run_recipe("select batch_probe_free > 0", _pool(30), persist_seconds=1e-9)
    assert SIZES[0] == 4 and min(SIZES) == 1, SIZES
