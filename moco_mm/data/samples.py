"""Raw samples (undecoded member groups of a shard) and their decoding.

    for raw in iter_raw_samples(url, on_error, expected=count):   # RawSample: key, names, members
        decoded = decode_sample(raw)    # Decoded(sample_id, captions, RGB image, image_fp, group_fp)
                                        # or _BadSample(reason)

Both are pure functions of the shard's bytes: what makes a resumed reader replay exactly.
"""

from __future__ import annotations

import json
import logging
import tarfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from PIL import Image

from moco_mm.data.fingerprints import NONE, bytes_fingerprint, group_fingerprint
from moco_mm.data.make_shards import ImageError, decode_image, to_rgb
from moco_mm.data.shard_io import PipeError, is_remote, iter_members_at, open_shard
from moco_mm.data.sources import DataError, _group

__all__ = ["IMAGE_EXTS", "RawSample", "iter_raw_samples", "Decoded", "decode_sample"]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


@dataclass
class RawSample:
    """One member group of a shard, undecoded. `members` maps extension -> bytes; `names`
    are the member names as stored; `problem` is set when the grouping itself is wrong."""

    url: str
    key: str
    names: list[str]
    members: dict[str, bytes]
    problem: str | None = None
    offset: int | None = None  # byte position of its first member header (local plain tars)


def iter_raw_samples(url: str, on_error: Callable[[str, BaseException], None] | None = None,
                     expected: int | None = None, *, start: int = 0, offset: int | None = None,
                     retries: int = 0, backoff_s: float = 1.0) -> Iterator[RawSample]:
    """Stream the member groups of one shard (local path or URL such as `pipe:`).

    A shard that breaks off (truncated tar, failing pipe) ends early; `on_error(url, exc)` is
    told (default: raise). Python's tarfile ends quietly at a corrupt header past the start,
    so a shard yielding fewer than `expected` samples (its manifest count) is reported too.
    The output is a pure function of the shard's bytes.

    start: begin at the shard's sample `start` (0-based); `offset`: the byte position of that
    sample's first member header (RawSample.offset, local uncompressed tars only): the file
    is read from there. Without an offset the first `start` samples are read and dropped.
    retries: a remote shard (`pipe:`, http) whose command fails or whose stream breaks is
    read again from its start, up to `retries` more times, after backoff_s, 2*backoff_s, ...
    seconds; the samples already yielded are read again and dropped (the stream is a pure
    function of the shard's bytes; the last dropped key must match the last yielded one,
    else the shard changed and that is an error). The last group of a remote stream is only
    yielded once the command has exited with status 0 (a stream cut at a member boundary
    ends like a whole tar; its last group may be incomplete). After the last try the error
    names the URL, the number of tries and the last status / stderr tail.
    """
    def report(exc: BaseException) -> None:
        if on_error is None:
            raise DataError(f"{url}: unreadable shard: {exc}") from exc
        on_error(url, exc)

    remote = is_remote(url)
    n = start  # index in the shard of the next sample to yield
    last_key: str | None = None
    attempt = 0
    while True:
        attempt += 1
        failure: BaseException | None = None
        retryable = remote
        first = start if offset is not None else 0  # the shard sample the stream begins with
        try:
            stream, seekable = open_shard(url, offset if n == start else None)
            if n != start:  # only remote shards are retried, and they have no offset
                first = 0
        except ValueError as e:  # an unopenable URL or offset: retrying does not help
            report(e)
            return
        except OSError as e:  # missing file
            failure = e
        else:
            base = (offset or 0) if seekable else None
            skip = n - first
            seen = 0
            held: RawSample | None = None
            closed = False
            try:
                members = iter_members_at(stream, base or 0)
                for key, items in _group((name, (data, at)) for name, data, at in members):
                    seen += 1
                    if seen <= skip:  # yielded by an earlier try
                        if seen == skip and last_key is not None and key != last_key:
                            retryable = False
                            raise DataError(f"re-read after a failure, sample {n - 1} has key {key!r}, not "
                                            f"{last_key!r}: the shard changed between tries")
                        continue
                    raw = RawSample(url, key, [nm for nm, _, _ in items], {},
                                    offset=items[0][2][1] if base is not None else None)
                    for name, ext, (data, _) in items:
                        if not ext:
                            raw.problem = f"member {name!r} has no extension (expected KEY.EXT)"
                        elif ext in raw.members:
                            raw.problem = f"duplicate member {name!r}"
                        else:
                            raw.members[ext] = data
                    if held is not None:  # complete: the next sample has begun
                        last_key = held.key
                        n += 1
                        yield held
                    held = raw
            except DataError as e:
                closed = True
                _close(stream)
                failure = e
            except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                closed = True
                # A failed command is the cause of the broken tar it produced: report its status.
                failure = _close(stream) or e
                if held is not None:  # it was complete (a later member broke off)
                    last_key = held.key
                    n += 1
                    yield held
            finally:
                if not closed:  # also when the consumer stops early: the pipe is then killed quietly
                    closed = True
                    failure = _close(stream)
            if failure is None and held is not None:
                last_key = held.key
                n += 1
                yield held
        if failure is None:
            break
        if retryable and attempt <= retries:
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning("%s: try %d of %d failed (%s); retrying in %.1f s", url, attempt, retries + 1,
                        failure, wait)
            time.sleep(wait)
            continue
        if remote and retries > 0:
            failure = PipeError(f"failed {attempt} time(s) (retries={retries}); last error: {failure}")
        report(failure)
        return
    if expected is not None and n < expected:
        report(DataError(f"ended after {n} of its {expected} samples (corrupt tar header?)"))


