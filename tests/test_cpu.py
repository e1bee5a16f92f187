"""robolearn.cpu: the malloc setting that `robolearn train` applies, and the busy-core sampler."""

import os
import subprocess
import sys

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
