"""Reading webdataset-layout tar shards: URL patterns, opening, members, sample keys.

Our own small reader on the standard library (tarfile, subprocess) instead of
webdataset's internals (`gopen`, `tar_file_iterator`, `expand_urls`, `base_plus_ext`),
which are not public API and changed signature between releases. The rules are
webdataset's, so shards written for it read the same here (tests check with webdataset):

    expand_urls("a/shard-{000..002}.tar::b.tar") -> ["a/shard-000.tar", "a/shard-001.tar",
                                                    "a/shard-002.tar", "b.tar"]
    open_url(url)          local path, file:PATH, pipe:COMMAND (its stdout), http(s):// (curl)
    iter_members(stream)   (name, bytes) of every regular member, in tar order, skipping
                           metadata (__NAME__ members and folders)
    iter_members_at(stream, base)   the same with each member's header offset in the file
    open_shard(url, offset)         a stream positioned at byte `offset` of a local plain tar,
                           and whether its offsets are seekable file positions
    split_name("dir/000017.seg.jpg") -> ("dir/000017", "seg.jpg"): the sample key is
                           everything before the first dot of the last path component
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tarfile
from typing import BinaryIO, Iterator

from braceexpand import braceexpand

__all__ = ["expand_urls", "is_remote", "local_path", "open_url", "open_shard", "iter_members",
           "iter_members_at", "split_name", "is_meta", "PipeError"]

# Members webdataset treats as metadata and never hands out.
_META_RE = re.compile(r"__[^/]*__($|/)")
_KEY_EXT_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule


class PipeError(OSError):
    """A `pipe:` command exited with a non-zero status; the message names the command."""


def expand_urls(spec: str) -> list[str]:
    """`::`-separated parts, each brace-expanded (`{000000..000099}`, `{a,b}`), in order."""
    out: list[str] = []
    for part in spec.split("::"):
        if part:
            out.extend(braceexpand(part))
    return out


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def local_path(url: str) -> str:
    return re.sub(r"^file:(//)?", "", url)


class _PipeStream:
    """stdout of a shell command as a binary stream; `close()` raises PipeError on a
    non-zero exit (after a full read: a reader that stops early kills the command)."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout = self.proc.stdout

    def read(self, n: int = -1) -> bytes:
        return self.stdout.read(n)

    def close(self) -> None:
        drained = self.stdout.read(1) == b""
        self.stdout.close()
        if not drained:  # stopped early: the rest is not wanted
            self.proc.kill()
        err = self.proc.stderr.read().decode("utf-8", "replace").strip()
        self.proc.stderr.close()
        status = self.proc.wait()
        if drained and status != 0:
            raise PipeError(f"pipe:{self.command} exited with status {status}" + (f": {err[-500:]}" if err else ""))


def open_url(url: str) -> BinaryIO:
    """A readable binary stream for a shard URL (see the module docstring)."""
    if url.startswith("pipe:"):
        return _PipeStream(url[len("pipe:"):])  # type: ignore[return-value]
    if url.startswith(("http://", "https://")):
        return _PipeStream(f"curl --silent --show-error --fail --location {shlex.quote(url)}")  # type: ignore
    if "://" in url and not url.startswith("file:"):
        scheme = url.split("://", 1)[0]
        raise ValueError(f"{url}: no reader for {scheme}:// URLs; use pipe:COMMAND, e.g. "
                         f"'pipe:aws s3 cp {url} -' or 'pipe:gsutil cat {url}'")
    return open(local_path(url), "rb")


def _is_plain_tar(f: BinaryIO) -> bool:
    """A local file is an uncompressed tar (its offsets are seek positions) when its first
    header carries the ustar magic; gzip/xz/zstd shards and v7 tars read from the start."""
    head = f.read(512)
    f.seek(0)
    return len(head) == 512 and head[257:262] == b"ustar"


def open_shard(url: str, offset: int | None = None) -> tuple[BinaryIO, bool]:
    """(stream, seekable) for a shard URL. `seekable`: a local uncompressed tar, whose member
    offsets (iter_members_at) are byte positions to seek to; `offset` (a member header's
    position, only for seekable shards) starts the stream there."""
    if is_remote(url):
        if offset:
            raise ValueError(f"{url}: a remote shard cannot be opened at a byte offset")
        return open_url(url), False
    f = open(local_path(url), "rb")
    try:
        seekable = _is_plain_tar(f)
        if offset:
            if not seekable:
                raise ValueError(f"{url}: not an uncompressed tar: cannot start at byte {offset}")
            f.seek(offset)
    except BaseException:
        f.close()
        raise
    return f, seekable


def is_meta(name: str) -> bool:
    return bool(_META_RE.match(name))


def iter_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of every regular, non-metadata member, streaming (no seeks)."""
    for name, data, _ in iter_members_at(stream):
        yield name, data


def iter_members_at(stream: BinaryIO, base: int = 0) -> Iterator[tuple[str, bytes, int]]:
    """(name, payload, offset) of every regular, non-metadata member, streaming (no seeks);
    `offset` is `base` + the position of the member's first header (a pax or GNU long-name
    header included) in the stream, so with `base` = where the stream starts in its file, a
    position to seek to."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        if not info.isreg() or is_meta(info.name):
            continue
        data = tar.extractfile(info).read()
        tar.members = []  # streaming: do not keep every header of a large shard
        yield info.name, data, base + info.offset


def split_name(name: str) -> tuple[str, str]:
    """Member name -> (sample key, lower-case extension); a name without a dot is its own
    key with extension ""."""
    m = _KEY_EXT_RE.match(name)
    if not m:
        return name, ""
    return m.group(1), m.group(2).lower()
