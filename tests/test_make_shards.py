"""make_shards: every bad row kind is skipped and recorded, every odd image mode becomes RGB,
all three input kinds work, ids are stable and output is independent of the worker count."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco_mm.data import make_shards as shards
from moco_mm.data.fingerprints import image_fingerprint

REPO = Path(__file__).resolve().parents[1]


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


def _noise(h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_images(folder: Path) -> None:
    """Write good images of every awkward kind (names in GOOD) and three bad image files."""
    folder.mkdir(parents=True, exist_ok=True)
    _save(Image.fromarray(_noise()), folder / "rgb.jpg", "JPEG")
    _save(Image.new("CMYK", (12, 10), (0, 255, 255, 0)), folder / "cmyk.jpg", "JPEG")  # red
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 256).astype(np.uint16)
    _save(Image.fromarray(ramp), folder / "grey16.png", "PNG")  # mode I;16
    _save(Image.fromarray(_noise()[..., 0]), folder / "grey.png", "PNG")  # mode L
    pal = Image.fromarray(_noise()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    _save(pal, folder / "palette.png", "PNG")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 2] = 255
    rgba[:, 4:, 3] = 255  # left half fully transparent -> white, right half opaque blue
    _save(Image.fromarray(rgba, mode="RGBA"), folder / "rgba.png", "PNG")
    _save(Image.fromarray(_noise(40, 100, seed=1)), folder / "wide.png", "PNG")
    # Bad files.
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notimage.jpg").write_text("this is not an image\n")
    buf = io.BytesIO()
    Image.fromarray(_noise(32, 32, seed=2)).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


GOOD = ["rgb.jpg", "cmyk.jpg", "grey16.png", "grey.png", "palette.png", "rgba.png", "wide.png"]


def read_shards(out: Path) -> tuple[dict, list[dict]]:
    """(manifest, samples in shard order); each sample has id, captions, image (PIL), ext, shard,
    raw (image bytes), meta (KEY.json). Checks every sample's `image_fp` against its stored pixels."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        groups: dict[str, dict[str, bytes]] = {}
        for name, data in shards.iter_shard_members(out / shard):
            key, ext = name.split(".", 1)
            groups.setdefault(key, {})[ext] = data
        assert len(groups) == manifest["shard_samples"][manifest["shards"].index(shard)]
        for key, members in groups.items():
            meta = json.loads(members["json"])
            (ext,) = [e for e in members if e in ("jpg", "png", "webp")]
            img = Image.open(io.BytesIO(members[ext]))
            img.load()
            assert key == shards.sample_key(meta["sample_id"])
            assert members["txt"].decode() == meta["captions"][0]
            # The fingerprint of what a reader decodes, also for images re-encoded as JPEG.
            assert meta["image_fp"] == image_fingerprint(shards.to_rgb(shards.decode_image(members[ext])))
            samples.append({"id": meta["sample_id"], "captions": meta["captions"], "image": img, "ext": ext,
                            "source": meta["source"], "shard": shard, "raw": members[ext], "meta": meta})
    return manifest, samples


