"""Search: the Encoder API, FAISS indexes (flat / IVF / HNSW) of shards, folders and CSVs,
the query and eval CLIs, and retrieval far above chance after a short demo training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from moco_mm import search
from moco_mm.search import Encoder, IndexParams, SearchError, SearchIndex, build_index
from tests.test_export import query_export, tool, trained_run

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Encoder:
    return Encoder.from_export(query_export(tmp_path_factory))


@pytest.fixture(scope="module")
def val_index(encoder, trained, tmp_path_factory) -> Path:
    """Flat image + caption index of the 64 held-out demo images (128 captions)."""
    out = tmp_path_factory.mktemp("index") / "val"
    build_index(encoder, trained.demo / "val" / "manifest.json", out, captions=True)
    return out


def test_caption_retrieves_its_own_image_far_above_chance(encoder, val_index):
    """Every held-out caption queries the image index; its own image should come first
    far more often than chance (1/64 = 1.6 %); see trained_run for what 64 steps give."""
    images = SearchIndex.load(val_index, "images")
    captions = SearchIndex.load(val_index, "captions")
    assert len(images) == 64 and len(captions) == 128
    queries = encoder.encode_texts([m["caption"] for m in captions.meta])
    hits = images.search(queries, k=10)
    own = [m["id"] for m in captions.meta]
    r1 = np.mean([h[0].meta["id"] == i for h, i in zip(hits, own)])
    r10 = np.mean([any(x.meta["id"] == i for x in h) for h, i in zip(hits, own)])
    chance = 1 / len(images)
    assert r1 >= 4 * chance, f"R@1 {r1:.3f} is not far above chance {chance:.3f}"
    assert r10 >= 2.5 * 10 * chance, f"R@10 {r10:.3f} is not far above chance {10 * chance:.3f}"
    # Scores are cosines, best first.
    scores = [x.score for x in hits[0]]
    assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0 + 1e-6


def test_index_holds_a_thumbnail_per_image_row(val_index, trained):
    """Row i's thumbnail is a JPEG of image i (what a server shows without opening a source)."""
    import io

    from PIL import Image

    from moco_mm.search import load_image
    from moco_mm.search.corpus import iter_items
    from moco_mm.search.thumbs import ThumbStore

    store = ThumbStore.load(val_index)
    images = SearchIndex.load(val_index, "images")
    assert store is not None and len(store) == len(images)
    first = next(iter_items(trained.demo / "val" / "manifest.json"))
    assert images.meta[0]["id"] == first.id
    thumb = Image.open(io.BytesIO(store.get(0)))
    src = first.image if isinstance(first.image, Image.Image) else load_image(first.image)
    assert thumb.format == "JPEG" and max(thumb.size) <= 128
    assert thumb.size[0] / thumb.size[1] == pytest.approx(src.size[0] / src.size[1], rel=0.05)
    # the same picture: mean colour within JPEG loss
    a = np.asarray(thumb.convert("RGB"), dtype=np.float32).mean(axis=(0, 1))
    b = np.asarray(src.convert("RGB").resize(thumb.size), dtype=np.float32).mean(axis=(0, 1))
    assert np.abs(a - b).max() < 8
    with pytest.raises(IndexError):
        store.get(len(store))


