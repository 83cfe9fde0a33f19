"""The embedded MNIST demo shards: split, shuffling, idempotence."""

import io
import json
import shutil
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from epg.data.demo import prepare_demo


def _labels_and_keys(shard):
    labels, keys = [], []
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".cls"):
                labels.append(int(tar.extractfile(member).read()))
                keys.append(member.name.split(".")[0])
            else:
                image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                assert image.size == (32, 32) and image.mode == "RGB"
    return labels, keys


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    info = prepare_demo(out)
    assert time.perf_counter() - start < 10
    return out, info


def test_layout_and_metadata(demo):
    out, info = demo
    assert info["train_shards"] == str(out / "train" / "train-{000000..000004}.tar")
    assert info["val_shards"] == str(out / "val" / "val-{000000..000001}.tar")
    assert info["train"]["num_samples"] == 4500 and info["val"]["num_samples"] == 500
    classes = json.loads((out / "train" / "classes.json").read_text())
    assert classes["classes"] == {str(d): d for d in range(10)} and classes["names"]["7"] == "seven"


def test_stratified_split_and_shuffled_shards(demo):
    out, _ = demo
    per_split = {}
    for split, expected in (("train", 450), ("val", 50)):
        labels, keys = [], []
        for shard in sorted((out / split).glob("*.tar")):
            shard_labels, shard_keys = _labels_and_keys(shard)
            assert len(set(shard_labels)) == 10  # every shard mixes all classes
            labels += shard_labels
            keys += shard_keys
        assert np.bincount(labels).tolist() == [expected] * 10
        assert labels != sorted(labels)
        first = labels[:50]
        assert len(set(first)) >= 8  # not class-sorted (the source file is)
        per_split[split] = set(keys)
    assert len(per_split["train"]) == 4500 and not per_split["train"] & per_split["val"]


def test_idempotent(demo):
    out, info = demo
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    start = time.perf_counter()
    again = prepare_demo(out)
    assert time.perf_counter() - start < 1.0
    assert again["train"] == info["train"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == stamps


def test_epg_prepare_demo_command(demo, capsys):
    from epg.cli import main

    out, info = demo
    assert main(["prepare", "demo", str(out)]) == 0
    assert info["train_shards"] in capsys.readouterr().out


def test_verify_names_damage_and_prepare_demo_repairs_it(demo, tmp_path, capsys):
    from epg.cli import main
    from epg.data.shards import file_sha256
    from tests.test_data_prepare import flip, truncate

    root = tmp_path / "demo"
    shutil.copytree(demo[0], root)
    assert main(["prepare", "--verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train: 5 shards intact, 4,500 samples decode" in out and "val: 2 shards intact, 500 samples decode" in out
    shards = sorted((root / "train").glob("*.tar"))
    original = {p: file_sha256(p) for p in shards}
    truncate(shards[1])
    flip(shards[3], 30_000)  # the header of the 6th sample
    assert main(["prepare", "--verify", str(root)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"{shards[1]}: truncated to 2,309,120 of 4,618,240 bytes; tar stream ends without the end-of-archive "
        "marker after 451 samples; 449 of 900 samples lost"
    )
    assert lines[1].startswith(f"{shards[3]}: contents differ from the record (sha256); tar stream has a damaged")
    assert lines[1].endswith("895 of 900 samples lost")
    assert lines[2] == f"{root / 'train'}: 2 of 5 shards damaged, 1,344 samples lost; repair: epg prepare demo {root}"

    assert main(["prepare", "demo", str(root)]) == 0
    assert capsys.readouterr().err.count(": rewritten") == 2
    assert {p: file_sha256(p) for p in shards} == original
    assert main(["prepare", "--verify", str(root)]) == 0
