"""The C allocator under CPU tensors: keep freed memory in the process for reuse.

glibc's malloc serves every block above its mmap threshold (128 KiB at start, rising with use to at most
32 MiB) with fresh pages from the kernel and hands them back on free. A training step allocates and frees
the same large activations every time (the source prior's logits alone: batch × patches × vocabulary
floats, ~100 MB a step for SmolLM2), so the kernel zero-fills those pages again at every step: a stage-1
step of the default job spent 8 of 64 CPU seconds in the kernel (benchmarks/README.md). With mmap off and
a high trim threshold, freed blocks stay in the heap and the next step reuses them.

`bytelift`'s commands call `tune_allocator()` at start; a program using the library decides for itself.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Free memory at the top of the heap above this is returned to the kernel: mallopt takes an int, and the
# largest one keeps a step's working set (a few GB for SmolLM2) in the process between steps.
TRIM_THRESHOLD_BYTES = 2**31 - 1
# Set to 1 to leave the allocator as it is; glibc's own MALLOC_*_ variables, when set, also win.
OPT_OUT_ENV = "BYTELIFT_DEFAULT_MALLOC"
GLIBC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def tune_allocator() -> bool:
    """Turn glibc's mmap'd blocks off and raise its trim threshold for this process. Returns whether it did:
    False off Linux, without glibc, or when the user chose (`OPT_OUT_ENV`, glibc's MALLOC_*_ variables)."""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT_ENV) == "1":
        return False
    if any(name in os.environ for name in GLIBC_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: their allocator stays as it is
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
