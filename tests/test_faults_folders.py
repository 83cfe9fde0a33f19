"""Atomic sharded checkpoint folders: epg.io's swap_in_folder and recover_interrupted_swap, AtomicModelParallelStrategy.

In-process, without a process group; the 2-rank FSDP2 save over an existing ``last.ckpt/`` is in tests/test_scale.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

import epg.io
from epg.checkpoint import read_checkpoint
from epg.io import atomic_folder, recover_interrupted_swap, swap_in_folder, swap_names
from epg.lightning.faults import AtomicModelParallelStrategy
from epg.lightning.resume import last_checkpoint


def make_folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


class Killed(BaseException):
    """The process dying (SIGKILL, power loss) at that point."""


def contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def siblings(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_hidden_names_never_match_the_last_checkpoint_search(tmp_path):
    tmp, old = swap_names(tmp_path / "last.ckpt")
    assert (tmp.name, old.name) == (".last.ckpt.tmp", ".last.ckpt.old")
    assert tmp.parent == old.parent == tmp_path
    for name in (tmp.name, old.name):  # a shell/pathlib glob of last*.ckpt
        assert not (name.startswith("last") and name.endswith(".ckpt"))
    make_folder(tmp)
    make_folder(old)
    assert list(tmp_path.glob("last*.ckpt")) == [] and list(tmp_path.glob("*.ckpt")) == []


def test_swap_replaces_a_folder_whole(tmp_path):
    path = make_folder(tmp_path / "last.ckpt", **{"__0_0.distcp": "old0", "__1_0.distcp": "old1", "meta.pt": "old"})
    tmp = make_folder(swap_names(path)[0], **{"__0_0.distcp": "new0", "meta.pt": "new"})
    swap_in_folder(tmp, path)
    assert contents(path) == {"__0_0.distcp": "new0", "meta.pt": "new"}  # no shard of the old save is left
    assert siblings(tmp_path) == ["last.ckpt"]


@pytest.mark.parametrize("before", ["missing", "file", "link"])
def test_swap_replaces_a_file_a_link_or_nothing(tmp_path, before):
    path = tmp_path / "last.ckpt"
    if before == "file":  # a full (single-file) checkpoint saved earlier under the same name
        path.write_text("full")
    elif before == "link":  # ModelCheckpoint(save_last="link")
        target = make_folder(tmp_path / "epoch=0-step=1.ckpt", **{"meta.pt": "target"})
        path.symlink_to(target)
    swap_in_folder(make_folder(swap_names(path)[0], **{"meta.pt": "new"}), path)
    assert path.is_dir() and not path.is_symlink() and contents(path) == {"meta.pt": "new"}
    assert ".last.ckpt.old" not in siblings(tmp_path) and ".last.ckpt.tmp" not in siblings(tmp_path)
    if before == "link":
        assert contents(tmp_path / "epoch=0-step=1.ckpt") == {"meta.pt": "target"}  # only the link went


def test_crash_between_the_renames_is_recovered(tmp_path, monkeypatch):
    path = make_folder(tmp_path / "last.ckpt", **{"meta.pt": "old"})
    tmp = make_folder(swap_names(path)[0], **{"meta.pt": "new"})
    rename = os.rename

    def killed_after_first_rename(src, dst):
        if Path(src) == tmp:
            raise Killed  # the process dies before the second rename
        rename(src, dst)

    monkeypatch.setattr(epg.io.os, "rename", killed_after_first_rename)
    with pytest.raises(Killed):
        swap_in_folder(tmp, path)
    monkeypatch.undo()
    assert not path.exists() and siblings(tmp_path) == [".last.ckpt.old", ".last.ckpt.tmp"]
    assert contents(tmp_path / ".last.ckpt.old") == {"meta.pt": "old"}  # the old folder is complete, only renamed
    assert recover_interrupted_swap(path, cleanup=False)  # a reader: renames back, leaves the .tmp alone
    assert contents(path) == {"meta.pt": "old"} and siblings(tmp_path) == [".last.ckpt.tmp", "last.ckpt"]
    assert not recover_interrupted_swap(path)  # nothing to rename; cleanup deletes the half-done .tmp
    assert siblings(tmp_path) == ["last.ckpt"]


def test_a_new_save_after_an_unrecovered_crash_still_swaps(tmp_path):
    path = tmp_path / "last.ckpt"
    make_folder(swap_names(path)[1], **{"meta.pt": "old"})  # crashed between the renames, never recovered
    swap_in_folder(make_folder(swap_names(path)[0], **{"meta.pt": "new"}), path)
    assert contents(path) == {"meta.pt": "new"} and siblings(tmp_path) == ["last.ckpt"]


def test_stale_old_next_to_a_complete_folder_is_removed(tmp_path):
    """A crash after the second rename leaves the new folder in place and the old one as ``.old``."""
    path = make_folder(tmp_path / "last.ckpt", **{"meta.pt": "new"})
    make_folder(swap_names(path)[1], **{"meta.pt": "old"})
    assert not recover_interrupted_swap(path, cleanup=False)  # a reader changes nothing
    assert siblings(tmp_path) == [".last.ckpt.old", "last.ckpt"]
    swap_in_folder(make_folder(swap_names(path)[0], **{"meta.pt": "newer"}), path)  # the next save copes
    assert contents(path) == {"meta.pt": "newer"} and siblings(tmp_path) == ["last.ckpt"]
    make_folder(swap_names(path)[1], **{"meta.pt": "old"})
    assert not recover_interrupted_swap(path)  # before training: cleaned up
    assert contents(path) == {"meta.pt": "newer"} and siblings(tmp_path) == ["last.ckpt"]


def test_swap_retries_when_a_reader_renames_the_old_folder_back(tmp_path, monkeypatch):
    path = make_folder(tmp_path / "last.ckpt", **{"meta.pt": "old"})
    tmp = make_folder(swap_names(path)[0], **{"meta.pt": "new"})
    rename, raced = os.rename, []

    def reader_between_the_renames(src, dst):
        if Path(src) == tmp and not raced:
            raced.append(recover_interrupted_swap(path, cleanup=False))
        rename(src, dst)

    monkeypatch.setattr(epg.io.os, "rename", reader_between_the_renames)
    swap_in_folder(tmp, path)
    assert raced == [True] and contents(path) == {"meta.pt": "new"} and siblings(tmp_path) == ["last.ckpt"]


def test_atomic_folder_swaps_through_the_old_twin(tmp_path, monkeypatch):
    """epg.io.atomic_folder replaces a folder like the checkpoint swap: a crash between the renames is recovered."""
    path = make_folder(tmp_path / "samples", **{"a.png": "old"})
    with atomic_folder(path) as tmp:
        (tmp / "b.png").write_text("new")
    assert contents(path) == {"b.png": "new"} and siblings(tmp_path) == ["samples"]
    rename = os.rename

    def killed_before_second_rename(src, dst):
        if Path(dst) == path:
            raise Killed
        rename(src, dst)

    monkeypatch.setattr(epg.io.os, "rename", killed_before_second_rename)
    with pytest.raises(Killed), atomic_folder(path) as tmp:
        (tmp / "c.png").write_text("newer")
    monkeypatch.undo()
    assert siblings(tmp_path) == [".samples.old"]  # the half-done new folder is gone, the old one only renamed
    assert recover_interrupted_swap(path) and contents(path) == {"b.png": "new"} and siblings(tmp_path) == ["samples"]


def test_read_checkpoint_renames_back_an_interrupted_swap(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 7}, swap_names(path)[1])  # any checkpoint, here a file, left under .old
    make_folder(swap_names(path)[0], **{"__0_0.distcp": "half"})
    assert read_checkpoint(path)["global_step"] == 7
    assert siblings(tmp_path) == [".last.ckpt.tmp", "last.ckpt"]  # a reader never deletes a save in progress
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_last_checkpoint_search_recovers_last_then_resumes_from_it(tmp_path):
    folder = tmp_path / "ckpts"
    make_folder(swap_names(folder / "last.ckpt")[1], **{"meta.pt": "old"})
    make_folder(swap_names(folder / "last.ckpt")[0], **{"meta.pt": "half"})
    assert last_checkpoint(str(folder)) == str(folder / "last.ckpt")
    assert siblings(folder) == ["last.ckpt"] and contents(folder / "last.ckpt") == {"meta.pt": "old"}
    # Only a half-written .tmp (killed during the very first save): nothing to resume from.
    other = tmp_path / "other"
    make_folder(swap_names(other / "last.ckpt")[0], **{"meta.pt": "half"})
    assert last_checkpoint(str(other)) is None and siblings(other) == []


# ---- the strategy, with the parent's sharded save replaced by a fake ---------------------------------------------
def fake_sharded_save(fail_after: int | None = None):
    """Stand-in for ModelParallelStrategy.save_checkpoint: writes 2 shards and meta.pt, or fails half-way."""
    calls = []

    def save(self, checkpoint, filepath, storage_options=None):
        calls.append(Path(filepath))
        folder = Path(filepath)
        folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(["__0_0.distcp", "__1_0.distcp", "meta.pt"]):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("killed while writing shards")
            (folder / name).write_text(f"{checkpoint['step']}")

    return save, calls


def test_strategy_swaps_a_complete_sharded_save_in(tmp_path, monkeypatch):
    save, calls = fake_sharded_save()
    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", save)
    strategy = AtomicModelParallelStrategy()
    path = tmp_path / "ckpts" / "last.ckpt"
    strategy.save_checkpoint({"step": 1}, path)
    (path / "__7_0.distcp").write_text("stale shard")  # e.g. from an earlier save with more ranks
    strategy.save_checkpoint({"step": 2}, str(path))
    assert calls == [swap_names(path)[0]] * 2  # the parent only ever writes the hidden temp folder
    assert contents(path) == {"__0_0.distcp": "2", "__1_0.distcp": "2", "meta.pt": "2"}
    assert siblings(path.parent) == ["last.ckpt"]


def test_strategy_failure_while_writing_leaves_the_old_folder_untouched(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    strategy = AtomicModelParallelStrategy()
    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", fake_sharded_save()[0])
    strategy.save_checkpoint({"step": 1}, path)
    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", fake_sharded_save(fail_after=1)[0])
    with pytest.raises(RuntimeError, match="killed"):
        strategy.save_checkpoint({"step": 2}, path)
    assert contents(path) == {"__0_0.distcp": "1", "__1_0.distcp": "1", "meta.pt": "1"}
    assert contents(tmp_path / ".last.ckpt.tmp") == {"__0_0.distcp": "2"}  # the half-written save, hidden
    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", fake_sharded_save()[0])
    strategy.save_checkpoint({"step": 3}, path)  # the next save starts from a fresh temp folder
    assert contents(path) == {"__0_0.distcp": "3", "__1_0.distcp": "3", "meta.pt": "3"}
    assert siblings(tmp_path) == ["last.ckpt"]


def test_strategy_full_checkpoints_keep_the_parent_save(tmp_path, monkeypatch):
    save, calls = fake_sharded_save()
    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", save)
    strategy = AtomicModelParallelStrategy(save_distributed_checkpoint=False)
    strategy.save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert calls == [tmp_path / "last.ckpt"]  # straight to the parent (it saves one file via the CheckpointIO)
