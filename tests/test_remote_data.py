"""Remote data at scale: make-manifest (img2dataset stats, counting, unique ids), retried
`pipe:` reads, and resumes that seek to a byte offset instead of re-reading the epoch."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

import moco_mm.data.samples as samples_mod
from moco_mm.config import ConfigError, load_config
from moco_mm.data import DataError, LoaderState, ShardSource, build_transforms, iter_raw_samples, make_stream
from moco_mm.data.cli import make_manifest_main
from moco_mm.data.manifest import make_manifest
from tests.test_data import SIZE, L, make_shard_dir, members_for, same, write_tar


def img2dataset_dir(root: Path, shards: dict[int, int], *, start: int = 0) -> Path:
    """img2dataset's layout: NNNNN.tar with keys shard*10^4 + index, NNNNN_stats.json."""
    root.mkdir(parents=True, exist_ok=True)
    for shard, n in shards.items():
        keys = [f"{shard:05d}{i:04d}" for i in range(n)]
        samples = []
        for k in keys:
            m = members_for(int(k))
            m["json"] = json.dumps({"key": k, "caption": "x", "status": "success"}).encode()  # no sample_id
            samples.append((k, m))
        write_tar(root / f"{shard:05d}.tar", samples)
        (root / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": n + 3, "successes": n, "failed_to_download": 3, "failed_to_resize": 0, "duration": 1.0,
             "start_time": 0.0, "end_time": 1.0, "status_dict": {"success": n}}, indent=4))
    return root


# ---------------------------------------------------------------------------------------
# make-manifest
# ---------------------------------------------------------------------------------------


def test_manifest_from_img2dataset_stats_and_its_errors(tmp_path, capsys):
    d = img2dataset_dir(tmp_path / "laion", {0: 3, 1: 5})
    assert make_manifest_main([str(d), "--out", str(d), "--no-progress"]) == 0
    src = ShardSource.from_spec(d / "manifest.json")
    assert [Path(u).name for u in src.urls] == ["00000.tar", "00001.tar"] and src.counts == (3, 5)
    m = make_manifest([str(d)], tmp_path / "remote.json", url_template="pipe:cat " + str(d) + "/{name}",
                      check_ids=True, workers=2)
    assert m["shards"][1] == f"pipe:cat {d}/00001.tar" and m["counted_by"] == "img2dataset-stats"
    assert ShardSource.from_spec(tmp_path / "remote.json").counts == (3, 5)
    # a second img2dataset run merged in: shard 00001 again = the same ids
    other = img2dataset_dir(tmp_path / "laion2", {1: 2})
    with pytest.raises(DataError, match=r"00001\.tar and .*laion2/00001\.tar have the same img2dataset shard"):
        make_manifest([str(d), str(other)], tmp_path / "m.json")
    (d / "00001_stats.json").write_text('{"count": 5}')
    with pytest.raises(DataError, match=r"00001_stats\.json: 'successes'"):
        make_manifest([str(d)], tmp_path / "m.json")
    (d / "00001_stats.json").write_text("{not json")
    assert make_manifest_main([str(d), "--out", str(tmp_path / "m.json"), "--stats"]) == 2
    assert "00001_stats.json: unreadable img2dataset stats" in capsys.readouterr().err
    (d / "00001_stats.json").unlink()
    with pytest.raises(DataError, match=r"00001\.tar: no 00001_stats\.json beside it .*unfinished"):
        make_manifest([str(d)], tmp_path / "m.json")


def test_manifest_by_counting_local_and_pipe_shards_and_duplicate_ids(tmp_path):
    src, _ = make_shard_dir(tmp_path / "s", [4, 3, 5])
    pattern = f"pipe:cat {src}/shard-{{000000..000002}}.tar"
    m = make_manifest([pattern], tmp_path / "pipe.json", workers=2)
    assert m["shard_samples"] == [4, 3, 5] and m["counted_by"] == "reading"
    assert ShardSource.from_spec(tmp_path / "pipe.json").counts == (4, 3, 5)
    assert make_manifest([str(src)], src, mode="count")["shards"][0] == "shard-000000.tar"  # relative
    # two outputs merged: the second's ids 0..2 collide with the first's shard 0
    write_tar(tmp_path / "s" / "extra.tar", [(f"{i:010d}", members_for(i)) for i in (40, 2, 41)])
    with pytest.raises(DataError, match=r"sample id 2 is in two shards: .*shard-000000\.tar and .*extra\.tar"):
        make_manifest([str(src)], tmp_path / "dup.json", mode="count", workers=1)
    write_tar(tmp_path / "twice.tar", [(f"{i:010d}", members_for(i)) for i in (7, 8)] + [("x", members_for(7))])
    with pytest.raises(DataError, match=r"twice\.tar: sample id 7 occurs twice"):
        make_manifest([str(tmp_path / "twice.tar")], tmp_path / "t.json")
    with pytest.raises(DataError, match="nope.tar: no such shard"):
        make_manifest([str(tmp_path / "nope.tar")], tmp_path / "t.json")


# ---------------------------------------------------------------------------------------
# pipe: retries
# ---------------------------------------------------------------------------------------


def flaky(tmp_path: Path, shard: Path, fail_first: int, mode: str = "before") -> str:
    """A pipe: command failing its first `fail_first` runs: 'before' any byte (exit 5 with a
    message), or 'midway' (half the shard, then exit 6); then it cats the shard."""
    counter = tmp_path / f"count-{mode}"
    script = tmp_path / f"flaky-{mode}.sh"
    size = shard.stat().st_size
    fail = ("echo 'connection reset by peer' >&2; exit 5" if mode == "before"
            else f"head -c {size // 2} {shlex.quote(str(shard))}; exit 6")
    script.write_text(f"""#!/bin/sh
n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}
if [ "$n" -lt {fail_first} ]; then {fail}; fi
cat {shlex.quote(str(shard))}
""")
    return f"pipe:sh {shlex.quote(str(script))}"


