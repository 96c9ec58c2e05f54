"""Export: a reload embeds exactly like the training model, key towers, verified ONNX,
checksums, atomicity and the CLI's errors.

One short real training run on the demo shapes is shared with tests/test_search.py
(`trained_run` / `query_export` cache their results for the whole session).
"""

from __future__ import annotations

import json
import pickle
import shutil
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moco_mm.config import dump_config, load_config
from moco_mm.data import build_transforms
from moco_mm.model import DualQueueMoCo, load_tokenizer
from moco_mm.search import Encoder, iter_items
from moco_mm.search import export as ex
from moco_mm.train.checkpoint import CheckpointManager
from tests.trainrun import build_demo, run, tiny_train_config, train_cmd, write_config

STEPS = 64


@dataclass
class TrainedRun:
    demo: Path  # build_demo output: train/, val/, tokenizer/
    run_dir: Path
    checkpoint: Path


_SESSION: dict[str, object] = {}


def trained_run(tmp_path_factory) -> TrainedRun:
    """A real `python -m moco_mm.train` run on the 32 px demo, once per session (~20 s).

    Batch 32 with in-batch negatives only (queue off): with a queue, the keys of the
    first steps are stale for a run this short and retrieval stays near chance. The key
    towers are still momentum copies (m = 0.9), so they differ from the query towers.
    Held-out text->image R@1 after these 64 steps was 9-18 % over seeds 3, 4, 7, 11
    (chance 1.6 %), R@10 50-74 % (chance 15.6 %).
    """
    if "run" not in _SESSION:
        base = tmp_path_factory.mktemp("trained")
        demo = build_demo(base / "demo")
        cfg = tiny_train_config(demo, base / "run", run={"steps": STEPS, "log_every": 16},
                                queue={"enabled": False}, optim={"lr": 8e-4, "warmup_steps": 6},
                                checkpoint={"every": STEPS, "keep": 1}, logging={"progress": False})
        cfg["data"]["batch_size"] = 32
        run(train_cmd(write_config(cfg, base / "train.yaml")))
        ckpt = CheckpointManager(base / "run" / "checkpoints").latest()
        assert ckpt is not None and CheckpointManager.step_of(ckpt) == STEPS
        _SESSION["run"] = TrainedRun(demo, base / "run", ckpt)
    return _SESSION["run"]  # type: ignore[return-value]


def query_export(tmp_path_factory) -> Path:
    """The query towers of `trained_run`, exported with the CLI, ONNX included."""
    if "export" not in _SESSION:
        tr = trained_run(tmp_path_factory)
        out = tmp_path_factory.mktemp("exports") / "query"
        assert tool("export").main(["--run", str(tr.run_dir), "--out", str(out), "--onnx"]) == 0
        _SESSION["export"] = out
    return _SESSION["export"]  # type: ignore[return-value]


