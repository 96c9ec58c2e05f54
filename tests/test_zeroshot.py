"""Zero-shot classification (CLIP's prompt ensemble): the ensemble and the accuracies against
a hand computation from an export's Encoder, image folders and labelled shards, the
classes/templates file forms and their errors, `moco-mm eval-zeroshot`, and the trainer's
eval.zeroshot logging into metrics.jsonl. A tiny random export and 32 px PNGs: seconds."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco_mm import distributed as D
from moco_mm.config import Config, ConfigError, QueueConfig, dump_config, load_config
from moco_mm.data import DataError
from moco_mm.data.labeled import open_labeled
from moco_mm.metrics import (
    ZEROSHOT_TEMPLATES,
    ClassList,
    ZeroShotError,
    class_ranks,
    classification_metrics,
    read_classes,
    read_templates,
    zeroshot_classifier,
)
from moco_mm.model import DualQueueMoCo
from moco_mm.search import Encoder
from moco_mm.search import export as ex
from moco_mm.search.zeroshot import evaluate_zeroshot
from moco_mm.train.checkpoint import CheckpointManager
from tests.test_export import tool
from tests.tiny import tiny_model_config
from tests.trainrun import tiny_train_config, write_config

# Words the session tokenizer knows (tests/conftest.py): distinct class texts get distinct tokens.
WORDS = ("zero", "one", "two", "three", "four", "five", "six")
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200),
           (120, 120, 120)]
PER_CLASS = 3


def png(path: Path, colour, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder: 7 class folders c0..c6 of 3 PNGs each (one a level deeper)."""
    root = tmp_path_factory.mktemp("zs") / "images"
    for c, colour in enumerate(COLOURS):
        for i in range(PER_CLASS):
            sub = "deeper/" if i == 2 else ""
            png(root / f"c{c}" / f"{sub}img{i}.png", colour, 10 * c + i)
    return root


@pytest.fixture(scope="module")
def encoder(tokenizer, tmp_path_factory) -> Encoder:
    """A tiny random export, built offline (query towers of a fresh model)."""
    tmp = tmp_path_factory.mktemp("zs_export")
    tokenizer.save_pretrained(str(tmp / "tok"))
    cfg = Config()
    cfg.model = tiny_model_config(momentum_encoder=False)
    cfg.model.text.tokenizer = str(tmp / "tok")
    # Mean pooling: a random CLS-pooled text tower gives class embeddings so alike (cosine
    # 0.999998) that logits differ by ~1e-7, float noise; mean pooling separates them by >= 6e-5.
    cfg.model.text.pooling = "mean"
    del cfg.model.text.overrides["vocab_size"]
    cfg.queue = QueueConfig(enabled=False)
    (tmp / "run").mkdir()
    dump_config(cfg, tmp / "run" / "config.yaml")
    torch.manual_seed(0)
    model = DualQueueMoCo(cfg.model, cfg.queue, vocab_size=len(tokenizer))
    CheckpointManager(tmp / "run" / "checkpoints").save(1, model.state_dict(), {"step": 1})
    ex.export_encoders(tmp / "export", run_dir=tmp / "run")
    return Encoder.from_export(tmp / "export")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- the protocol against a hand computation --------------------------------------------


def test_prompt_ensemble_matches_a_hand_computation(encoder):
    templates = ("a photo of a {}.", "{} {} picture", "itap of a {c}.")  # every {} and {c} is replaced
    weights = zeroshot_classifier(encoder.encode_texts, WORDS, templates, batch_size=7).numpy()
    assert weights.shape == (len(WORDS), encoder.embed_dim)
    for c, name in enumerate(WORDS):
        emb = encoder.encode_texts([t.replace("{}", name).replace("{c}", name) for t in templates])
        want = unit(unit(emb).mean(axis=0))
        np.testing.assert_allclose(weights[c], want, rtol=0, atol=1e-6)
    # The chunking (whole classes per call) does not change the result.
    again = zeroshot_classifier(encoder.encode_texts, WORDS, templates, batch_size=1000).numpy()
    np.testing.assert_allclose(again, weights, rtol=0, atol=1e-6)


