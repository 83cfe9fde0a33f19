"""`epg prepare --verify OUT`: every shard against its record (size, sha256, sample count), every sample decoded.

Prints one line per damaged shard (what is wrong, how many samples are lost) and one per split, with the command
that repairs it: rerunning the `epg prepare` command that made the shards rewrites exactly the damaged ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from epg.data.samples import BrokenShard, decode_sample, open_url, tar_samples
from epg.data.shards import DATASET_JSON, RECORDS, map_shards, record_problem, repair_command


@dataclass(frozen=True)
class ShardCheck:
    """What verification found in one shard: its problems (none if intact) and its decodable samples."""

    name: str
    problems: tuple[str, ...]
    readable: int
    recorded: int | None

    @property
    def lost(self) -> int | None:
        """Samples lost against the record (None without a record)."""
        return None if self.recorded is None else max(0, self.recorded - self.readable)


def check_shard(task: tuple[Path, dict | None]) -> ShardCheck:
    """Check one shard file against its record (or None) and decode each of its samples."""
    path, record = task
    recorded = None if record is None else int(record["samples"])
    problem = record_problem(path, record) if record is not None else None if path.is_file() else "missing"
    if problem == "missing":
        return ShardCheck(path.name, (problem,), 0, recorded)
    problems = [problem] if problem else []
    good = bad = 0
    try:
        with open_url(str(path)) as stream:
            for sample in tar_samples(stream, str(path)):
                try:
                    decode_sample(sample)
                    good += 1
                except ValueError:
                    bad += 1
    except BrokenShard as exc:
        problems.append(f"tar stream {exc} after {good + bad} samples")
    else:
        if recorded is not None and good + bad != recorded:
            problems.append(f"holds {good + bad} of its {recorded} recorded samples")
    if bad:
        problems.append(f"{bad} samples do not decode")
    return ShardCheck(path.name, tuple(problems), good, recorded)


def verify_split(folder: Path, workers: int = 1) -> tuple[list[ShardCheck], dict]:
    """The checks of every shard listed in `folder`/dataset.json (sorted by name), and that dataset info."""
    info = json.loads((folder / DATASET_JSON).read_text())
    records = info.get(RECORDS) or {}
    tasks = [(folder / name, records.get(name)) for name in info["shards"]]
    checks = tqdm(map_shards(check_shard, tasks, workers), total=len(tasks), unit="shard", desc=f"verify {folder}")
    return sorted(checks, key=lambda c: c.name), info


def verify(out: Path, workers: int = 1) -> int:
    """Verify the split in `out` (or each split folder below it); print the damage; 0 if intact, 1 if not, 2 if none."""
    folders = [out] if (out / DATASET_JSON).is_file() else sorted(p.parent for p in out.glob(f"*/{DATASET_JSON}"))
    if not folders:
        print(f"epg prepare --verify: error: no {DATASET_JSON} in {out} or its sub-folders; pass a folder of shards")
        return 2
    status = 0
    for folder in folders:
        checks, info = verify_split(folder, workers)
        damaged = [c for c in checks if c.problems]
        for c in damaged:
            lost = f"{c.lost} of {c.recorded} samples lost" if c.lost is not None else f"{c.readable} samples readable"
            print(f"{folder / c.name}: {'; '.join(c.problems)}; {lost}")
        readable = sum(c.readable for c in checks)
        if damaged:
            status = 1
            lost = sum(c.lost or 0 for c in damaged)
            print(
                f"{folder}: {len(damaged)} of {len(checks)} shards damaged, {lost:,} samples lost; "
                f"repair: {repair_command(folder, info)}"
            )
        else:
            print(f"{folder}: {len(checks)} shards intact, {readable:,} samples decode")
        if RECORDS not in info:
            print(
                f"{folder}: no per-shard records (shards of an earlier version), so sizes and checksums were not "
                f"checked; rerun {repair_command(folder, info)} to record them"
            )
    return status
