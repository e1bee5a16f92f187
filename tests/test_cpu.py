"""robolearn.cpu: the malloc setting that `robolearn train` applies, and the busy-core sampler."""

import os
import subprocess
import sys
import time

import pytest

# Allocates, touches and frees a 64 MB block, then does it again, and prints the minor page
# faults of the second round: with glibc's default the block went back to the kernel on free and
# every page faults in again; with freed memory kept, the second round reuses resident pages.
PROBE = """
import ctypes, resource, sys
from robolearn.cpu import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
def round_trip():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_reuse_freed_memory_stops_large_blocks_faulting_in_again():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, "GLIBC_TUNABLES": ""}).stdout.split()
        return out[0], int(out[1])

    _, default_faults = faults("default")
    applied, reuse_faults = faults("reuse")
    assert applied == "True"
    # Transparent huge pages can serve part of the block 2 MB at a time, so compare the two runs
    # rather than counting 4 KB pages.
    assert default_faults > 500, f"glibc default should fault the freed block in again: {default_faults} faults"
    assert reuse_faults * 10 < default_faults, f"kept memory should be reused: {reuse_faults} faults " \
                                               f"against {default_faults} with glibc's default"


def test_busy_cores_is_a_share_of_the_machine():
    from robolearn.cpu import busy_cores

    busy = busy_cores(0.2)
    if busy is None:
        pytest.skip("no /proc/stat on this system: busy_cores has nothing to read")
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6


@pytest.mark.serial
def test_thread_governor_gives_torch_the_cores_others_leave_free():
    """Two samples half a second apart: with every core taken by another process torch gets one thread,
    and the count comes back up when they stop (a spinning OpenMP worker on a taken core stalls)."""
    from robolearn.cpu import ThreadGovernor

    cores = os.cpu_count() or 1
    if cores < 2:
        pytest.skip("one core: the governor always chooses 1 thread")
    chosen = []
    governor = ThreadGovernor(every=0.5, set_threads=chosen.append)

    def sample():
        governor._last = None  # a fresh pair of samples over the next half second
        governor.check()
        time.sleep(0.6)
        return governor.check()

    if max(sample() for _ in range(2)) < 2:
        pytest.skip("another process keeps the cores busy before the test starts, so 1 thread is the right "
                    "answer throughout and the test cannot see the count come back up")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.5)
        assert sample() == 1
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    time.sleep(0.5)
    after = [sample() for _ in range(3)]  # three tries: a passing blip of load elsewhere is not the hogs
    assert max(after) >= 2 and chosen[-1] == governor.threads, after  # torch was told each change
