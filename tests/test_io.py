"""epg.io: atomic writes leave the old file or the new one, never half a file; device choice; seed hashing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from epg import io


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "sub" / "a.json"
    io.write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    with pytest.raises(RuntimeError), io.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # no temporary left


def test_bytes_text_and_torch_writes(tmp_path):
    io.write_bytes(tmp_path / "b", b"\x00\x01", fsync=True)
    io.write_text(tmp_path / "t", "héllo")
    io.save_torch({"w": torch.arange(3)}, tmp_path / "m.pt", fsync=True)
    assert (tmp_path / "b").read_bytes() == b"\x00\x01" and (tmp_path / "t").read_text("utf-8") == "héllo"
    assert torch.equal(torch.load(tmp_path / "m.pt")["w"], torch.arange(3))


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError), io.atomic_folder(target) as tmp:
        (tmp / "1.png").write_bytes(b"x")
        raise ValueError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with io.atomic_folder(target) as tmp:
        (tmp / "1.png").write_bytes(b"x")
    assert [p.name for p in target.iterdir()] == ["1.png"]


def test_pick_device(monkeypatch):
    assert io.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert io.pick_device() == torch.device("cpu") and io.pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA"):
        io.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert io.pick_device(None) == torch.device("cuda")


def test_seeds_are_the_seedsequence_hash():
    assert io.seed_from(1, 2, 3) == int(np.random.SeedSequence([1, 2, 3]).generate_state(1, np.uint64)[0]) >> 1
    assert io.seed_from(-1) == io.seed_from(2**64 - 1) and 0 <= io.seed_from(5) < 2**63
    assert list(io.seed_words(7, 9, count=3)) == list(np.random.SeedSequence([7, 9]).generate_state(3))
    assert io.seed_from(1, 2) != io.seed_from(2, 1)


def test_save_torch_removes_what_killed_writers_left(tmp_path):
    """A SIGKILLed writer leaves .NAME.tmp-PID behind; the next save of NAME removes it unless its process lives."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    target = tmp_path / "last.ckpt"
    stale, alive = tmp_path / f".last.ckpt.tmp-{dead_pid}", tmp_path / f".last.ckpt.tmp-{os.getppid()}"
    other = tmp_path / f".other.ckpt.tmp-{dead_pid}"
    for f in (stale, alive, other):
        f.write_bytes(b"half a checkpoint")
    io.save_torch({"step": 1}, target)
    assert torch.load(target)["step"] == 1
    assert not stale.exists() and alive.exists() and other.exists()  # only this target's, only dead writers'
