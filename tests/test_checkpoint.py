"""Checkpoint files on their own: kills inside a save, checksums, and where latest.json may point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from robolearn import checkpoint
from robolearn.checkpoint import CheckpointError, load_checkpoint, resolve

# For kill_at = 1, 2, ... until a re-save completes, a child forked from one Python that imported torch once (a new
# interpreter per kill would pay the import each time): it saves step 5 (zeros) under ROOT/kill<kill_at>, then saves step
# 5 again (ones), SIGKILLing itself just before the kill_at-th file-system change (rename, replace, tree removal) of the
# second save. One line per child: kill_at and its exit status (-9 when killed).
RESAVE = r"""
import os, shutil, signal, sys, traceback
import torch
from robolearn import checkpoint

def resave(root, kill_at):
    checkpoint.save_checkpoint(root, 5, {"w": torch.zeros(3)}, {"agent": "test"}, {"step": 5})
    calls = 0

    def deadly(fn):
        def wrapped(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapped

    os.replace, os.rename, shutil.rmtree = deadly(os.replace), deadly(os.rename), deadly(shutil.rmtree)
    checkpoint.save_checkpoint(root, 5, {"w": torch.ones(3)}, {"agent": "test"}, {"step": 5})

for kill_at in range(1, int(sys.argv[2]) + 1):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            resave(os.path.join(sys.argv[1], f"kill{kill_at}"), kill_at)
            code = 0
        except BaseException:
            traceback.print_exc()  # then exit status 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print(kill_at, status, flush=True)
    if status != -9:
        break
"""


def test_a_kill_at_any_point_of_a_resave_leaves_latest_loadable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", RESAVE, str(tmp_path), "39"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    children = [tuple(map(int, line.split())) for line in proc.stdout.splitlines()]
    assert children and children[-1][1] == 0, (children, proc.stderr[-2000:])  # the re-save completed
    for kill_at, status in children:
        assert status in (0, -9), (kill_at, status)
        _, weights, _, state = load_checkpoint(tmp_path / f"kill{kill_at}")  # latest.json: a complete checkpoint
        assert state["step"] == 5
        assert torch.equal(weights["w"], torch.zeros(3)) or torch.equal(weights["w"], torch.ones(3))
    assert torch.equal(weights["w"], torch.ones(3))  # the completed one holds the re-save
    assert len(children) - 1 >= 3  # the kill landed inside the save several times


def _save(root, step, value=0.0):
    return checkpoint.save_checkpoint(root, step, {"w": torch.full((3,), value)}, {"agent": "test"}, {"step": step})


def _damage(ckpt):
    path = ckpt / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the tensor data: still a valid safetensors file
    path.write_bytes(bytes(data))


def test_weights_are_verified_against_their_checksum(tmp_path):
    ckpt = _save(tmp_path, 1)
    assert len(json.loads((ckpt / "config.json").read_text())["weights_sha256"]) == 64
    load_checkpoint(tmp_path)
    _damage(ckpt)
    with pytest.raises(checkpoint.CheckpointDamaged, match="checksum"):
        load_checkpoint(tmp_path)


def test_last_good_skips_a_checkpoint_whose_weights_fail_to_load(tmp_path):
    first = _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    assert checkpoint.last_good(tmp_path) == newest
    _damage(newest)
    assert checkpoint.last_good(tmp_path) == first
    ckpt, _, _, state, skipped = checkpoint.load_newest_good(tmp_path)
    assert ckpt == first and state["step"] == 1 and len(skipped) == 1 and newest.name in skipped[0]
    _damage(first)
    assert checkpoint.last_good(tmp_path) is None
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        checkpoint.load_newest_good(tmp_path)


@pytest.mark.parametrize("target", ["../elsewhere/step_000000000001", "/tmp", "..", "step_000000000001/../../x"])
def test_latest_json_may_not_leave_its_run_directory(tmp_path, target):
    _save(tmp_path / "elsewhere", 1)
    root = tmp_path / "run" / "checkpoints"
    _save(root, 1)
    (root / "latest.json").write_text(json.dumps({"path": target, "step": 1}))
    with pytest.raises(CheckpointError, match="outside"):
        resolve(tmp_path / "run")


def test_saving_a_step_again_replaces_it_without_growing_the_folder(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2, 0.0)
    _save(tmp_path, 2, 1.0)
    _, weights, _, state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and torch.equal(weights["w"], torch.ones(3))
    kept = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(kept) == 2 and kept[0] == "step_000000000001"
