"""Distributed, resumable corpus embedding (`moco-mm embed`, torchrun) and the streaming index
build over its parts (`moco-mm search build-index`).

Uses the session's short demo run and its export (tests/test_export.py: trained_run and
query_export are built once per session and shared with test_export / test_search).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from moco_mm.search import Encoder, SearchIndex, iter_items
from moco_mm.search.embed import EMBED_INFO, Embeddings, part_name, shards_of_rank
from moco_mm.search.streaming import FLAT_MAX_N, build_index_from_parts, parse_size, plan_index
from moco_mm.search.thumbs import ThumbStore, thumbnail_jpeg
from tests.test_export import query_export, tool, trained_run
from tests.trainrun import free_port, run

pytest.importorskip("faiss")

F16_ATOL = 2e-3  # float16 storage of unit vectors (spacing 2^-11 below 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Encoder:
    return Encoder.from_export(query_export(tmp_path_factory))


@pytest.fixture(scope="module")
def val(trained) -> str:
    return str(trained.demo / "val" / "manifest.json")  # 2 shards, 64 images, 2 captions each


@pytest.fixture(scope="module")
def emb2(encoder, val, tmp_path_factory) -> tuple[Path, str]:
    """`torchrun --nproc_per_node=2 -m moco_mm.embed ... --captions` of the held-out shards."""
    out = tmp_path_factory.mktemp("emb") / "val"
    res = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "moco_mm.embed", "--export", str(encoder.root), "--data", val, "--out", str(out),
               "--captions", "--workers", "1", "--no-progress"], timeout=300)
    return out, res.stderr


def _part_vectors(out: Path, i: int, kind: str = "images") -> np.ndarray:
    return np.load(out / "parts" / part_name(i) / f"{kind}.npy")


def _part_meta(out: Path, i: int) -> list[dict]:
    return [json.loads(x) for x in (out / "parts" / part_name(i) / "images.jsonl").read_text().splitlines()]


def test_two_ranks_embed_each_shard_once_like_the_encoder(emb2, encoder, val):
    out, log = emb2
    info = json.loads((out / EMBED_INFO).read_text())
    assert info["model_fingerprint"] == encoder.fingerprint and info["dtype"] == "float16" and info["captions"]
    assert len(info["shards"]) == 2 and shards_of_rank(5, 1, 2) == [1, 3]
    markers = [json.loads((out / "parts" / f"{part_name(i)}.done").read_text()) for i in range(2)]
    assert [(m["part"], m["rank"], m["world_size"]) for m in markers] == [(0, 0, 2), (1, 1, 2)]
    assert "[rank 0/2] embedded 1 parts" in log and "[rank 1/2] embedded 1 parts" in log
    # Every sample exactly once, in shard order.
    items = list(iter_items(val))
    metas = _part_meta(out, 0) + _part_meta(out, 1)
    assert [m["id"] for m in metas] == [it.id for it in items] and len({m["id"] for m in metas}) == 64
    assert metas[0] == {"id": items[0].id, "source": items[0].source, "captions": items[0].captions}
    # The same vectors as the single-process Encoder, per sample id.
    got = np.concatenate([_part_vectors(out, 0), _part_vectors(out, 1)])
    assert got.dtype == np.float16 and got.shape == (64, encoder.embed_dim)
    want = encoder.encode_images([it.image for it in items])
    np.testing.assert_allclose(got.astype(np.float32), want, atol=F16_ATOL, rtol=0)
    caps = np.concatenate([_part_vectors(out, 0, "captions"), _part_vectors(out, 1, "captions")])
    want_caps = encoder.encode_texts([c for it in items for c in it.captions])
    assert caps.shape == (sum(m["captions"] for m in markers), encoder.embed_dim) == (128, encoder.embed_dim)
    np.testing.assert_allclose(caps.astype(np.float32), want_caps, atol=F16_ATOL, rtol=0)


def test_restart_redoes_only_unmarked_parts_and_refuses_another_model(emb2, encoder, val, trained, tmp_path,
                                                                        capsys):
    out = tmp_path / "emb"
    shutil.copytree(emb2[0], out)
    parts = out / "parts"
    kept = (parts / part_name(0) / "images.npy").stat().st_mtime_ns
    before = _part_vectors(out, 1)
    (parts / f"{part_name(1)}.done").unlink()  # as if killed before its marker
    (parts / f"{part_name(1)}.done.tmp-4242").write_text('{"images": 1')  # a stale, half-written marker
    (parts / f"{part_name(0)}.tmp-4242").mkdir()  # a killed run's leftover beside a finished part
    args = ["--export", str(encoder.root), "--data", val, "--out", str(out), "--captions", "--workers", "0",
            "--no-progress"]
    assert tool("embed").main(args) == 0
    err = capsys.readouterr().err
    assert "skipping 1 of 2 parts already done" in err and "embedded 1 parts" in err and "2 of 2 parts" in err
    assert (parts / part_name(0) / "images.npy").stat().st_mtime_ns == kept  # not touched
    marker = json.loads((parts / f"{part_name(1)}.done").read_text())
    assert (marker["rank"], marker["world_size"], marker["images"]) == (0, 1, 32)
    np.testing.assert_allclose(_part_vectors(out, 1).astype(np.float32), before.astype(np.float32), atol=F16_ATOL)
    assert not list(parts.glob(f"{part_name(1)}.tmp-*"))
    assert Embeddings.open(out).count("images") == 64  # the stray tmp files are ignored
    # A finished directory: a rerun does nothing.
    assert tool("embed").main(args) == 0 and "skipping 2 of 2" in capsys.readouterr().err
    # Another model's export (the key towers), or another dtype, is refused before any work.
    from moco_mm.search import export as ex

    key = ex.export_encoders(tmp_path / "key_export", run_dir=trained.run_dir, towers="key").out
    assert tool("embed").main([*args[:1], str(key), *args[2:]]) == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and "new --out" in err
    assert tool("embed").main([*args, "--dtype", "float32"]) == 2
    assert "dtype" in capsys.readouterr().err


def _corrupt_copy(shard: Path, out: Path, bad: int) -> str:
    """The shard with sample number `bad`'s image bytes replaced by garbage."""
    keys: list[str] = []
    with tarfile.open(shard) as src, tarfile.open(out, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            key = m.name.split(".", 1)[0]
            if key not in keys:
                keys.append(key)
            if m.name.endswith(".png") and len(keys) - 1 == bad:
                data = b"this is not an image"
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return str(out)


def test_corrupt_sample_is_skipped_and_counted(encoder, val, tmp_path, capsys):
    shard = Path(val).parent / "shard-000000.tar"
    data = _corrupt_copy(shard, tmp_path / "shard-000000.tar", bad=3)
    out = tmp_path / "emb"
    assert tool("embed").main(["--export", str(encoder.root), "--data", data, "--out", str(out), "--dtype", "float32",
                               "--workers", "2", "--batch-size", "8", "--no-progress"]) == 0
    assert "1 corrupt samples skipped" in capsys.readouterr().err
    marker = json.loads((out / "parts" / f"{part_name(0)}.done").read_text())
    assert marker["images"] == 31 and len(marker["skipped"]) == 1
    assert "shard-000000.tar:" in marker["skipped"][0]["source"] and marker["skipped"][0]["reason"]
    good = [it for it in iter_items(str(shard))]
    good = good[:3] + good[4:]
    v = _part_vectors(out, 0)
    assert v.dtype == np.float32 and [m["id"] for m in _part_meta(out, 0)] == [it.id for it in good]
    np.testing.assert_allclose(v, encoder.encode_images([it.image for it in good]), atol=1e-5, rtol=0)


def test_index_rules():
    """The documented rules, on sizes no test can build."""
    assert parse_size("2GB") == 2 * 1024 ** 3 and parse_size("64kb") == 65536 and parse_size("1000") == 1000
    assert plan_index(100_000, 512, "2GB").index_type == "flat"
    assert plan_index(FLAT_MAX_N + 1, 512, "64GB").index_type == "hnsw"
    big = plan_index(50_000_000, 512, "8GB")
    p = big.params
    assert big.index_type == "ivfpq" and big.estimated_bytes <= 0.6 * 8 * 1024 ** 3
    assert p["pq_nbits"] == 8 and 512 % p["pq_m"] == 0 and p["n_train"] * 512 * 4 <= 0.2 * 8 * 1024 ** 3
    assert p["nlist"] <= 4 * 50_000_000 ** 0.5 + 1 and p["nlist"] * 39 <= p["n_train"]
    from moco_mm.search import SearchError

    with pytest.raises(SearchError, match="raise --max-ram"):
        plan_index(50_000_000, 512, "100MB")
    with pytest.raises(SearchError, match="--index flat"):
        plan_index(1_000_000, 512, "1GB", index="flat")


def test_build_index_streams_parts_within_the_budget(emb2, encoder, tmp_path, capsys):
    out, _ = emb2
    emb = Embeddings.open(out)
    # Tiny budget: flat (64 x D x 4 bytes) does not fit 60 % of it -> IVF-PQ for both kinds.
    ivf = tmp_path / "ivfpq"
    assert tool("search").main(["build-index", "--emb", str(out), "--out", str(ivf), "--max-ram", "12KB"]) == 0
    printed = capsys.readouterr().out
    assert "ivfpq index" in printed and "text->image" in printed
    info = json.loads((ivf / "index.json").read_text())
    assert {k: v["index_type"] for k, v in info["parts"].items()} == {"images": "ivfpq", "captions": "ivfpq"}
    assert info["model_fingerprint"] == encoder.fingerprint and info["export"] == str(encoder.root.resolve())
    assert "ivfpq" in info["build"]["rules"] and info["build"]["max_ram_bytes"] == 12 * 1024
    for name in ("image->image", "text->image", "image->caption"):
        assert 0.0 <= info["recall"][name] <= 1.0, name
    # Default budget: flat, exact: recall 1.0 both ways; forced HNSW also loads.
    flat = build_index_from_parts(out, tmp_path / "flat", max_ram="2GB").info
    assert flat["parts"]["images"]["index_type"] == "flat"
    assert flat["recall"]["image->image"] == flat["recall"]["text->image"] == flat["recall"]["image->caption"] == 1.0
    hnsw = build_index_from_parts(out, tmp_path / "hnsw", index="hnsw").info
    assert hnsw["parts"]["captions"]["index_type"] == "hnsw" and 0 <= hnsw["recall"]["text->image"] <= 1
    for root in (ivf, tmp_path / "flat", tmp_path / "hnsw"):
        images, captions = SearchIndex.load(root, "images"), SearchIndex.load(root, "captions")
        assert len(images) == 64 and len(captions) == 128
        assert [m["id"] for m in images.meta] == [m["id"] for p in emb.parts for m in _part_meta(out, p.index)]
        assert captions.meta[1] == {"id": images.meta[0]["id"], "caption": images.meta[0]["captions"][1],
                                    "source": images.meta[0]["source"]}
    # The flat index answers like exact search over the encoder's own vectors.
    images = SearchIndex.load(tmp_path / "flat", "images")
    q = encoder.encode_texts([captions.meta[5]["caption"]])
    want = np.argsort(-(emb.rows("images", np.arange(64)) @ q[0]))[:3]
    assert [h.meta["id"] for h in images.search(q, k=3)[0]] == [images.meta[i]["id"] for i in want]
    # Thumbnails line up with the rows across the part boundary.
    store = ThumbStore.load(tmp_path / "flat")
    assert len(store) == 64
    items = {it.id: it for it in iter_items(json.loads((out / EMBED_INFO).read_text())["data"])}
    for row in (0, 31, 32, 63):
        assert store.get(row) == thumbnail_jpeg(items[images.meta[row]["id"]].image), row
    # And the query CLI works unchanged (its export comes from index.json).
    assert tool("search").main(["query", "--index", str(ivf), "--text", captions.meta[0]["caption"], "-k", "2",
                                "--json"]) == 0
    assert [h["rank"] for h in json.loads(capsys.readouterr().out)] == [1, 2]


def test_build_index_refuses_unfinished_embeddings(emb2, tmp_path):
    from moco_mm.search import SearchError

    out = tmp_path / "emb"
    shutil.copytree(emb2[0], out)
    (out / "parts" / f"{part_name(1)}.done").unlink()
    with pytest.raises(SearchError, match="1 of 2 parts are not finished"):
        build_index_from_parts(out, tmp_path / "idx")
    assert not (tmp_path / "idx").exists()