def test_csv_cli_skips_bad_rows_and_converts_to_rgb(tmp_path):
    img_dir = tmp_path / "in" / "img"
    make_images(img_dir)
    rows = [(f"img/{n}", f"caption of {n}") for n in GOOD] + [
        ("img/missing.jpg", "a missing file"),
        ("img/zero.jpg", "zero bytes"),
        ("img/notimage.jpg", "text pretending"),
        ("img/truncated.jpg", "half a jpeg"),
        ("img/rgb.jpg", "   "),  # empty caption
    ]
    csv_path = tmp_path / "in" / "pairs.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "extra"])
        for image, caption in rows:
            w.writerow([image, caption, "x"])
    # A caption with invalid UTF-8 bytes, appended raw.
    with open(csv_path, "ab") as f:
        f.write(b"img/rgb.jpg,bad \xff\xfe caption,x\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_shards.py"), str(csv_path), "--out", str(out),
         "--samples-per-shard", "3", "--workers", "2", "--id-offset", "100", "--no-progress"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest, samples = read_shards(out)

    assert manifest["samples"] == len(GOOD) == len(samples)
    assert manifest["skipped"] == 6 == len(manifest["skipped_rows"])
    assert manifest["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert manifest["shard_samples"] == [3, 3, 1]
    reasons = {r["row"]: r["reason"] for r in manifest["skipped_rows"]}
    assert "missing file" in reasons[7]
    assert "0 bytes" in reasons[8]
    assert "not an image" in reasons[9]
    assert "truncated" in reasons[10]
    assert "empty caption" in reasons[11]
    assert "UTF-8" in reasons[12]
    assert all(r["sample_id"] == 100 + r["row"] for r in manifest["skipped_rows"])
    # Stable ids: offset + row position, in input order.
    assert [s["id"] for s in samples] == [100 + i for i in range(len(GOOD))]
    by_source = {s["source"]: s for s in samples}
    for s in samples:
        assert s["image"].mode == "RGB", s["source"]
    red = np.asarray(by_source["img/cmyk.jpg"]["image"]).astype(int)
    assert red[..., 0].mean() > 200 and red[..., 1].mean() < 60  # CMYK (0,255,255,0) is red
    grey16 = np.asarray(by_source["img/grey16.png"]["image"]).astype(int)
    assert grey16.min() <= 1 and grey16.max() >= 250 and len(np.unique(grey16)) > 200  # rescaled, not clipped
    rgba = np.asarray(by_source["img/rgba.png"]["image"]).astype(int)
    assert (rgba[:, :4] == 255).all()  # transparent -> white
    assert (rgba[:, 4:] == [0, 0, 255]).all()
    # An RGB JPEG that needs no change keeps its original bytes.
    assert by_source["img/rgb.jpg"]["raw"] == (img_dir / "rgb.jpg").read_bytes()
    assert by_source["img/cmyk.jpg"]["ext"] == "jpg" and by_source["img/grey16.png"]["ext"] == "png"

    # The library in-process with no workers gives the very same bytes (order and ids do
    # not depend on the worker count).
    out0 = tmp_path / "out0"
    shards.make_shards(csv_path, out0, samples_per_shard=3, workers=0, id_offset=100)
    for name in manifest["shards"]:
        assert (out0 / name).read_bytes() == (out / name).read_bytes()


def test_jsonl_with_list_captions(tmp_path):
    img_dir = tmp_path / "img"
    make_images(img_dir)
    lines = [
        json.dumps({"image": "img/rgb.jpg", "caption": ["first caption", "second caption"]}),
        json.dumps({"image": "img/palette.png", "caption": "only one"}),
        "",  # blank lines are not rows
        "{not json",
        json.dumps({"image": "img/grey.png", "caption": ["", "  "]}),  # all captions empty
        json.dumps({"image": "img/truncated.jpg", "caption": ["x"]}),
        json.dumps({"image": "img/cmyk.jpg", "caption": [1, 2]}),
        json.dumps({"image": "img/wide.png", "caption": ["a wide one", ""]}),
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_bytes(("\n".join(lines) + "\n").encode() + b'{"image": "img/rgba.png", "caption": "\xff"}\n')
    out = tmp_path / "out"
    manifest = shards.make_shards(jsonl, out, samples_per_shard=10, max_size=32)
    _, samples = read_shards(out)
    assert [s["id"] for s in samples] == [0, 1, 6]
    assert samples[0]["captions"] == ["first caption", "second caption"]
    assert samples[1]["captions"] == ["only one"]
    assert samples[2]["captions"] == ["a wide one"]
    assert samples[2]["image"].size == (32, 13)  # --max-size shrinks the long side (100x40)
    assert samples[0]["image"].size == (16, 16)  # small images are left alone
    reasons = {r["row"]: r["reason"] for r in manifest["skipped_rows"]}
    assert set(reasons) == {2, 3, 4, 5, 7}
    assert "invalid JSON" in reasons[2] and "empty caption" in reasons[3]
    assert "truncated" in reasons[4] and "list of strings" in reasons[5] and "UTF-8" in reasons[7]


def test_folder_input_and_byte_limit(tmp_path):
    folder = tmp_path / "folder"
    make_images(folder)
    for name in GOOD:
        (folder / name).with_suffix(".txt").write_text(f"{name} line one\n\n{name} line two\n")
    (folder / "zero.txt").write_text("zero")
    (folder / "notimage.txt").write_text("not an image")
    (folder / "truncated.txt").write_text("truncated")
    sub = folder / "sub"
    _save(Image.fromarray(_noise(seed=5)), sub / "badcap.png", "PNG")
    (sub / "badcap.txt").write_bytes(b"\xff\xfe\xfa")  # not UTF-8
    _save(Image.fromarray(_noise(seed=6)), sub / "emptycap.png", "PNG")
    (sub / "emptycap.txt").write_text("  \n \n")
    _save(Image.fromarray(_noise(seed=7)), sub / "nocap.png", "PNG")

    out = tmp_path / "out"
    # Each sample is a few KiB: a 12 KiB limit forces several shards.
    manifest = shards.make_shards(folder, out, samples_per_shard=0, max_shard_bytes=12 * 1024)
    _, samples = read_shards(out)
    assert manifest["samples"] == len(GOOD) and manifest["skipped"] == 6
    assert len(manifest["shards"]) > 1
    for name, size in zip(manifest["shards"], manifest["shard_bytes"]):
        assert (out / name).stat().st_size == size
    sources = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.suffix in (".jpg", ".png"))
    assert [s["source"] for s in samples] == [s for s in sources if Path(s).name in GOOD]
    assert [s["id"] for s in samples] == [sources.index(s["source"]) for s in samples]
    assert samples[0]["captions"] == [f"{Path(samples[0]['source']).name} line one",
                                      f"{Path(samples[0]['source']).name} line two"]
    reasons = {r["source"]: r["reason"] for r in manifest["skipped_rows"]}
    assert "UTF-8" in reasons["sub/badcap.png"]
    assert "empty caption" in reasons["sub/emptycap.png"]
    assert "missing caption file" in reasons["sub/nocap.png"]
    assert "0 bytes" in reasons["zero.jpg"] and "not an image" in reasons["notimage.jpg"]


def test_refuses_to_mix_with_existing_shards_and_bad_header(tmp_path):
    img_dir = tmp_path / "img"
    make_images(img_dir)
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("image,caption\nimg/rgb.jpg,hello\n")
    shards.make_shards(csv_path, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite"):
        shards.make_shards(csv_path, tmp_path / "out")
    shards.make_shards(csv_path, tmp_path / "out", overwrite=True)
    bad = tmp_path / "bad.tsv"
    bad.write_text("path\ttext\nimg/rgb.jpg\thello\n")
    with pytest.raises(shards.InputError, match="bad.tsv.*'image' and 'caption'"):
        shards.read_rows(bad)


def _eval_samples(out: Path) -> list[tuple[int, list[str], np.ndarray]]:
    """(sample_id, captions, image as uint8 HxWx3) of every sample the eval loader yields."""
    from moco_mm.data import ShardSource, iter_eval_batches

    def as_stored(img: Image.Image) -> torch.Tensor:  # no resize or normalisation: the stored pixels
        return torch.from_numpy(np.asarray(img).copy())

    seen = []
    for b in iter_eval_batches(ShardSource.from_spec(out), batch_size=3, transform=as_stored):
        assert int(b["n_skipped"]) == 0
        seen += list(zip(b["sample_id"].tolist(), b["captions"], b["image"].numpy()))
    return seen


def test_rows_naming_one_image_become_one_sample(tmp_path, capsys):
    from moco_mm.data import cli

    img_dir = tmp_path / "in" / "img"
    pixels = {n: _noise(12, 12, seed=10 + i) for i, n in enumerate("abcd")}
    for n, arr in pixels.items():
        _save(Image.fromarray(arr), img_dir / f"{n}.png", "PNG")
    make_images(img_dir)  # for truncated.jpg
    c_abs = str(img_dir / "c.png")  # the same file as img/c.png
    rows = [("img/d.png", "   ")]  # row 0: empty caption, skipped alone; d's sample takes row 5's id
    for k in range(5):  # COCO-like: five captions per image, rows interleaved, not grouped
        for n in "abcd":
            image = f"img/{n}.png"
            if n == "c" and k % 2:
                image = c_abs
            if n == "a" and k == 2:
                image = "./img/a.png"
            caption = "b caption 1" if (n, k) == ("b", 3) else f"{n} caption {k}"  # a repeated caption
            rows.append((image, caption))
            if (n, k) == ("a", 0):
                rows.append(("img/truncated.jpg", "bad image, first row"))  # row 2
    rows.append(("img/truncated.jpg", "bad image, second row"))  # row 22
    csv_path = tmp_path / "in" / "coco.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    assert len(rows) == 23 and rows[4] == ("img/c.png", "c caption 0") and rows[8] == (c_abs, "c caption 1")

    out = tmp_path / "out"
    assert cli.make_shards_main([str(csv_path), "--out", str(out), "--samples-per-shard", "3", "--workers", "2",
                                 "--id-offset", "100", "--no-progress"]) == 0
    assert "merged 16 rows" in capsys.readouterr().out
    manifest, samples = read_shards(out)

    expected = {  # sample_id = offset + the image's first usable row; captions in input order, no repeat
        101: ("img/a.png", [f"a caption {k}" for k in range(5)]),
        103: ("img/b.png", ["b caption 0", "b caption 1", "b caption 2", "b caption 4"]),
        104: ("img/c.png", [f"c caption {k}" for k in range(5)]),
        105: ("img/d.png", [f"d caption {k}" for k in range(5)]),
    }
    assert [s["id"] for s in samples] == sorted(expected)
    assert {s["id"]: (s["source"], s["captions"]) for s in samples} == expected
    assert manifest["samples"] == 4 and manifest["shard_samples"] == [3, 1]
    assert manifest["rows"] == 23 and manifest["merged_rows"] == 16 and manifest["skipped"] == 3
    assert manifest["samples"] + manifest["merged_rows"] + manifest["skipped"] == manifest["rows"]
    skips = [(r["row"], r["sample_id"], r["source"]) for r in manifest["skipped_rows"]]
    assert skips == [(0, 100, "img/d.png"), (2, 102, "img/truncated.jpg"), (22, 122, "img/truncated.jpg")]
    reasons = [r["reason"] for r in manifest["skipped_rows"]]
    assert "empty caption" in reasons[0] and "truncated" in reasons[1] and reasons[1] == reasons[2]

    # The loader sees every image exactly once, with all its captions.
    seen = _eval_samples(out)
    assert [(i, caps) for i, caps, _ in seen] == [(i, caps) for i, (_, caps) in sorted(expected.items())]
    for (_, _, img), n in zip(seen, "abcd"):
        assert np.array_equal(img, pixels[n])

    # Same bytes without workers.
    out0 = tmp_path / "out0"
    assert shards.make_shards(csv_path, out0, samples_per_shard=3, workers=0, id_offset=100)["merged_rows"] == 16
    for name in manifest["shards"]:
        assert (out0 / name).read_bytes() == (out / name).read_bytes()


def test_jsonl_caption_lists_merge_across_lines(tmp_path):
    img_dir = tmp_path / "img"
    for i, n in enumerate("ab"):
        _save(Image.fromarray(_noise(seed=20 + i)), img_dir / f"{n}.png", "PNG")
    (img_dir / "link.png").symlink_to(img_dir / "a.png")  # resolves to the same file as img/a.png
    lines = [
        {"image": "img/a.png", "caption": ["a one", "a two"]},
        {"image": "img/b.png", "caption": "b one"},
        {"image": str(img_dir / "a.png"), "caption": ["a two", "a three"]},
        {"image": "img/b.png", "caption": ["b one"]},
        {"image": "img/link.png", "caption": "a four"},
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n\n".join(json.dumps(x) for x in lines) + "\n")  # blank lines are not rows
    manifest = shards.make_shards(jsonl, tmp_path / "out", samples_per_shard=10)
    _, samples = read_shards(tmp_path / "out")
    assert [(s["id"], s["source"], s["captions"]) for s in samples] == [
        (0, "img/a.png", ["a one", "a two", "a three", "a four"]),
        (1, "img/b.png", ["b one"]),
    ]
    assert (manifest["rows"], manifest["samples"], manifest["merged_rows"], manifest["skipped"]) == (5, 2, 3, 0)
    assert [i for i, _, _ in _eval_samples(tmp_path / "out")] == [0, 1]


def test_image_fp_follows_pixels_and_groups_are_kept(tmp_path):
    img_dir = tmp_path / "img"
    pixels = Image.fromarray(_noise(10, 14, seed=30))
    _save(pixels, img_dir / "same.png", "PNG")
    _save(pixels, img_dir / "same_fast.png", "PNG", compress_level=1)  # same pixels, other bytes
    _save(pixels, img_dir / "same.bmp", "BMP")  # re-encoded as PNG by make_shards
    _save(Image.fromarray(_noise(10, 14, seed=31)), img_dir / "other.png", "PNG")
    _save(Image.fromarray(_noise(10, 14, seed=32)), img_dir / "rotated.jpg", "JPEG",
          exif=_orientation_exif(6))  # re-encoded as JPEG: image_fp of the stored JPEG's pixels
    assert (img_dir / "same.png").read_bytes() != (img_dir / "same_fast.png").read_bytes()

    # CSV: an optional `group` column; an empty cell means no group.
    csv_path = tmp_path / "pairs.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "image", "caption"])
        w.writerows([
            ["query one", "img/same.png", "a"],
            ["", "img/same_fast.png", "b"],
            ["7", "img/same.bmp", "c"],        # a CSV cell is a string: "7", not 7
            ["query two", "img/other.png", "d"],
            ["x", "img/rotated.jpg", "e"],
            ["query three", "img/same.png", "f"],  # merged into row 0's sample: its group is dropped
        ])
    out = tmp_path / "csv_out"
    manifest = shards.make_shards(csv_path, out, samples_per_shard=2, workers=2)
    _, samples = read_shards(out)
    meta = {s["source"]: s["meta"] for s in samples}
    assert manifest["merged_rows"] == 1 and meta["img/same.png"]["captions"] == ["a", "f"]
    fp = meta["img/same.png"]["image_fp"]
    assert meta["img/same_fast.png"]["image_fp"] == fp and meta["img/same.bmp"]["image_fp"] == fp
    assert fp == image_fingerprint(pixels)
    assert meta["img/other.png"]["image_fp"] != fp
    assert {s["source"]: s["ext"] for s in samples}["img/rotated.jpg"] == "jpg"  # re-encoded (EXIF)
    assert {k: m.get("group") for k, m in meta.items()} == {
        "img/same.png": "query one", "img/same_fast.png": None, "img/same.bmp": "7",
        "img/other.png": "query two", "img/rotated.jpg": "x"}
    assert "group" not in meta["img/same_fast.png"]  # absent, not null
    out0 = tmp_path / "csv_out0"  # worker count still changes nothing
    shards.make_shards(csv_path, out0, samples_per_shard=2, workers=0)
    for name in manifest["shards"]:
        assert (out0 / name).read_bytes() == (out / name).read_bytes()

    # JSONL: `group` a string or an integer; another type skips the row with a reason. Of
    # rows naming one image, the first usable row that has a group gives the sample's group.
    lines = [
        {"image": "img/same.png", "caption": "no group on the first row"},   # 0
        {"image": "img/other.png", "caption": "o", "group": 42},            # 1
        {"image": "img/same.png", "caption": "skipped", "group": 1.5},       # 2: bad type
        {"image": "img/same.png", "caption": "s2", "group": "first"},        # 3: the sample's group
        {"image": "img/same.png", "caption": "s3", "group": "second"},       # 4: dropped
        {"image": "img/same.bmp", "caption": "b", "group": True},            # 5: bad type
        {"image": "img/same.bmp", "caption": "b", "group": ["q"]},           # 6: bad type
        {"image": "img/same_fast.png", "caption": "n", "group": None},       # 7: null: no group
        {"image": "img/rotated.jpg", "caption": "r", "group": ""},           # 8: empty: no group
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n" + '{"image": "img/other.png", '
                     '"caption": "c", "group": "\\ud800"}\n')  # 9: lone surrogate
    manifest = shards.make_shards(jsonl, tmp_path / "jsonl_out", samples_per_shard=10)
    _, samples = read_shards(tmp_path / "jsonl_out")
    assert [(s["id"], s["captions"], s["meta"].get("group")) for s in samples] == [
        (0, ["no group on the first row", "s2", "s3"], "first"),
        (1, ["o"], 42),
        (7, ["n"], None),
        (8, ["r"], None),
    ]
    assert samples[0]["meta"]["image_fp"] == fp and samples[2]["meta"]["image_fp"] == fp
    reasons = {r["row"]: r["reason"] for r in manifest["skipped_rows"]}
    assert set(reasons) == {2, 5, 6, 9}
    assert "'group' must be a string or an integer, got float 1.5" in reasons[2]
    assert "got bool true" in reasons[5] and "got list" in reasons[6]
    assert "UTF-8" in reasons[9]
    assert manifest["rows"] == manifest["samples"] + manifest["merged_rows"] + manifest["skipped"] == 10


def _orientation_exif(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif
