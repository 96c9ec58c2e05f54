"""Our shard reader (moco_mm.shard_io) against webdataset's own: same patterns, same keys,
same payloads; pipe: and http(s) URLs; clear errors for what it cannot read."""

from __future__ import annotations

import functools
import http.server
import shlex
import threading

import pytest

from moco_mm.data import DataError, iter_raw_samples
from moco_mm.data.shard_io import expand_urls, iter_members, open_url, split_name
from tests.test_data import make_shard_dir, members_for, write_tar


def test_expand_urls_braces_and_double_colon():
    assert expand_urls("a/s-{000..002}.tar::b.tar") == ["a/s-000.tar", "a/s-001.tar", "a/s-002.tar", "b.tar"]
    assert expand_urls("x-{a,b}.tar") == ["x-a.tar", "x-b.tar"]
    wds = pytest.importorskip("webdataset")
    from webdataset.shardlists import expand_urls as wds_expand

    spec = "d/shard-{000007..000011}.tar::e/{x,y}-{0..1}.tar"
    assert expand_urls(spec) == list(wds_expand(spec))
    assert wds is not None


NAMES = ["000001.jpg", "000001.json", "dir/000002.seg.png", "a.b/c.txt", "noext", "d/e/f.TXT", "x.y.z.w"]


def test_split_name_follows_webdataset():
    from webdataset.tariterators import base_plus_ext

    for name in NAMES:
        key, ext = base_plus_ext(name)
        assert split_name(name) == ((name, "") if key is None else (key, ext.lower()))


def test_webdataset_reads_our_shards_as_we_do(tmp_path):
    """Format compatibility both ways: the samples webdataset yields from a shard (with a
    metadata member and a folder entry in it) are the ones our reader yields."""
    import tarfile

    import webdataset as wds

    samples = [(f"{i:06d}", members_for(i)) for i in range(5)]
    path = tmp_path / "s.tar"
    write_tar(path, samples)
    with tarfile.open(path, "a") as tar:  # metadata webdataset skips, and a folder
        info = tarfile.TarInfo("__meta__")
        info.size = 0
        tar.addfile(info)
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    ours = [(r.key, dict(r.members)) for r in iter_raw_samples(str(path))]
    theirs = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
              for s in wds.WebDataset(str(path), shardshuffle=False)]
    assert ours == theirs
    assert [k for k, _ in ours] == [k for k, _ in samples]


def test_pipe_urls_stream_and_report_failures(tmp_path):
    root, good = make_shard_dir(tmp_path / "d", [4])
    shard = root / "shard-000000.tar"
    got = [r.key for r in iter_raw_samples(f"pipe:cat {shlex.quote(str(shard))}")]
    assert len(got) == 4
    errors = []
    out = list(iter_raw_samples("pipe:exit 3", on_error=lambda url, e: errors.append(str(e))))
    assert out == [] and errors and "status 3" in errors[0] and "exit 3" in errors[0]
    with pytest.raises(DataError, match="status 7"):
        list(iter_raw_samples(f"pipe:cat {shlex.quote(str(shard))}; exit 7"))


def test_a_reader_that_stops_early_does_not_raise(tmp_path):
    root, _ = make_shard_dir(tmp_path / "d", [50])
    stream = open_url(f"pipe:cat {root / 'shard-000000.tar'}")
    it = iter_members(stream)
    next(it)
    it.close()
    stream.close()  # the command was cut off on purpose: no error


def test_http_urls_read_through_curl(tmp_path):
    import shutil

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    root, _ = make_shard_dir(tmp_path / "d", [3])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-000000.tar"
        assert len(list(iter_raw_samples(url))) == 3
        errors = []
        list(iter_raw_samples(url.replace("000000", "missing"), on_error=lambda u, e: errors.append(str(e))))
        assert errors and "404" in errors[0]
    finally:
        server.shutdown()


def test_unknown_schemes_name_the_pipe_alternative():
    with pytest.raises(DataError, match="pipe:aws s3 cp"):
        list(iter_raw_samples("s3://bucket/shard-000000.tar"))