def test_accuracies_match_a_hand_computation(encoder, folder, tmp_path):
    classes = write(tmp_path / "classes.txt", "# one name per line, sorted folder order\n" + "\n".join(WORDS) + "\n")
    result = evaluate_zeroshot(encoder, folder, classes, batch_size=4, workers=2)

    paths = sorted(folder.rglob("*.png"), key=lambda p: p.relative_to(folder).as_posix())
    labels = np.array([int(p.relative_to(folder).parts[0][1:]) for p in paths])
    weights = np.stack([unit(unit(encoder.encode_texts([t.replace("{}", w) for t in ZEROSHOT_TEMPLATES]))
                             .mean(axis=0)) for w in WORDS])
    logits = encoder.encode_images(paths) @ weights.T
    ordered = -np.sort(-logits, axis=1)
    assert (ordered[:, :-1] - ordered[:, 1:]).min() > 1e-5, "precondition: logits apart beyond float noise"
    order = np.argsort(-logits, axis=1)
    top1 = order[:, 0] == labels
    top5 = np.array([label in row[:5] for label, row in zip(labels, order)])
    per_class = [100 * top1[labels == c].mean() for c in range(len(WORDS))]

    assert result.n_images == len(paths) == 7 * PER_CLASS and result.n_classes == 7
    assert result.n_templates == len(ZEROSHOT_TEMPLATES) == 7 and result.n_skipped == 0
    assert result.top1 == pytest.approx(100 * top1.mean())
    assert result.top5 == pytest.approx(100 * top5.mean())
    assert result.per_class == pytest.approx(per_class) and result.per_class_n == [PER_CLASS] * 7
    assert result.mean_per_class == pytest.approx(np.mean(per_class))


def test_ranks_ties_and_per_class_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0],    # label 0: rank 1
                           [0.5, 0.5, 0.0],    # label 1, tied with class 0: counts against -> rank 2
                           [0.1, 0.2, 0.3],    # label 0: rank 3
                           [0.0, 0.2, 0.1]])   # label 1: rank 1
    labels = torch.tensor([0, 1, 0, 1])
    ranks = class_ranks(logits, labels)
    assert ranks.tolist() == [1, 2, 3, 1]
    r = classification_metrics(ranks, labels, n_classes=3)
    assert r.top1 == 50.0 and r.top5 is None and "3 classes" in r.top5_note
    assert r.per_class == [50.0, 50.0, None] and r.per_class_n == [2, 2, 0]  # class 2 has no image
    assert r.mean_per_class == 50.0
    assert set(r.metrics()) == {"zeroshot_top1", "zeroshot_mean_per_class", "zeroshot_n_images"}
    r6 = classification_metrics(torch.tensor([1, 5, 6, 2]), torch.tensor([0, 0, 0, 5]), n_classes=6)
    assert r6.top1 == 25.0 and r6.top5 == 75.0 and r6.per_class[0] == pytest.approx(100 / 3)
    assert r6.mean_per_class == pytest.approx((100 / 3 + 0.0) / 2) and "zeroshot_top5" in r6.metrics()


# --- data forms ---------------------------------------------------------------------------


def test_tab_form_maps_folders_by_name_and_shards_carry_labels(encoder, folder, tmp_path):
    # FOLDER<TAB>name lines in another order than the folders: labels follow the file.
    mapping = write(tmp_path / "map.txt", "".join(f"c{c}\t{WORDS[c]}\n" for c in (6, 2, 0, 1, 5, 4, 3)))
    by_name = evaluate_zeroshot(encoder, folder, mapping, ["a photo of a {}."], workers=0)
    by_order = evaluate_zeroshot(encoder, folder, write(tmp_path / "list.txt", "\n".join(WORDS)),
                                 ["a photo of a {}."], workers=0)
    perm = [6, 2, 0, 1, 5, 4, 3]
    assert by_name.top1 == pytest.approx(by_order.top1)
    assert by_name.per_class == pytest.approx([by_order.per_class[c] for c in perm])

    # The same images as shards: KEY.cls (index) in one tar, "label" in KEY.json (a FOLDER name) in another.
    paths = sorted(folder.rglob("*.png"), key=lambda p: p.relative_to(folder).as_posix())
    shards = tmp_path / "shards"
    shards.mkdir()
    for name, part in (("a.tar", paths[:10]), ("b.tar", paths[10:])):
        members = []
        for i, p in enumerate(part):
            cls = int(p.relative_to(folder).parts[0][1:])
            key = f"{name[0]}{i:04d}"
            members.append((f"{key}.png", p.read_bytes()))
            members.append((f"{key}.cls", str(cls).encode()) if name == "a.tar"
                           else (f"{key}.json", json.dumps({"label": f"c{cls}"}).encode()))
        write_tar(shards / name, members)
    from_shards = evaluate_zeroshot(encoder, shards, mapping_by_index(tmp_path), ["a photo of a {}."], workers=0)
    assert from_shards.n_images == by_order.n_images
    assert from_shards.top1 == pytest.approx(by_order.top1)
    assert from_shards.per_class == pytest.approx(by_order.per_class)