def tool(name: str):
    """The program `moco-mm NAME` (NAME with "_" for "-"), called in-process: `.main(argv)`."""
    from moco_mm.cli import main

    return types.SimpleNamespace(main=lambda argv: main([name.replace("_", "-"), *argv]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainedRun:
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return query_export(tmp_path_factory)


@pytest.fixture(scope="module")
def training_model(trained) -> tuple[DualQueueMoCo, object]:
    """The DualQueueMoCo the trainer builds, with the checkpoint loaded, in eval mode."""
    cfg = load_config(trained.run_dir / "config.yaml")
    tok = load_tokenizer(cfg.model.text)
    model = DualQueueMoCo(cfg.model, cfg.queue, vocab_size=len(tok))
    tensors, _ = CheckpointManager.load(trained.checkpoint)
    model.load_state_dict(tensors)
    return model.eval(), cfg


@pytest.fixture(scope="module")
def samples(trained) -> list:
    items = list(iter_items(trained.demo / "val" / "manifest.json"))[:6]
    return items


def _same_inputs(model, cfg, samples, tok):
    """Preprocessed images and tokens exactly as the trainer's eval builds them."""
    tf = build_transforms(cfg.model.image.image_size, model.query.image.mean, model.query.image.std, train=False)
    pixels = torch.stack([tf(s.image) for s in samples])
    caps = [c for s in samples for c in s.captions]
    t = tok(caps, padding="max_length", truncation=True, max_length=cfg.model.text.max_length, return_tensors="pt")
    return pixels, caps, t["input_ids"].long(), t["attention_mask"].long()


def test_reload_reproduces_training_embeddings(exported, training_model, samples):
    model, cfg = training_model
    enc = Encoder.from_export(exported)
    assert tuple(model.query.image.mean) == tuple(enc.spec.image.mean) == (0.5, 0.5, 0.5)
    pixels, caps, ids, mask = _same_inputs(model, cfg, samples, enc.tokenizer)
    with torch.no_grad():
        want_img = model.query.image(pixels)
        want_txt = model.query.text(ids, mask)
    # Same preprocessed inputs -> bit-identical embeddings.
    assert torch.equal(enc.image_features(pixels), want_img)
    assert torch.equal(enc.text_features(ids, mask), want_txt)
    # The public API (PIL in, numpy out) preprocesses and tokenises like training's eval.
    img = enc.encode_images([s.image for s in samples], batch_size=4)
    txt = enc.encode_texts(caps, batch_size=5)
    assert img.dtype == np.float32 and img.shape == (len(samples), cfg.model.embed_dim)
    assert txt.shape == (len(caps), cfg.model.embed_dim)
    np.testing.assert_allclose(img, want_img.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(txt, want_txt.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)


def test_export_contents_and_manifest(exported, trained):
    files = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert {"manifest.json", "encoder.json", "image_tower.safetensors", "text_tower.safetensors",
            "text/config.json", "text/tokenizer.json", "image_encoder.onnx", "text_encoder.onnx"} <= files
    manifest = json.loads((exported / "manifest.json").read_text())
    assert set(manifest["files"]) == files - {"manifest.json"}
    assert {"moco_mm", "torch", "timm", "transformers"} <= set(manifest["versions"])
    for rel, info in manifest["files"].items():
        assert info["sha256"] == ex.sha256_file(exported / rel)
    spec = json.loads((exported / "encoder.json").read_text())
    assert spec["embed_dim"] == 32 and spec["towers"] == "query" and spec["source"]["step"] == STEPS
    assert spec["image"]["timm_name"] == "vit_tiny_patch16_224"
    assert spec["image"]["timm_kwargs"] == {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
                                            "img_size": 32}
    assert spec["image"]["image_size"] == 32 and spec["image"]["resize"] == ex.RESIZE_MODE
    assert spec["text"]["pooling"] == "mean" and spec["text"]["max_length"] == 16
    # The tower files are the checkpoint's query tensors under the tower's own names.
    tensors, _ = CheckpointManager.load(trained.checkpoint)
    image = load_file(exported / "image_tower.safetensors")
    assert set(image) == {k[len("query.image."):] for k in tensors if k.startswith("query.image.")}
    assert all(torch.equal(v, tensors["query.image." + k]) for k, v in image.items())


def test_loading_runs_no_pickle_and_no_training_config(exported, tmp_path, monkeypatch):
    """The export alone rebuilds the towers: moved elsewhere, with every unpickler
    disabled, and timm asked for a random-init, classifier-free model."""
    moved = shutil.copytree(exported, tmp_path / "moved")

    def refuse(*a, **k):
        raise AssertionError("loading an export must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    import timm

    calls = []
    real_create = timm.create_model

    def spy(name, **kwargs):
        calls.append((name, kwargs))
        return real_create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    enc = Encoder.from_export(moved)
    assert calls and calls[0][0] == "vit_tiny_patch16_224"
    assert calls[0][1]["pretrained"] is False and calls[0][1]["num_classes"] == 0
    assert enc.encode_texts(["a red circle"]).shape == (1, 32)


def test_onnx_matches_pytorch(exported, samples):
    ort = pytest.importorskip("onnxruntime")
    enc = Encoder.from_export(exported)
    spec = json.loads((exported / "encoder.json").read_text())
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        assert spec["onnx"][name]["max_abs_diff"] <= 1e-4
    img = ort.InferenceSession(str(exported / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in img.get_inputs()] == ["pixel_values"]
    assert [o.name for o in img.get_outputs()] == ["embedding"]
    pixels = enc.preprocess([s.image for s in samples[:4]])  # a batch size the export did not check
    got = img.run(None, {"pixel_values": pixels.numpy()})[0]
    assert np.abs(got - enc.image_features(pixels).numpy()).max() <= 1e-4

    txt = ort.InferenceSession(str(exported / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in txt.get_inputs()] == ["input_ids", "attention_mask"]
    caps = [c for s in samples for c in s.captions]
    for length in (7, 16):  # dynamic length: shorter than max_length, and max_length
        t = enc.tokenizer(caps, padding="max_length", truncation=True, max_length=length, return_tensors="np")
        ids, mask = t["input_ids"].astype(np.int64), t["attention_mask"].astype(np.int64)
        got = txt.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        want = enc.text_features(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        assert got.shape == (len(caps), 32)
        assert np.abs(got - want).max() <= 1e-4


# 300 words: far more tokens than any max_length, so truncation decides the length.
LONG_CAPTION = " ".join(("a large red circle above a small blue square and".split() * 30)[:300])


def test_exported_tokenizer_truncates_to_max_length(exported):
    """The export's tokenizer says how long a sequence the text tower takes: its
    model_max_length is the training max_length, so truncation=True alone never yields a
    sequence the position embeddings cannot hold (the demo tokenizer says 64, BERT 512)."""
    from transformers import AutoTokenizer

    max_length = json.loads((exported / "encoder.json").read_text())["text"]["max_length"]
    assert max_length == 16
    saved = json.loads((exported / "text" / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == max_length
    tok = AutoTokenizer.from_pretrained(str(exported / "text"))
    assert tok.model_max_length == max_length
    assert len(LONG_CAPTION.split()) == 300
    assert len(tok(LONG_CAPTION, truncation=True)["input_ids"]) == max_length
    assert len(tok([LONG_CAPTION, "a red circle"], truncation=True)["input_ids"][0]) == max_length


def test_onnx_runs_the_longest_sequence_the_exported_tokenizer_gives(exported):
    """A user of text_encoder.onnx tokenising with the exported tokenizer and truncation=True
    gets max_length tokens; the graph runs them and agrees with Encoder.encode_texts (and
    the PyTorch tower) within the export's tolerance."""
    ort = pytest.importorskip("onnxruntime")
    from transformers import AutoTokenizer

    spec = json.loads((exported / "encoder.json").read_text())
    max_length, atol = spec["text"]["max_length"], spec["onnx"]["text_encoder.onnx"]["atol"]
    tok = AutoTokenizer.from_pretrained(str(exported / "text"))
    texts = [LONG_CAPTION, "a red circle", " ".join(reversed(LONG_CAPTION.split()))]
    t = tok(texts, padding="longest", truncation=True, return_tensors="np")
    ids, mask = t["input_ids"].astype(np.int64), t["attention_mask"].astype(np.int64)
    assert ids.shape == (3, max_length) and mask[:, -1].tolist() == [1, 0, 1]
    txt = ort.InferenceSession(str(exported / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = txt.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    enc = Encoder.from_export(exported)
    want = enc.text_features(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert got.shape == (3, 32) and np.abs(got - want).max() <= atol
    # encode_texts pads to max_length instead of the batch's longest: same embeddings.
    assert np.abs(got - enc.encode_texts(texts)).max() <= atol


def test_max_length_beyond_the_position_embeddings_is_refused(trained, tmp_path, capsys):
    """A run whose model.text.max_length exceeds the text backbone's positions (here a
    config edited after training) cannot be exported: the error names both numbers."""
    run_dir = shutil.copytree(trained.run_dir, tmp_path / "run")
    cfg = load_config(run_dir / "config.yaml")
    positions = cfg.model.text.overrides["max_position_embeddings"]
    assert positions == 32
    cfg.model.text.max_length = positions + 8
    dump_config(cfg, run_dir / "config.yaml")
    out = tmp_path / "exp"
    assert tool("export").main(["--run", str(run_dir), "--out", str(out), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert "model.text.max_length 40" in err and "max_position_embeddings 32" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # At exactly the number of positions the export goes through, and says so.
    cfg.model.text.max_length = positions
    dump_config(cfg, run_dir / "config.yaml")
    ex.export_encoders(out, run_dir=run_dir)
    assert json.loads((out / "text" / "tokenizer_config.json").read_text())["model_max_length"] == positions
    assert Encoder.from_export(out).tokenizer.model_max_length == positions


class _Branchy(torch.nn.Module):
    """Python control flow on a value: tracing bakes in the branch of the example."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2.0
        return x - 1.0


def test_onnx_mismatch_is_refused_and_removed(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "branchy.onnx"
    pos, neg = torch.ones(2, 3), torch.full((4, 3), -3.0)  # traced: 2x; eager: x - 1
    with pytest.raises(ex.ExportError, match="differs from PyTorch by .* more than the allowed"):
        ex.export_onnx(_Branchy(), path, (pos,), ["x"], {"x": {0: "batch"}, "embedding": {0: "batch"}},
                       checks=[(pos,), (neg,)])
    assert not path.exists()
    # The same graph passes when the checks stay on the traced branch.
    check = ex.export_onnx(_Branchy(), path, (pos,), ["x"], {"x": {0: "batch"}, "embedding": {0: "batch"}},
                           checks=[(pos,), (2 * torch.ones(5, 3),)])
    assert path.exists() and check.max_abs_diff == 0.0


def test_failed_onnx_leaves_no_export(trained, tmp_path, monkeypatch, capsys):
    """A refused ONNX graph fails the whole export atomically: no out dir, no temp dirs."""
    def mismatch(module, path, *args, **kwargs):
        path.write_bytes(b"half-written graph")
        raise ex.ExportError(f"{path.name}: ONNX differs from PyTorch by 0.5")

    monkeypatch.setattr(ex, "export_onnx", mismatch)
    out = tmp_path / "exp"
    assert tool("export").main(["--run", str(trained.run_dir), "--out", str(out), "--onnx"]) == 2
    assert "ONNX differs from PyTorch" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_key_towers(trained, training_model, samples, tmp_path):
    model, cfg = training_model
    out = tmp_path / "key"
    assert tool("export").main(["--checkpoint", str(trained.checkpoint), "--out", str(out), "--towers", "key"]) == 0
    tensors, _ = CheckpointManager.load(trained.checkpoint)
    saved = load_file(out / "text_tower.safetensors")
    assert all(torch.equal(v, tensors["key.text." + k]) for k, v in saved.items())
    # m = 0.9 over 64 steps: the momentum copies really differ from the query towers.
    assert any(not torch.equal(v, tensors["query.text." + k]) for k, v in saved.items())
    enc = Encoder.from_export(out)
    assert enc.spec.towers == "key"
    pixels, _, ids, mask = _same_inputs(model, cfg, samples, enc.tokenizer)
    with torch.no_grad():
        assert torch.equal(enc.image_features(pixels), model.key.image(pixels))
        assert torch.equal(enc.text_features(ids, mask), model.key.text(ids, mask))


def test_corrupted_export_is_refused(exported, tmp_path):
    bad = shutil.copytree(exported, tmp_path / "bad")
    weights = bad / "image_tower.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in a weight: same size, valid safetensors
    weights.write_bytes(bytes(data))
    with pytest.raises(ex.ExportError, match="image_tower.safetensors: sha256 differs"):
        Encoder.from_export(bad)
    weights.write_bytes(bytes(data[:-8]))
    with pytest.raises(ex.ExportError, match="bytes, manifest.json says"):
        Encoder.from_export(bad)
    shutil.copy(exported / "image_tower.safetensors", weights)
    (bad / "text" / "vocab.txt").write_text("[PAD]\n")  # would change the tokenizer
    with pytest.raises(ex.ExportError, match="text/vocab.txt .* not listed"):
        Encoder.from_export(bad)
    (bad / "text" / "vocab.txt").unlink()
    Encoder.from_export(bad)  # restored: loads again
    (bad / "manifest.json").unlink()
    with pytest.raises(ex.ExportError, match="no manifest.json"):
        Encoder.from_export(bad)


def test_cli_source_errors(trained, tmp_path, capsys):
    export = tool("export")
    lone = tmp_path / "lone" / "step_00000001"
    shutil.copytree(trained.checkpoint, lone)
    assert export.main(["--checkpoint", str(lone), "--out", str(tmp_path / "o1")]) == 2
    assert "no config.yaml two levels up" in capsys.readouterr().err
    assert export.main(["--run", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    assert "no config.yaml: not a run directory" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    assert export.main(["--run", str(trained.run_dir), "--out", str(busy)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (busy / "x").read_text() == "keep me"
    # A timm + BERT run is not a CLIP: handing it back as one is refused with the reason.
    for fmt, why in (("open_clip", "has no bias"), ("hf", "timm image tower")):
        assert export.main(["--run", str(trained.run_dir), "--out", str(tmp_path / fmt), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert why in err and "--format moco_mm" in err, err
        assert not (tmp_path / fmt).exists()
    with pytest.raises(SystemExit, match="2"):  # argparse: --onnx goes with our format only
        export.main(["--run", str(trained.run_dir), "--out", str(tmp_path / "x"), "--format", "hf", "--onnx"])
    assert "--onnx goes with --format moco_mm" in capsys.readouterr().err


def test_batchnorm_key_tower_exports_with_running_stats(tokenizer, tmp_path):
    """A BatchNorm key tower normalises with batch statistics while training; exported, it
    uses the running statistics copied from the query tower, so one image embeds the same
    alone or in a batch (and the ONNX graph agrees)."""
    import copy

    from moco_mm.config import Config, dump_config
    from tests.tiny import queue_config, tiny_batch, tiny_bn_model_config

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    cfg = Config()
    cfg.model = tiny_bn_model_config()
    cfg.model.text.tokenizer = str(tmp_path / "tok")
    del cfg.model.text.overrides["vocab_size"]  # the trainer sizes it to the tokenizer
    cfg.queue = queue_config()
    run = tmp_path / "run"
    run.mkdir()
    dump_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = DualQueueMoCo(cfg.model, cfg.queue, vocab_size=len(tokenizer))
    with torch.no_grad():
        model.query.image(tiny_batch(8, 0)["image"] * 3 + 1)  # move the running statistics
        for p in model.query.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.momentum_update(0.5)  # key = mean of old and new weights, running stats copied
    CheckpointManager(run / "checkpoints").save(1, model.state_dict(), {"step": 1})

    res = ex.export_encoders(tmp_path / "out", run_dir=run, towers="key", onnx=True)
    assert all(c.max_abs_diff <= 1e-4 for c in res.onnx.values())
    enc = Encoder.from_export(tmp_path / "out")
    reference = copy.deepcopy(model.key.image)
    for m in reference.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = True
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = reference.eval()(x)
    got = enc.image_features(x)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert torch.allclose(enc.image_features(x[:1]), got[:1], atol=1e-6, rtol=0)


def test_clip_mode_run_exports_its_towers_and_refuses_key_towers(tokenizer, tmp_path):
    """A model.momentum_encoder: false checkpoint holds only query towers: they export and
    reload to the same embeddings; asking for key towers names the reason."""
    from moco_mm.config import Config, QueueConfig, dump_config
    from tests.tiny import tiny_batch, tiny_model_config

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    cfg = Config()
    cfg.model = tiny_model_config(momentum_encoder=False)
    cfg.model.text.tokenizer = str(tmp_path / "tok")
    del cfg.model.text.overrides["vocab_size"]
    cfg.queue = QueueConfig(enabled=False)
    run = tmp_path / "run"
    run.mkdir()
    dump_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = DualQueueMoCo(cfg.model, cfg.queue, vocab_size=len(tokenizer))
    CheckpointManager(run / "checkpoints").save(1, model.state_dict(), {"step": 1})

    with pytest.raises(ex.ExportError, match="momentum_encoder"):
        ex.export_encoders(tmp_path / "key", run_dir=run, towers="key")
    assert not (tmp_path / "key").exists()
    ex.export_encoders(tmp_path / "out", run_dir=run)
    enc = Encoder.from_export(tmp_path / "out")
    x = tiny_batch(3, 1)["image"]
    with torch.no_grad():
        want = model.query.eval().image(x)
    assert torch.allclose(enc.image_features(x), want, atol=1e-6, rtol=0)
