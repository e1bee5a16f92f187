"""Helpers for tests that run robolearn's nodes as processes: stop one politely, then firmly."""

import signal
import subprocess


def stop_node(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
    """Send `sig`, wait up to `timeout` s, then kill; the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
