"""Process-wide settings for training on the host CPU, used by the trainer and, so that they time what it runs, by
the benchmarks: the cyclic garbage collector and glibc's allocator."""

from __future__ import annotations

import contextlib
import gc

# mallopt parameters (glibc's malloc.h) and the values `keep_freed_memory` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MB come from the heap
_TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: keep up to 2 GB of free heap (a B/32 step frees ~1.4 GB)


@contextlib.contextmanager
def gc_frozen():
    """Everything alive when training starts (imports, model, engine) lives for the whole run: keep it out of the
    cyclic garbage collector, whose full passes over ~10^6 such objects otherwise cost 1-2% of a CPU training step
    (more with many small steps). Unfrozen afterwards, so that a later run in this process can free them. The
    benchmarks time their steps the same way."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory in this process: blocks up to 32 MB from the heap, and up to 2 GB of free heap
    kept instead of handed back to the OS. Why: a training step frees its activations (1.2-1.4 GB at B/32, batch 32)
    and allocates them again in the next; by its own heuristics glibc hands some of them back, and the next step
    faults their pages in again, ~2.5 us per 4 KB page. Measured (docs/benchmarks.md, session 14): ViT-B-32 in its own
    process faulted 15k-190k pages per step and trained 5% faster with this setting, De-focus Mamba-B/32 6%. False
    where it does not apply (not glibc). Irreversible for the process, hence for CPU runs only."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                        _TRIM_THRESHOLD))
    except (OSError, AttributeError, TypeError):
        return False
