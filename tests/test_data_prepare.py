"""`epg prepare`: layouts, metadata, resume, corrupt files and argument errors."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from epg.commands.prepare import main
from epg.data import prepare as prep
from epg.data.shards import file_sha256

SIZES = [(40, 30), (30, 50), (16, 16), (23, 17)]


def _image(path, size, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _tree(root, classes=("n02", "n01", "n03"), per_class=4):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _image(root / name / f"{name}_{i}.png", SIZES[i % len(SIZES)], seed=10 * c + i)
    return root


def _read(shard):
    samples = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _all_samples(out):
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        samples.update(_read(shard))
    return samples


def test_image_folder_tree(tmp_path, capsys):
    src = _tree(tmp_path / "src")
    out = tmp_path / "out"
    assert main([str(src), str(out), "--resolution", "16", "--shard-size", "5", "--workers", "1"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"] == {"n01": 0, "n02": 1, "n03": 2}
    info = json.loads((out / "dataset.json").read_text())
    assert info["num_samples"] == 12 and info["resolution"] == 16 and info["format"] == "png"
    assert info["class_counts"] == {"n01": 4, "n02": 4, "n03": 4}
    assert info["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    samples = _all_samples(out)
    assert len(samples) == 12
    for key, sample in samples.items():
        assert Image.open(io.BytesIO(sample["png"])).size == (16, 16)
        assert int(sample["cls"]) == {"n01": 0, "n02": 1, "n03": 2}[key.split("_")[0]]
    assert "12 samples in 3 shards" in capsys.readouterr().out


def test_val_layout_with_loc_csv_and_text_labels(tmp_path):
    src = tmp_path / "val"
    src.mkdir()
    truth = {"ILSVRC2012_val_00000001": "n09", "ILSVRC2012_val_00000002": "n01", "ILSVRC2012_val_00000003": "n05"}
    for i, name in enumerate(truth):
        _image(src / f"{name}.JPEG", (24, 20), seed=i)
    csv = tmp_path / "LOC_val_solution.csv"
    rows = [f"{k},{v} 1 2 3 4 {v} 5 6 7 8" for k, v in truth.items()]
    csv.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    names = tmp_path / "names.txt"
    names.write_text("n01 tench, Tinca tinca\nn05 goldfish\nn09 shark\n")
    out = tmp_path / "out"
    args = [str(src), str(out), "--split", "val", "--labels", str(csv), "--resolution", "8", "--names", str(names)]
    assert main([*args, "--format", "jpg"]) == 0
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"] == {"n01": 0, "n05": 1, "n09": 2} and classes["names"]["n01"] == "tench, Tinca tinca"
    samples = _all_samples(out)
    assert {k: int(s["cls"]) for k, s in samples.items()} == {
        "ILSVRC2012_val_00000001": 2,
        "ILSVRC2012_val_00000002": 0,
        "ILSVRC2012_val_00000003": 1,
    }
    assert all("jpg" in s for s in samples.values()) and (out / "val-000000.tar").is_file()

    text = tmp_path / "labels.txt"
    text.write_text("".join(f"{k}.JPEG {v}\n" for k, v in truth.items()))
    out2 = tmp_path / "out2"
    assert (
        main(
            [
                str(src),
                str(out2),
                "--split",
                "val",
                "--labels",
                str(text),
                "--resolution",
                "8",
                "--classes",
                str(out / "classes.json"),
            ]
        )
        == 0
    )
    assert {k: int(s["cls"]) for k, s in _all_samples(out2).items()} == {k: int(s["cls"]) for k, s in samples.items()}

    out3 = tmp_path / "out3"  # LOC_val_solution.csv is found next to (above) the val folder
    assert main([str(src), str(out3), "--split", "val", "--resolution", "8"]) == 0
    assert {k: int(s["cls"]) for k, s in _all_samples(out3).items()} == {k: int(s["cls"]) for k, s in samples.items()}


def test_corrupt_image_is_skipped_and_counted(tmp_path, capsys):
    src = _tree(tmp_path / "src", per_class=2)
    bad = src / "n01" / "n01_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    out = tmp_path / "out"
    assert main([str(src), str(out), "--resolution", "8", "--workers", "1"]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["num_samples"] == 6 and info["num_skipped"] == 1 and info["skipped_files"] == [str(bad)]
    assert info["class_counts"]["n01"] == 2
    captured = capsys.readouterr()
    assert str(bad) in captured.err and "1 unreadable images skipped" in captured.out


def test_resume_skips_finished_shards_and_never_leaves_partial_ones(tmp_path, monkeypatch):
    src = _tree(tmp_path / "src", per_class=4)
    out = tmp_path / "out"
    args = [str(src), str(out), "--resolution", "8", "--shard-size", "3", "--workers", "1"]
    real_encode, calls = prep.encode_image, {"n": 0}

    def encode_then_die(*args):
        calls["n"] += 1
        if calls["n"] == 8:  # killed while writing the third shard
            raise KeyboardInterrupt
        return real_encode(*args)

    monkeypatch.setattr(prep, "encode_image", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert [len(_read(p)) for p in sorted(out.glob("*.tar"))] == [3, 3]
    assert not list(out.glob(".*tmp*")) and not (out / "dataset.json").exists()
    (out / ".train-000003.tar.tmp-99999").write_bytes(b"left by a killed process")

    written = []
    real_write = prep.write_shard
    monkeypatch.setattr(prep, "encode_image", real_encode)
    monkeypatch.setattr(
        prep, "write_shard", lambda path, samples: written.append(path.name) or real_write(path, samples)
    )
    assert main(args) == 0
    assert written == ["train-000002.tar", "train-000003.tar"]
    assert not list(out.glob(".*tmp*"))
    assert len(_all_samples(out)) == 12 and json.loads((out / "dataset.json").read_text())["num_samples"] == 12

    written.clear()
    assert main(args) == 0 and written == []  # everything finished: nothing rewritten
    assert main([*args[:-4], "--shard-size", "5", "--workers", "1"]) == 2  # other settings, same folder


def test_parallel_workers_give_the_same_shards(tmp_path):
    src = _tree(tmp_path / "src", per_class=3)
    for workers, name in ((1, "a"), (2, "b")):
        assert (
            main([str(src), str(tmp_path / name), "--resolution", "8", "--shard-size", "3", "--workers", str(workers)])
            == 0
        )
    for shard in sorted((tmp_path / "a").glob("*.tar")):
        assert _read(shard) == _read(tmp_path / "b" / shard.name)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t: [str(t / "missing"), str(t / "out")], "does not exist"),
        (lambda t: [str(t / "empty"), str(t / "out")], "no class sub-folders with images"),
        (lambda t: [str(t / "empty"), str(t / "out"), "--resolution", "100"], "positive multiple of 8"),
        (lambda t: [str(t / "empty"), str(t / "out"), "--resolution", "0"], "positive multiple of 8"),
        (lambda t: [str(t / "empty"), str(t / "out"), "--format", "gif"], "invalid choice"),
        (lambda t: [str(t / "empty"), str(t / "out"), "--labels", str(t / "nope.csv")], "labels file"),
        (lambda t: [str(t / "empty")], "required: out"),
        (lambda t: ["demo"], "required: out"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, make_args, message):
    (tmp_path / "empty").mkdir()
    assert main(make_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "--resolution" in capsys.readouterr().out


def truncate(path):
    """Cut a file to half its size, as a failed copy does."""
    os.truncate(path, os.path.getsize(path) // 2)


def flip(path, offset, size=4096):
    """Invert `size` bytes of a file from `offset` (its size stays the same)."""
    data = bytearray(path.read_bytes())
    data[offset : offset + size] = bytes(b ^ 0xFF for b in data[offset : offset + size])
    path.write_bytes(bytes(data))


def _prepared(tmp_path, per_class):
    """Shards of 3 samples of an 8-px tree: (source, output folder, the command's arguments, dataset info)."""
    src = _tree(tmp_path / "src", per_class=per_class)
    out = tmp_path / "out"
    args = [str(src), str(out), "--resolution", "8", "--shard-size", "3", "--workers", "1"]
    assert main(args) == 0
    return src, out, args, json.loads((out / "dataset.json").read_text())


def _record_writes(monkeypatch) -> list[str]:
    """Names of the shards that `epg prepare` writes from now on."""
    written, real_write = [], prep.write_shard
    monkeypatch.setattr(prep, "write_shard", lambda path, s: written.append(path.name) or real_write(path, s))
    return written


def test_records_verify_and_repair(tmp_path, capsys, monkeypatch):
    src, out, args, info = _prepared(tmp_path, per_class=4)
    shards = sorted(out.glob("*.tar"))
    assert len(shards) == 4 and set(info["shard_records"]) == {p.name for p in shards}
    for shard in shards:
        record = info["shard_records"][shard.name]
        assert record == {"samples": 3, "bytes": shard.stat().st_size, "sha256": file_sha256(shard)}
    original = {p.name: file_sha256(p) for p in shards}
    capsys.readouterr()
    assert main(["--verify", str(out)]) == 0
    assert "4 shards intact, 12 samples decode" in capsys.readouterr().out

    truncate(shards[1])
    flip(shards[2], 600)  # the first sample's .cls header and data
    assert main(["--verify", str(out), "--workers", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{shards[1]}: truncated to") and lines[0].endswith("of 3 samples lost")
    assert lines[1].startswith(f"{shards[2]}: contents differ from the record (sha256); tar stream has a damaged")
    assert lines[1].endswith("3 of 3 samples lost")
    assert "2 of 4 shards damaged" in lines[2]
    assert f"repair: epg prepare {src.resolve()} {out} --resolution 8 --split train" in lines[2]

    written = _record_writes(monkeypatch)
    assert main(args) == 0  # the same command repairs exactly the damaged shards
    assert written == [shards[1].name, shards[2].name]
    assert {p.name: file_sha256(p) for p in shards} == original
    assert "truncated to" in capsys.readouterr().err
    assert main(["--verify", str(out)]) == 0


def test_output_of_an_earlier_version_is_adopted(tmp_path, capsys, monkeypatch):
    """Reports and dataset.json without records: a rerun records the intact shards instead of rewriting them."""
    _, out, args, info = _prepared(tmp_path, per_class=2)
    for report in (out / ".prepare").glob("train-*.json"):
        old = json.loads(report.read_text())
        report.write_text(json.dumps({k: v for k, v in old.items() if k not in ("bytes", "sha256")}))
    (out / "dataset.json").write_text(json.dumps({k: v for k, v in info.items() if k != "shard_records"}))
    capsys.readouterr()
    assert main(["--verify", str(out)]) == 0
    assert "no per-shard records" in capsys.readouterr().out

    truncate(out / "train-000001.tar")
    written = _record_writes(monkeypatch)
    assert main(args) == 0
    assert written == ["train-000001.tar"]  # the damaged one; the intact ones are adopted
    assert json.loads((out / "dataset.json").read_text())["shard_records"] == info["shard_records"]
