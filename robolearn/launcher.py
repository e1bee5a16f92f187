"""Runs the nodes of a launch file as child processes: prefixed output, log files, orderly shutdown."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

from robolearn.launch_xml import LaunchError, NodeSpec, find_launch_file, load, parse_arguments

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


DOMAIN_IDS_VAR = "ROBOLEARN_DOMAIN_IDS"
DOMAIN_IDS = range(20, 102)  # above 101 a domain's DDS ports fall in Linux's ephemeral port range


def random_domain() -> int:
    """A random ROS domain ID for a test's or benchmark's processes: from DOMAIN_IDS (20-101), or from the range
    "LO-HI" in $ROBOLEARN_DOMAIN_IDS (tests/conftest.py gives each parallel pytest worker its own range, so that two
    workers' graphs never meet). A malformed value is an error naming the variable."""
    import random
    text = os.environ.get(DOMAIN_IDS_VAR, f"{DOMAIN_IDS[0]}-{DOMAIN_IDS[-1]}")
    lo, _, hi = text.partition("-")
    if not (lo.isdigit() and hi.isdigit() and 0 <= int(lo) <= int(hi) <= 232):
        raise ValueError(f"{DOMAIN_IDS_VAR} must be a range LO-HI of ROS domain IDs within 0-232, got {text!r}")
    return random.randint(int(lo), int(hi))


def isolated_env(base: dict | None = None) -> dict:
    """A copy of the environment with DDS kept on loopback in a random domain (tests, benchmarks;
    random_domain). Here, not in robolearn.ros, so that code without the ROS extra can start processes by the same rule."""
    env = dict(os.environ if base is None else base)
    env.update(ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_LOCALHOST_ONLY="1", ROS_DOMAIN_ID=str(random_domain()))
    return env


@dataclass(eq=False)
class _Running:
    spec: NodeSpec
    popen: subprocess.Popen
    threads: list[threading.Thread] = field(default_factory=list)


def default_log_dir() -> Path:
    """A fresh folder under ROS 2's log directory (ROS_LOG_DIR, else ROS_HOME/log, else ~/.ros/log)."""
    base = os.environ.get("ROS_LOG_DIR") or Path(os.environ.get("ROS_HOME", Path.home() / ".ros")) / "log"
    return Path(base) / f"robolearn-launch-{time.strftime('%Y-%m-%d-%H-%M-%S')}-{os.getpid()}"


class _Output:
    """Line-prefixed node output on the screen and in log files, one writer at a time."""

    def __init__(self, log_dir: Path | None):
        self.lock, self.log_dir, self.files = threading.Lock(), log_dir, {}

    def say(self, text: str) -> None:
        with self.lock:
            print(f"[launch] {text}", file=sys.stderr, flush=True)

    def sinks(self, spec: NodeSpec, screen: IO[str] | None) -> list[Callable[[str], None]]:
        out = []
        if screen is not None:
            out.append(lambda line: print(f"[{spec.label}] {line}", file=screen, flush=True))
        if spec.output in ("log", "both"):
            if spec.label not in self.files:
                path = self.log_dir / f"{spec.label}.log"
                self.files[spec.label] = path.open("a", encoding="utf-8")
                self.say(f"{spec.label}: output in {path}")
            log = self.files[spec.label]
            out.append(lambda line: (log.write(line + "\n"), log.flush()))
        return out

    def pump(self, stream: IO[bytes], sinks: list[Callable[[str], None]]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            with self.lock:
                for sink in sinks:
                    sink(line)
        stream.close()

    def close(self) -> None:
        for log in self.files.values():
            log.close()


def _start(spec: NodeSpec, output: _Output) -> _Running:
    env = dict(spec.env)
    env.setdefault("PYTHONUNBUFFERED", "1")  # a Python node's prints show as they happen, not at exit
    try:
        # Own process group: a terminal's Ctrl-C reaches only the launcher, which stops the nodes
        # in order, and a signal to the group also reaches whatever a node started itself.
        popen = subprocess.Popen(spec.cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, process_group=0)
    except OSError as err:
        raise LaunchError(f"{spec.where}: cannot start {spec.label} ({shlex.join(spec.cmd)}): {err}") from None
    running = _Running(spec, popen)
    screen_out = sys.stdout if spec.output in ("screen", "both") else None  # stderr is always shown, as ROS 2
    for stream, sinks in ((popen.stdout, output.sinks(spec, screen_out)),
                          (popen.stderr, output.sinks(spec, sys.stderr))):
        thread = threading.Thread(target=output.pump, args=(stream, sinks), daemon=True)
        thread.start()
        running.threads.append(thread)
    output.say(f"{spec.label}: started with pid {popen.pid}")
    return running


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128+N, as a shell says


def _supervise(nodes: list[NodeSpec], started: list[_Running], signals: list[int], output: _Output) -> int:
    """Runs until a signal, an on_exit="shutdown" node exits, or every node has exited."""
    for spec in nodes:
        started.append(_start(spec, output))
    live = list(started)
    respawns: list[tuple[float, NodeSpec]] = []
    status = 0
    while True:
        if signals:
            output.say(f"{signal.Signals(signals[0]).name}: stopping every node")
            return 128 + signals[0]
        now = time.monotonic()
        for _, spec in [r for r in respawns if r[0] <= now]:
            live.append(_start(spec, output))
            started.append(live[-1])
        respawns = [r for r in respawns if r[0] > now]
        for running in [r for r in live if r.popen.poll() is not None]:
            live.remove(running)
            code, spec = _exit_code(running.popen.returncode), running.spec
            output.say(f"{spec.label}: exited with code {code}"
                       + (f", respawning in {spec.respawn_delay:g} s" if spec.respawn else ""))
            if spec.shutdown_on_exit:
                output.say(f"{spec.label} has on_exit=\"shutdown\": stopping every node")
                return code
            if spec.respawn:
                respawns.append((now + spec.respawn_delay, spec))
            status = status or code
        if not live and not respawns:
            return status
        time.sleep(0.05)


def _group_alive(running: _Running) -> bool:
    running.popen.poll()  # reap the node itself once it exits; its group may live on in its children
    try:
        os.killpg(running.popen.pid, 0)
        return True
    except (ProcessLookupError, PermissionError):  # PermissionError: the id now names someone else's group
        return False


def _stop(started: list[_Running], signals: list[int], output: _Output) -> None:
    """SIGINT to every node's group in reverse start order, then SIGTERM and SIGKILL after each node's timeouts."""
    begin, sent, seen = time.monotonic(), {}, len(signals)
    while alive := [r for r in reversed(started) if _group_alive(r)]:
        elapsed = time.monotonic() - begin
        for running in alive:
            spec = running.spec
            phase = sum(elapsed >= t for t in (spec.sigterm_timeout, spec.sigterm_timeout + spec.sigkill_timeout))
            phase = max(phase, min(2, len(signals) - seen))  # each further Ctrl-C escalates one step
            if sent.get(running, -1) < phase:
                sent[running] = phase
                if phase:
                    output.say(f"{spec.label}: still running, sending {_STOP_SIGNALS[phase].name}")
                try:
                    os.killpg(running.popen.pid, _STOP_SIGNALS[phase])
                except ProcessLookupError:
                    pass
        if all(sent.get(r) == 2 for r in alive) and elapsed > max(s.spec.sigterm_timeout + s.spec.sigkill_timeout
                                                                  for s in alive) + 5:
            output.say(f"could not stop pids {[r.popen.pid for r in alive]} even with SIGKILL")
            return
        time.sleep(0.05)


def run(nodes: list[NodeSpec], log_dir: Path | None = None) -> int:
    """Start `nodes` in order and supervise them; the exit status (see docs/launch.md)."""
    if any(spec.output != "screen" for spec in nodes):
        log_dir = log_dir or default_log_dir()
        log_dir.mkdir(parents=True, exist_ok=True)
    output, signals, started = _Output(log_dir), [], []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda signum, frame: signals.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _supervise(nodes, started, signals, output)
    finally:
        _stop(started, signals, output)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for running in started:
            for thread in running.threads:
                thread.join(timeout=2)
        output.close()


def launch(words: list[str], print_only: bool = False, log_dir: Path | None = None) -> int:
    """`robolearn launch FILE|PKG FILE [name:=value ...]`."""
    path, rest = find_launch_file(words)
    nodes = load(path, parse_arguments(rest))
    if print_only:
        for spec in nodes:
            print(f"[{spec.label}] {shlex.join(spec.cmd)}")
        return 0
    if not nodes:
        print(f"{path} starts no node")
        return 0
    return run(nodes, log_dir)
