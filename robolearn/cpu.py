"""CPU process settings for training and benchmarks. Imports nothing heavy (no torch), so a
caller can apply them before torch starts its thread pool.

- `reuse_freed_memory()`: glibc's malloc returns blocks of 32 MB and more to the kernel on free
  (mmap/munmap) and trims the heap top, so every update page-faults its activations and
  gradients back in. Telling it to keep freed memory (no mmap, no trimming) makes the next
  update reuse the same pages: on the 2-core dev VM the reference-style DrQ-v2 update went from
  1.88 s to 1.04 s (system time over 12 updates: 15.3 s to 1.4 s). The process's resident
  memory then stays at its peak rather than shrinking between updates.
- `busy_cores()`: how many cores other processes keep busy right now, from /proc/stat, for
  choosing OpenMP's wait policy (spinning threads win on an idle machine and lose badly on a
  shared one).
- `ThreadGovernor`: torch's thread count re-chosen during a run from the cores other processes
  leave free, so training keeps its idle speed on an idle machine and degrades in proportion
  when cores are taken (`robolearn train` uses it unless `--threads` is given).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def reuse_freed_memory() -> bool:
    """Keep freed heap memory for reuse (glibc: no mmap'd blocks, no trimming). True when applied;
    False where the C library is not glibc (nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies over all cores since boot, or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_cores(seconds: float = 0.5, cores: int | None = None) -> float | None:
    """Cores' worth of CPU time used by everything on the machine over the next `seconds` (this
    process included: call it before starting work). None where /proc/stat is missing."""
    a = _cpu_ticks()
    time.sleep(seconds)
    b = _cpu_ticks()
    if a is None or b is None or b[1] <= a[1]:
        return None
    cores = cores or os.cpu_count() or 1
    return cores * (b[0] - a[0]) / (b[1] - a[1])


class ThreadGovernor:
    """Re-chooses torch's CPU thread count as the machine's load changes, every `every` seconds.

    OpenMP workers spin while they wait for work: on an idle machine that is the fastest choice,
    but a worker whose core another process takes stalls every parallel region (make demo's
    training ran 3.2x slower with one of two cores taken, 9-14x at load 4-6). So the governor
    gives torch the cores no other process is using (at least 1, at most `max_threads`), measured
    from /proc/stat less this process's own CPU time, and checks again as the load changes.
    """

    def __init__(self, max_threads: int | None = None, every: float = 2.0, set_threads=None):
        self.cores = os.cpu_count() or 1
        self.max_threads, self.every = max(1, max_threads or self.cores), every
        self.threads: int | None = None
        self._set = set_threads
        self._last: tuple[float, float, tuple[int, int]] | None = None

    def check(self) -> int | None:
        """Cheap between checks; returns the thread count after a check, else None."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.every:
            return None
        ticks, own = _cpu_ticks(), time.process_time()
        last, self._last = self._last, (now, own, ticks) if ticks is not None else None
        if last is None or ticks is None or ticks[1] <= last[2][1]:
            return None
        machine = self.cores * (ticks[0] - last[2][0]) / (ticks[1] - last[2][1])
        others = max(0.0, machine - (own - last[1]) / (now - last[0]))
        threads = max(1, min(self.max_threads, round(self.cores - others)))
        if threads != self.threads:
            if self._set is None:
                import torch
                self._set = torch.set_num_threads
            self._set(threads)
            self.threads = threads
        return threads


__all__ = ["ThreadGovernor", "busy_cores", "reuse_freed_memory"]
