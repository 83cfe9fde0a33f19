"""Samples of tar shards: a member reader that tells an archive's clean end from damage, per-shard counts, decoding.

Python's ``tarfile`` (and WebDataset, which reads through it) ends quietly at a damaged member header, as if the
archive had ended there, so the samples after a truncation or a few flipped bytes vanish without an error. Here only
the end-of-archive marker ends a shard cleanly; anything else raises :class:`BrokenShard`.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from PIL import Image

from epg.data.shards import is_remote

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)
_META_TYPES = (*_PAX_TYPES, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)

# on_damage(url, what is wrong, samples lost or None when the shard has no record)
DamageReport = Callable[[str, str, "int | None"], None]


class BrokenShard(Exception):
    """A tar stream that ends in a broken member: truncated, or with a damaged header."""


def _read(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes: fewer only where the stream ends."""
    chunks = []
    while size > 0:
        chunk = stream.read(size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any."""
    path, pos = None, 0
    while pos < len(data):
        length, _, rest = data[pos : pos + 20].partition(b" ")
        if not length.isdigit() or int(length) <= len(length):
            raise BrokenShard("has a damaged pax header")
        record = data[pos + len(length) + 1 : pos + int(length)].rstrip(b"\n")
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += int(length)
    return path


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream; raises :class:`BrokenShard` where the archive is damaged."""
    long_name = None
    while True:
        header = _read(stream, tarfile.BLOCKSIZE)
        if header == _ZERO_BLOCK:
            return
        if not header:
            raise BrokenShard("ends without the end-of-archive marker")
        if len(header) < tarfile.BLOCKSIZE:
            raise BrokenShard("ends inside a member header")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise BrokenShard(f"has a damaged member header ({exc})") from None
        stored = info.isreg() or info.type in _META_TYPES or info.type not in tarfile.SUPPORTED_TYPES
        size = info.size if stored else 0
        data = _read(stream, size)
        if len(data) < size:
            raise BrokenShard(f"ends inside member {long_name or info.name}")
        _read(stream, -size % tarfile.BLOCKSIZE)  # padding; a stream that ends here fails at the next header
        if info.type in _PAX_TYPES:
            long_name = _pax_path(data) or long_name
        elif info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type not in _META_TYPES:
            if info.isreg():
                yield long_name or info.name, data
            long_name = None


def _complete(sample: dict[str, Any]) -> bool:
    return "cls" in sample and any(ext in sample for ext in IMAGE_EXTENSIONS)


def tar_samples(stream: BinaryIO, url: str) -> Iterator[dict[str, Any]]:
    """WebDataset samples of a tar stream: consecutive members sharing a key (the name up to its basename's first
    dot) form ``{"__key__", "__url__", ext: bytes}``. At damage, the sample in progress is yielded only if it holds an
    image and a label; then :class:`BrokenShard` is raised."""
    sample: dict[str, Any] | None = None
    try:
        for name, data in tar_members(stream):
            folder, _, base = name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot or not stem:
                continue
            key = f"{folder}/{stem}" if folder else stem
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key, "__url__": url}
            sample[ext.lower()] = data
    except BrokenShard:
        if sample is not None and _complete(sample):
            yield sample
        raise
    if sample is not None:
        yield sample


@contextlib.contextmanager
def open_url(url: str) -> Iterator[BinaryIO]:
    """A local file, or a remote one (``pipe:``, ``http://`` ...) through WebDataset's ``gopen``, for reading bytes."""
    if is_remote(url):
        import webdataset as wds

        stream = wds.gopen(url, "rb")
    else:
        stream = open(url, "rb")
    try:
        yield stream
    finally:
        with contextlib.suppress(Exception):  # a failed pipe command already showed as a broken stream
            stream.close()


def shard_samples(url: str, expected: int | None, on_damage: DamageReport) -> Iterator[dict[str, Any]]:
    """The samples of one shard; damage goes to ``on_damage``: a broken tar stream, or fewer than ``expected``
    samples (its record). A reader that stops early reports nothing."""
    count, problem = 0, None
    try:
        with open_url(url) as stream:
            for sample in tar_samples(stream, url):
                count += 1
                yield sample
    except BrokenShard as exc:
        problem = f"tar stream {exc} after {count} samples"
    except OSError as exc:
        problem = f"cannot be read ({exc})"
    if problem is None and expected is not None and count < expected:
        problem = f"holds {count} of its {expected} recorded samples"
    if problem is not None:
        on_damage(url, problem, None if expected is None else max(0, expected - count))


def decode_sample(sample: dict[str, Any]) -> tuple[Image.Image, int]:
    """(RGB image, label) of a WebDataset sample with a png/jpg and a cls entry; raises ValueError on corrupt data."""
    key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
    if key is None or "cls" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} of {sample.get('__url__')} lacks an image or a cls entry")
    try:
        with Image.open(io.BytesIO(sample[key])) as image:
            image.load()
            rgb = image.convert("RGB")
        return rgb, int(sample["cls"])
    except Exception as exc:
        raise ValueError(f"sample {sample.get('__key__')} of {sample.get('__url__')}: {exc}") from exc