def test_eval_cli_json(encoder, trained, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    data = str(trained.demo / "val" / "manifest.json")
    assert tool("eval_retrieval").main(["--export", str(encoder.root), "--data", data, "--json", str(out),
                                        "--no-progress"]) == 0
    assert "text->image" in capsys.readouterr().out
    m = json.loads(out.read_text())
    for direction in ("i2t", "t2i"):
        for key in ("R@1", "R@5", "R@10", "medr"):
            assert isinstance(m[f"{direction}_{key}"], float)
        assert m[f"{direction}_R@1"] <= m[f"{direction}_R@5"] <= m[f"{direction}_R@10"] <= 100.0
    assert m["n_images"] == 64 and m["n_captions"] == 128 and m["chance_t2i_R@1"] == pytest.approx(100 / 64)
    assert m["t2i_R@1"] >= 4 * m["chance_t2i_R@1"]
    assert m["model_fingerprint"] == encoder.fingerprint
    assert tool("eval_retrieval").main(["--export", str(encoder.root), "--data", data, "--json", str(out),
                                        "--max-samples", "20", "--no-progress"]) == 0
    assert json.loads(out.read_text())["n_images"] == 20


def test_query_cli(encoder, trained, val_index, capsys):
    search_cli = tool("search")
    caption = SearchIndex.load(val_index, "captions").meta[0]["caption"]
    assert search_cli.main(["query", "--index", str(val_index), "--text", caption, "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3] and {"score", "id", "source", "captions"} <= set(hits[0])
    # Image -> captions through the caption index, with the export named explicitly.
    image = trained.demo.parent / "query.png"
    next(search.iter_items(trained.demo / "val" / "manifest.json")).image.save(image)
    assert search_cli.main(["query", "--index", str(val_index), "--export", str(encoder.root),
                            "--image", str(image), "-k", "4"]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 4 and lines[0].split()[0] == "1"
    assert "searched 128 captions" in out.err


def test_ivf_and_hnsw_agree_with_exact(encoder, trained):
    items = [it for _, it in zip(range(200), search.iter_items(trained.demo / "train" / "manifest.json"))]
    vectors = encoder.encode_images([it.image for it in items])
    queries = encoder.encode_texts(["a small red circle in the top left", "a large blue star below a small green cross",
                                    "there is a small yellow square in the bottom right corner"])
    results = {}
    for kind, params in (("flat", IndexParams()), ("ivf", IndexParams("ivf", nlist=8, nprobe=8)),
                         ("hnsw", IndexParams("hnsw", hnsw_m=16))):
        index, used = search.make_faiss_index(vectors, params)
        assert used["index_type"] == kind and index.ntotal == 200
        scores, ids = index.search(queries, 5)
        results[kind] = (ids.tolist(), scores)
    # IVF probing every cell is exhaustive, so exact; HNSW on 200 points finds the same top 5.
    # Scores agree to float rounding (the indexes sum in different orders), not bit for bit.
    for kind in ("ivf", "hnsw"):
        assert results[kind][0] == results["flat"][0], kind
        np.testing.assert_allclose(results[kind][1], results["flat"][1], rtol=0, atol=1e-5, err_msg=kind)
    with pytest.raises(SearchError, match="nlist 500: IVF needs at least as many vectors"):
        search.make_faiss_index(vectors, IndexParams("ivf", nlist=500))


def test_ivf_index_cli(encoder, trained, tmp_path, capsys):
    search_cli = tool("search")
    out = tmp_path / "ivf"
    assert search_cli.main(["index", "--export", str(encoder.root), "--data", str(trained.demo / "val"),
                            "--out", str(out), "--index", "ivf", "--nlist", "4", "--no-progress"]) == 0
    assert "images: 64 vectors, ivf index" in capsys.readouterr().out
    info = json.loads((out / "index.json").read_text())
    assert info["parts"]["images"]["nlist"] == 4 and "captions" not in info["parts"]
    assert search_cli.main(["query", "--index", str(out), "--text", "a red circle", "-k", "2", "--nprobe", "4"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_folder_and_csv_corpora(encoder, trained, tmp_path):
    items = [it for _, it in zip(range(3), search.iter_items(trained.demo / "val" / "manifest.json"))]
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    paths = [folder / "a.png", folder / "sub" / "b.jpg", folder / "c.png"]
    for it, p in zip(items, paths):
        it.image.save(p)
    (folder / "a.txt").write_text(items[0].captions[0] + "\n" + items[0].captions[1] + "\n")
    (folder / "broken.png").write_bytes(b"not an image")
    rep = build_index(encoder, folder, tmp_path / "ix_folder", captions=True)
    meta = SearchIndex.load(tmp_path / "ix_folder", "images").meta
    assert [Path(m["source"]).name for m in meta] == ["a.png", "c.png", "b.jpg"]  # sorted relative paths
    assert meta[0]["captions"] == items[0].captions[:2] and meta[1]["captions"] == []
    assert [s["source"] for s in rep.info["skipped"]] == [str(folder / "broken.png")]
    assert rep.info["parts"]["captions"]["count"] == 2
    # The folder image embeds like the same PIL image given directly (lossless PNG).
    got = search.SearchIndex.load(tmp_path / "ix_folder", "images").index.reconstruct(0)
    np.testing.assert_allclose(got, encoder.encode_images([items[0].image])[0], atol=1e-6)

    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerow(["photos/a.png", "first"])
        w.writerow(["photos/missing.png", "gone"])
        w.writerow(["photos/c.png", "third"])
    rep = build_index(encoder, table, tmp_path / "ix_csv")
    meta = SearchIndex.load(tmp_path / "ix_csv", "images").meta
    assert [(m["id"], m["captions"]) for m in meta] == [(0, ["first"]), (2, ["third"])]
    assert len(rep.info["skipped"]) == 1


def test_encoder_inputs_and_batching(encoder, trained, tmp_path):
    items = [it for _, it in zip(range(5), search.iter_items(trained.demo / "val" / "manifest.json"))]
    path = tmp_path / "x.png"
    items[0].image.save(path)
    a = encoder.encode_images([str(path)] + [it.image for it in items[1:]], batch_size=2)
    b = encoder.encode_images([it.image for it in items], batch_size=64)
    np.testing.assert_allclose(a, b, atol=1e-5)
    texts = [c for it in items for c in it.captions]
    np.testing.assert_allclose(encoder.encode_texts(texts, batch_size=3), encoder.encode_texts(texts), atol=1e-5)
    assert encoder.encode_texts([]).shape == (0, 32)
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode_texts("one string")


def test_index_refuses_other_models_and_bad_dirs(encoder, trained, val_index, tmp_path, capsys):
    key = tmp_path / "key"
    assert tool("export").main(["--run", str(trained.run_dir), "--out", str(key), "--towers", "key"]) == 0
    search_cli = tool("search")
    assert search_cli.main(["query", "--index", str(val_index), "--export", str(key), "--text", "a red star"]) == 2
    assert "embeddings are not comparable" in capsys.readouterr().err
    assert search_cli.main(["query", "--index", str(tmp_path), "--text", "x"]) == 2
    assert "not an index directory" in capsys.readouterr().err
    only_images = tmp_path / "only_images"
    build_index(encoder, trained.demo / "val" / "manifest.json", only_images, max_samples=8)
    assert search_cli.main(["query", "--index", str(only_images), "--image", "nope.png"]) == 2
    assert "--captions" in capsys.readouterr().err
    with pytest.raises(SearchError, match="pass --overwrite"):
        build_index(encoder, trained.demo / "val" / "manifest.json", only_images, max_samples=8)