def mapping_by_index(tmp_path: Path) -> Path:
    """Tab form in folder order: integer labels (KEY.cls) index the lines, names ("c3") the folders."""
    return write(tmp_path / "map_sorted.txt", "".join(f"c{c}\t{w}\n" for c, w in enumerate(WORDS)))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shard_label_errors_name_the_shard_and_sample(tmp_path, folder):
    img = next(folder.rglob("*.png")).read_bytes()
    classes = ClassList.from_names(["zero", "one", "two"])
    cases = [([("k0.png", img), ("k0.cls", b"7")], r"label 7 \(k0\.cls\) is not a class index .* 0\.\.2"),
             ([("k0.png", img)], "no label"),
             ([("k0.png", img), ("k0.json", b'{"label": "c1"}')], "string labels need FOLDER<TAB>class name")]
    for i, (members, match) in enumerate(cases):
        shard = write_tar(tmp_path / f"s{i}.tar", members)
        data = open_labeled(shard, classes)
        with pytest.raises(DataError, match=match) as err:
            list(data.batches(lambda im: torch.zeros(3, 4, 4, dtype=torch.uint8)))
        assert f"s{i}.tar: sample k0" in str(err.value)


def test_unreadable_images_are_skipped_and_counted(encoder, folder, tmp_path):
    import shutil

    copy = tmp_path / "images"
    shutil.copytree(folder, copy)
    (copy / "c3" / "img0.png").write_bytes(b"not a png")
    r = evaluate_zeroshot(encoder, copy, write(tmp_path / "c.txt", "\n".join(WORDS)), ["{}"], workers=0)
    assert r.n_images == 7 * PER_CLASS - 1 and r.n_skipped == 1 and r.per_class_n[3] == PER_CLASS - 1


# --- bad input: clear errors before anything is embedded ------------------------------------


def test_classes_and_templates_file_errors(tmp_path):
    cases = {
        "": "no classes",
        "# only a comment\n\n": "no classes",
        "zero\n": "only 1 class",
        "c0\tzero\none\n": r"c\.txt:2: no TAB, unlike line 1",
        "zero\n\none\nzero\n": r"c\.txt:4: class name 'zero' again \(first on line 1\)",
        "c0\tzero\nc0\tone\n": r"c\.txt:2: folder 'c0' again",
        "c0\t \n": r"c\.txt:1: expected FOLDER<TAB>class name",
    }
    for text, match in cases.items():
        with pytest.raises(ZeroShotError, match=match):
            read_classes(write(tmp_path / "c.txt", text))
    with pytest.raises(ZeroShotError, match="no such classes file"):
        read_classes(tmp_path / "missing.txt")
    ok = read_classes(write(tmp_path / "c.txt", "\ufeffc0\tgolden retriever\nc1\tzero\n"))  # a BOM is fine
    assert ok.keys == ("c0", "c1") and ok.texts == ("golden retriever", "zero") and ok.where(1).endswith("c.txt:2")

    with pytest.raises(ZeroShotError, match=r"t\.txt:3: template 'a photo' has no \{\}"):
        read_templates(write(tmp_path / "t.txt", "a photo of a {}.\n# comment\na photo\n"))
    with pytest.raises(ZeroShotError, match="no templates"):
        read_templates(write(tmp_path / "t.txt", "\n"))
    assert read_templates(write(tmp_path / "t.txt", "a {}.\n\nart of the {c}.\n")) == ("a {}.", "art of the {c}.")