def _close(stream) -> BaseException | None:
    """Close a shard stream; a `pipe:` command's non-zero exit comes back as the error."""
    try:
        stream.close()
    except OSError as e:
        return e
    return None


class _BadSample(Exception):
    pass


@dataclass
class Decoded:
    """One good sample. `captions`: stripped, non-empty, at least one. `image`: 8-bit RGB.
    `image_fp`: KEY.json's "image_fp" (fingerprint of the stored pixels, make_shards) or, for
    shards written before it existed, bytes_fingerprint of the stored image member.
    `group_fp`: group_fingerprint of KEY.json's "group", or fingerprints.NONE (-1) without
    one. The caption's fingerprint depends on which caption an epoch uses: the loader adds
    it. All are >= 0 except NONE, and pure functions of the sample's bytes."""

    sample_id: int
    captions: list[str]
    image: Image.Image
    image_fp: int = NONE
    group_fp: int = NONE


def decode_sample(raw: RawSample) -> Decoded:
    """Raw member bytes -> Decoded. Raises _BadSample(reason): also for a KEY.json whose
    "image_fp" is not an integer in [0, 2**63) or whose "group" is not a string or an
    integer (a JSON null counts as absent for both)."""
    if raw.problem:
        raise _BadSample(raw.problem)
    img_ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
    if img_ext is None:
        raise _BadSample(f"no image member (expected KEY.{'/'.join(IMAGE_EXTS[:4])})")
    sample_id, captions, image_fp, group_fp = _decode_meta(raw)
    if image_fp == NONE:  # a shard from before make_shards stored "image_fp"
        image_fp = bytes_fingerprint(raw.members[img_ext])
    try:
        image = to_rgb(decode_image(raw.members[img_ext]))
    except ImageError as e:
        raise _BadSample(f"{raw.key}.{img_ext}: {e}") from None
    except Exception as e:  # mode conversion of an odd image
        raise _BadSample(f"{raw.key}.{img_ext}: {type(e).__name__}: {e}") from None
    return Decoded(sample_id, captions, image, image_fp, group_fp)


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _decode_meta(raw: RawSample) -> tuple[int, list[str], int, int]:
    """(sample_id, captions, image_fp or NONE, group_fp or NONE) from KEY.json / KEY.txt."""
    sample_id: int | None = None
    captions: list | None = None
    image_fp = group_fp = NONE
    if "json" in raw.members:
        try:
            meta = json.loads(raw.members["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise _BadSample(f"{raw.key}.json: not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise _BadSample(f"{raw.key}.json: expected an object")
        sid = meta.get("sample_id")
        if sid is not None:
            if not isinstance(sid, int) or isinstance(sid, bool):
                raise _BadSample(f"{raw.key}.json: 'sample_id' must be an integer, got {sid!r}")
            sample_id = sid
        caps = meta.get("captions")
        if caps is not None:
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise _BadSample(f"{raw.key}.json: 'captions' must be a list of strings")
            captions = caps
        fp = meta.get("image_fp")
        if fp is not None:
            # int64 in the batch, and -1 is reserved for "none": only [0, 2**63) is valid.
            if not _is_int(fp) or not 0 <= fp < 1 << 63:
                raise _BadSample(f"{raw.key}.json: 'image_fp' must be an integer in [0, 2**63), got {_short(fp)}")
            image_fp = fp
        group = meta.get("group")
        if group is not None:
            if not (_is_int(group) or isinstance(group, str)):
                raise _BadSample(f"{raw.key}.json: 'group' must be a string or an integer, got {_short(group)}")
            group_fp = group_fingerprint(group)
    if sample_id is None:
        tail = raw.key.rsplit("/", 1)[-1]
        if not tail.isdigit():
            raise _BadSample(f"{raw.key}: no sample_id (KEY.json has none and the key is not an integer)")
        sample_id = int(tail)
    if captions is None:
        if "txt" not in raw.members:
            raise _BadSample(f"{raw.key}: no caption (neither KEY.json 'captions' nor KEY.txt)")
        try:
            captions = [raw.members["txt"].decode("utf-8")]
        except UnicodeDecodeError:
            raise _BadSample(f"{raw.key}.txt: caption is not valid UTF-8") from None
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise _BadSample(f"{raw.key}: empty caption")
    return sample_id, captions, image_fp, group_fp