def test_failing_pipes_are_retried_and_resume_where_they_broke(tmp_path):
    src, _ = make_shard_dir(tmp_path / "s", [8])
    shard = src / "shard-000000.tar"
    want = [(r.key, r.members) for r in iter_raw_samples(str(shard))]
    got = [(r.key, r.members) for r in iter_raw_samples(flaky(tmp_path, shard, 2), retries=2, backoff_s=0.01)]
    assert got == want and (tmp_path / "count-before").read_text().strip() == "3"
    # broken after some samples were yielded: the retry skips exactly those
    got = [(r.key, r.members) for r in iter_raw_samples(flaky(tmp_path, shard, 1, "midway"), retries=1,
                                                           backoff_s=0.01)]
    assert got == want
    url = flaky(tmp_path / "s", shard, 99)
    with pytest.raises(DataError) as e:
        list(iter_raw_samples(url, retries=2, backoff_s=0.01))
    msg = str(e.value)
    assert url in msg and "failed 3 time(s)" in msg and "status 5" in msg and "connection reset by peer" in msg


def test_pipe_retry_config_is_validated():
    cfg = load_config()
    assert cfg.data.pipe_retries == 3 and cfg.data.pipe_backoff_s == 1.0
    with pytest.raises(ConfigError, match="data.pipe_retries"):
        load_config(overrides=["data.pipe_retries=-1"])


# ---------------------------------------------------------------------------------------
# seek-resume
# ---------------------------------------------------------------------------------------


def test_resume_seeks_past_the_consumed_bytes_and_is_exact(tmp_path, tokenizer, monkeypatch):
    src, _ = make_shard_dir(tmp_path / "s", [40, 40], corrupt={13: {"json": b"{bad"}})
    source = ShardSource.from_spec(src)
    transform = build_transforms(SIZE, (0.0,) * 3, (1.0,) * 3, train=True, crop_scale_min=0.5)
    args = dict(batch_size=4, tokenizer=tokenizer, max_length=L, transform=transform, seed=3, shuffle_buffer=4)
    n = 24  # epochs of 20 batches: resume at step 14 (past 57 raw samples, into the second shard)
    with make_stream(source, state=LoaderState.start(0, 0), **args) as stream:
        full = [b for _, b in zip(range(n), stream)]
    state = LoaderState.start(0, 0)
    for b in full[:14]:
        state.update(b)
    assert full[13]["worker_pos"] == 57
    saved = json.loads(json.dumps(state.to_dict()))
    assert saved["offsets"][0][2] > 0 and saved["epoch"] == 0

    opened: list[tuple[str, int | None]] = []
    read = [0]
    real_open = samples_mod.open_shard

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, k=-1):
            data = self.f.read(k)
            read[0] += len(data)
            return data

        def close(self):
            self.f.close()

    def spy(url, offset=None):
        opened.append((Path(url).name, offset))
        f, seekable = real_open(url, offset)
        return Counting(f), seekable

    monkeypatch.setattr(samples_mod, "open_shard", spy)
    with make_stream(source, state=LoaderState.from_dict(saved), **args) as stream:
        it = iter(stream)
        first = next(it)
        consumed_bytes = read[0]
        rest = [first] + [b for _, b in zip(range(n - 15), it)]
    assert same(rest, full[14:])
    offset = saved["offsets"][0][2]
    shard = src / opened[0][0]
    assert opened[0][1] == offset and shard.name == "shard-000001.tar"  # the first read: at the saved offset
    assert consumed_bytes <= shard.stat().st_size - offset  # nothing before it, nor shard 0, was read
    # an old state (no offsets) reads everything before its position and gives the same
    opened.clear()
    old = {k: v for k, v in saved.items() if k != "offsets"}
    with make_stream(source, state=LoaderState.from_dict(old), **args) as stream:
        again = [b for _, b in zip(range(n - 14), stream)]
    assert same(again, full[14:]) and all(off is None for _, off in opened)


@pytest.mark.parametrize("buffer", [0, 1, 5, 200])
def test_reader_resume_from_any_position_equals_the_uninterrupted_stream(tmp_path, buffer, caplog):
    """Raw level (no decoding): every resume point, across the pass boundary, a buffer larger
    than the pass, and a pipe: shard (skipped by count) next to local ones (seeked)."""
    import random

    from moco_mm.data.loader import _ReaderStream

    src, _ = make_shard_dir(tmp_path / "s", [9, 7, 6])
    urls = [str(src / "shard-000000.tar"), f"pipe:cat {src / 'shard-000001.tar'}", str(src / "shard-000002.tar")]

    def reader() -> _ReaderStream:
        return _ReaderStream(urls, [9, 7, 6], random.Random(11), buffer, "test")

    full = reader()
    keys, anchors = [], []
    for _ in range(50):  # more than two passes of 22
        keys.append(next(full).key)
        anchors.append(full.anchor())
    for pos in range(1, 50, 3):
        r = reader()
        r.resume(pos, anchors[pos - 1])
        assert [next(r).key for _ in range(50 - pos)] == keys[pos:], pos
        r.close()
    full.close()
    assert "does not match" not in caplog.text and "seek-resume found" not in caplog.text  # no fallback
