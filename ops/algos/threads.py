"""Thread use for small parallel regions on a shared, possibly oversubscribed machine."""

from __future__ import annotations

import contextlib

# faiss calls below this many multiply-adds run on one OpenMP thread: tiny parallel regions on an
# oversubscribed machine cost seconds (measured: 1,200 x 12, k = 30: 2.9 s on 2 threads, 0.03 s on 1).
FAISS_SERIAL_BELOW = 1 << 26


@contextlib.contextmanager
def faiss_threads(work: int):
    """Run the faiss calls inside on one thread when ``work`` (multiply-adds) is small."""
    import faiss

    if work >= FAISS_SERIAL_BELOW:
        yield
        return
    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # OpenMP's nthreads is per calling thread: other threads are unaffected
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev)