def test_folder_errors_name_the_folder_or_line(tmp_path, folder):
    names = write(tmp_path / "names.txt", "\n".join(WORDS[:3]))
    with pytest.raises(DataError, match=r"7 class sub-folders, but .*names\.txt lists 3"):
        open_labeled(folder, read_classes(names))
    partial = write(tmp_path / "map.txt", "c0\tzero\nc1\tone\n")
    with pytest.raises(DataError, match=r"c2: class folder not in .*map\.txt .*'c2<TAB>class name'\); 4 more"):
        open_labeled(folder, read_classes(partial))
    extra = write(tmp_path / "extra.txt", "".join(f"c{c}\t{w}\n" for c, w in enumerate(WORDS)) + "c9\tpicture\n")
    with pytest.raises(DataError, match=r"extra\.txt:8: class folder 'c9' is not in"):
        open_labeled(folder, read_classes(extra))

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    png(empty / "a" / "x.png", (1, 2, 3), 0)
    two = read_classes(write(tmp_path / "two.txt", "zero\none\n"))
    with pytest.raises(DataError, match=r"empty/b: no image files"):
        open_labeled(empty, two)
    flat = tmp_path / "flat"
    png(flat / "x.png", (1, 2, 3), 0)
    (flat / "a").mkdir()
    with pytest.raises(DataError, match=r"flat/x\.png: an image directly in the image folder"):
        open_labeled(flat, two)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        open_labeled(tmp_path / "bare", two)
    with pytest.raises(DataError, match="no such image folder or shard file"):
        open_labeled(tmp_path / "nowhere", two)


def test_cli_reports_and_writes_json(encoder, folder, tmp_path, capsys):
    three = write(tmp_path / "three.txt", "c0\tzero\nc1\tone\nc2\ttwo\n")
    sub = tmp_path / "sub"
    for c in range(3):
        (sub / f"c{c}").mkdir(parents=True)
        for p in (folder / f"c{c}").glob("*.png"):
            (sub / f"c{c}" / p.name).write_bytes(p.read_bytes())
    templates = write(tmp_path / "t.txt", "a photo of a {}.\nart of the {}.\n")
    out = tmp_path / "zs.json"
    assert tool("eval_zeroshot").main(["--export", str(encoder.root), "--data", str(sub), "--classes", str(three),
                                       "--templates", str(templates), "--json", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "6 images, 3 classes, 2 templates" in text
    assert "top-5              n/a   (3 classes: needs at least 6)" in text and "mean per-class" in text
    assert "c1 (one)" in text
    m = json.loads(out.read_text())
    assert m["top5"] is None and "top5_note" in m and m["n_classes"] == 3 and m["n_images"] == 6
    assert m["chance_top1"] == pytest.approx(100 / 3) and m["templates"] == ["a photo of a {}.", "art of the {}."]
    assert [r["folder"] for r in m["per_class"]] == ["c0", "c1", "c2"] and m["per_class"][1]["class"] == "one"
    assert m["model_fingerprint"] == encoder.fingerprint

    # 7 classes: top-5 is reported; default templates.
    seven = write(tmp_path / "seven.txt", "\n".join(WORDS))
    assert tool("eval_zeroshot").main(["--export", str(encoder.root), "--data", str(folder), "--classes",
                                       str(seven), "--json", str(out), "--no-progress"]) == 0
    assert "top-5   " in capsys.readouterr().out
    m = json.loads(out.read_text())
    assert m["top1"] <= m["top5"] <= 100.0 and m["n_templates"] == 7


def test_cli_checks_inputs_before_loading_the_export(tmp_path, folder, capsys):
    """Every input error comes before the export is even opened (a missing export here)."""
    seven = write(tmp_path / "seven.txt", "\n".join(WORDS))
    bad_t = write(tmp_path / "t.txt", "a photo\n")
    cases = [(["--classes", str(write(tmp_path / "e.txt", ""))], "e.txt: no classes"),
             (["--classes", str(seven), "--templates", str(bad_t)], "t.txt:1: template 'a photo' has no {}"),
             (["--classes", str(write(tmp_path / "m.txt", "c0\tzero\nc1\tone\n"))], "class folder not in"),
             (["--classes", str(seven), "--data", str(tmp_path / "nowhere")], "no such image folder")]
    for extra, match in cases:
        argv = ["--export", str(tmp_path / "no_export"), "--data", str(folder), *extra, "--no-progress"]
        assert tool("eval_zeroshot").main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("eval_zeroshot: error:") and match in err, err


# --- during training ---------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path, folder):
    seven = write(tmp_path / "seven.txt", "\n".join(WORDS))
    base = ["eval.every=2", f"eval.zeroshot.data={folder}"]
    cases = [(base, "eval.zeroshot.classes: needed"),
             ([f"eval.zeroshot.classes={seven}"], "eval.zeroshot.classes: set, but eval.zeroshot.data"),
             ([f"eval.zeroshot.data={folder}", f"eval.zeroshot.classes={seven}"], "eval.every: .* never run"),
             (base + [f"eval.zeroshot.classes={write(tmp_path / 'e.txt', 'zero')}"],
              r"eval.zeroshot.classes: .*e\.txt: only 1 class"),
             (base + [f"eval.zeroshot.classes={seven}", f"eval.zeroshot.templates={write(tmp_path / 't', 'x')}"],
              r"eval.zeroshot.templates: .*t:1: template 'x' has no \{\}"),
             (["eval.zeroshot.dta=x"], "eval.zeroshot.dta: unknown key; did you mean eval.zeroshot.data")]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides)
    cfg = load_config(None, base + [f"eval.zeroshot.classes={seven}"])  # no data.val: zero-shot alone is fine
    assert cfg.eval.zeroshot.data == str(folder) and cfg.eval.zeroshot.templates == ""


def test_trainer_logs_zeroshot_metrics(tokenizer, folder, tmp_path, capsys):
    """A 2-step tiny run with eval.zeroshot: eval/zeroshot_* in metrics.jsonl, beside the
    retrieval eval (data.val) or alone."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    paths = sorted(folder.rglob("*.png"))
    train = tmp_path / "train"
    train.mkdir()
    members = []
    for i, p in enumerate(paths * 2):
        members += [(f"{i:06d}.png", p.read_bytes()), (f"{i:06d}.txt", f"photo {WORDS[i % 7]}".encode())]
    write_tar(train / "shard-000000.tar", members)
    seven = write(tmp_path / "seven.txt", "\n".join(WORDS))
    cfg = tiny_train_config(tmp_path, tmp_path / "run", run={"steps": 2, "log_every": 1},
                            data={"train": str(train), "val": str(train), "batch_size": 8, "workers": 0},
                            optim={"warmup_steps": 1}, queue={"size": 16},
                            eval={"every": 2, "zeroshot": {"data": str(folder), "classes": str(seven)}},
                            logging={"progress": False})
    cfg["model"]["text"]["tokenizer"] = str(tmp_path / "tok")
    from moco_mm.train import Trainer

    trainer = Trainer(load_config(write_config(cfg, tmp_path / "c.yaml")), D.init_distributed("cpu"))
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [2]
    assert {"eval/zeroshot_top5", "eval/zeroshot_mean_per_class", "eval/zeroshot_n_images"} <= evals[0].keys()
    assert evals[0]["eval/zeroshot_n_images"] == 7 * PER_CLASS
    assert 0.0 <= evals[0]["eval/zeroshot_top1"] <= evals[0]["eval/zeroshot_top5"] <= 100.0
    assert {"eval/i2t_R@1", "eval/t2i_medr"} <= evals[0].keys()  # the retrieval eval still runs
    out = capsys.readouterr().out
    assert "zero-shot classification at step 2 (21 images, 7 classes)" in out and "held-out retrieval" in out

    # Zero-shot alone (no data.val): no retrieval keys.
    cfg["data"]["val"] = ""
    cfg["run"]["output_dir"] = str(tmp_path / "run1")
    Trainer(load_config(write_config(cfg, tmp_path / "c1.yaml")), D.init_distributed("cpu")).train()
    last = json.loads((tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "eval/zeroshot_top1" in last and not any(k.startswith("eval/i2t") for k in last)
    assert "held-out retrieval" not in capsys.readouterr().out

    # The data is checked against its classes when the trainer starts (before the model is
    # built): `moco-mm train` exits 2 with the key.
    from moco_mm.train.cli import main as train_main

    cfg["eval"]["zeroshot"]["classes"] = str(write(tmp_path / "three.txt", "zero\none\ntwo\n"))
    cfg["run"]["output_dir"] = str(tmp_path / "run2")
    assert train_main(["--config", str(write_config(cfg, tmp_path / "c2.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "config error: eval.zeroshot.data: " in err
    assert "7 class sub-folders, but" in err and "three.txt lists 3" in err
    assert not (tmp_path / "run2").exists()
