"""Start from a CLIP, hand back a CLIP (model.init_from, export --format open_clip | hf).

The sources are small CLIPs built offline with random weights and saved by their own
libraries (tests/clip_sources.py); nothing is downloaded. Every comparison is against the
other library's own model and tokenizer, loaded from what it saved or what we wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from moco_mm.config import ConfigError, ModelConfig, QueueConfig, load_config, validate_model
from moco_mm.model import DualQueueMoCo, load_tokenizer, resolve_init
from moco_mm.search import Encoder
from moco_mm.search.clip_export import (
    _key_table,
    convert_state,
    export_clip,
    hf_to_open_clip_config,
    open_clip_to_hf_config,
)
from moco_mm.search.export import ExportError, export_encoders
from tests.clip_sources import IMAGE, OPEN_CLIP_CFG, make_hf_clip_dir, make_open_clip_dir
from tests.trainrun import ROOT, tiny_train_config, write_config

open_clip = pytest.importorskip("open_clip")

CAPTIONS = ["a red circle on the left", "Two dogs, playing in the snow!", "x", "it's a café at night"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_sources")
    # OpenAI's CLIPs use QuickGELU: the activation must survive every conversion.
    return make_open_clip_dir(root, quick_gelu=True), make_hf_clip_dir(root)


def _start(init_from: str, max_length: int, **over) -> tuple[DualQueueMoCo, object]:
    m = ModelConfig(init_from=init_from, **over)
    m.text.max_length = max_length
    model = DualQueueMoCo(m, QueueConfig(size=16)).eval()
    return model, load_tokenizer(m.text)


def _ours(model, tok, pixels, texts, max_length, towers="query"):
    t = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    tw = getattr(model, towers)
    with torch.no_grad():
        return tw.image(pixels), tw.text(t["input_ids"], t["attention_mask"])


def _features(out):
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


@pytest.mark.parametrize("max_length", [77, 16])
def test_open_clip_start_embeds_as_open_clip(sources, max_length):
    src = sources[0]
    model, tok = _start(str(src), max_length)
    oc, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(src))
    oc.eval()
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_img = oc.encode_image(pixels, normalize=True)
        want_txt = oc.encode_text(open_clip.get_tokenizer("local-dir:" + str(src))(CAPTIONS), normalize=True)
    for towers in ("query", "key"):  # the key towers start as the CLIP too
        img, txt = _ours(model, tok, pixels, CAPTIONS, max_length, towers)
        assert (img - want_img).abs().max() <= 1e-5
        assert (txt - want_txt).abs().max() <= 1e-5
    # the temperature is the CLIP's: 1 / exp(logit_scale)
    assert model.query.temperature().item() == pytest.approx(1.0 / oc.logit_scale.exp().item(), rel=1e-6)
    # our tokenizer gives OpenCLIP's ids (it pads with <|endoftext|>, OpenCLIP with 0)
    ours = tok(CAPTIONS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    theirs = open_clip.tokenize(CAPTIONS)
    real = ours["attention_mask"].bool()
    assert torch.equal(ours["input_ids"][real], theirs[real]) and (theirs[~real] == 0).all()
    assert model.cfg.embed_dim == OPEN_CLIP_CFG["embed_dim"] and model.query.image.interpolation == "bicubic"


def test_open_clip_name_with_a_weights_file(sources, tmp_path):
    """open_clip:MODEL_NAME + model.init_checkpoint: a registered architecture and a
    training-style checkpoint (a pickle with state_dict and 'module.' prefixes)."""
    src = sources[0]
    cfg_file = tmp_path / "moco-mm-test-clip.json"
    cfg_file.write_text(json.dumps(dict(OPEN_CLIP_CFG, quick_gelu=True)))
    open_clip.add_model_config(cfg_file)
    state = safetensors.torch.load_file(src / "open_clip_model.safetensors")
    ckpt = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, ckpt)
    by_name, tok = _start("open_clip:moco-mm-test-clip", 16, init_checkpoint=str(ckpt))
    by_dir, _ = _start(str(src), 16)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    for a, b in zip(_ours(by_name, tok, pixels, CAPTIONS, 16), _ours(by_dir, tok, pixels, CAPTIONS, 16)):
        assert torch.equal(a, b)


def test_hf_clip_start_embeds_as_transformers(sources):
    from transformers import CLIPModel

    src = sources[1]
    model, tok = _start(str(src), 20)
    hf = CLIPModel.from_pretrained(src).eval()
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    t = tok(CAPTIONS, padding="max_length", truncation=True, max_length=20, return_tensors="pt")
    with torch.no_grad():
        want_img = _features(hf.get_image_features(pixel_values=pixels))
        want_txt = _features(hf.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]))
    for towers in ("query", "key"):
        img, txt = _ours(model, tok, pixels, CAPTIONS, 20, towers)
        assert (img - want_img).abs().max() <= 1e-5 and (txt - want_txt).abs().max() <= 1e-5
    assert model.query.temperature().item() == pytest.approx(1.0 / hf.logit_scale.exp().item(), rel=1e-6)
    assert model.cfg.text.tokenizer == str(src)


def test_hf_hub_name_is_read_from_the_local_cache_only(sources, tmp_path, monkeypatch):
    """A hub name resolves to its snapshot in the Hugging Face cache (the layout
    huggingface_hub writes: refs/main -> snapshots/<commit>/), never to a download."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    shutil.copytree(sources[1], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    m = ModelConfig(init_from="hf-hub:someone/tiny-clip")
    src = resolve_init(m)
    assert src.kind == "hf" and src.weights == str(repo / "snapshots" / ("0" * 40))
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        resolve_init(ModelConfig(init_from="hf-hub:someone/other-clip"))


def test_bad_sources_are_refused_with_the_key(sources, tmp_path):
    src = sources[0]
    cases = []

    def refused(m: ModelConfig, *words: str):
        with pytest.raises(ConfigError) as e:
            validate_model(m)
            resolve_init(m)
        cases.append(str(e.value))
        for w in words:
            assert w in str(e.value), str(e.value)

    refused(ModelConfig(init_checkpoint="x.pt"), "model.init_checkpoint", "open_clip:")
    refused(ModelConfig(init_from="open_clip:ViT-B-32"), "model.init_checkpoint", "nothing is downloaded")
    refused(ModelConfig(init_from="open_clip:ViT-B-33", init_checkpoint=str(src / "open_clip_model.safetensors")),
            "model.init_from", "ViT-B-32")
    refused(ModelConfig(init_from="open_clip:ViT-B-32", init_checkpoint=str(tmp_path / "missing.pt")),
            "model.init_checkpoint", "does not exist")
    refused(ModelConfig(init_from=str(tmp_path / "nowhere")), "model.init_from", "neither a directory")
    refused(ModelConfig(init_from=str(tmp_path)), "model.init_from", "open_clip_config.json")
    refused(ModelConfig(init_from="hf-hub:nobody/not-cached-clip"), "not in the local Hugging Face cache")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    refused(ModelConfig(init_from=str(bert)), "'bert' model", "clip")
    too_long = ModelConfig(init_from=str(src))
    too_long.text.max_length = 78
    refused(too_long, "model.text.max_length", "77")
    for field, value, why in (("text_cfg", {"hf_model_name": "xlm-roberta-base"}, "Hugging Face model"),
                              ("text_cfg", {"no_causal_mask": True}, "reads padding"),
                              ("text_cfg", {"pool_type": "last"}, "reads padding")):
        d = tmp_path / f"bad_{len(cases)}"
        d.mkdir()
        cfg = json.loads((src / "open_clip_config.json").read_text())
        cfg["model_cfg"][field].update(value)
        (d / "open_clip_config.json").write_text(json.dumps(cfg))
        (d / "open_clip_model.safetensors").write_bytes(b"")
        refused(ModelConfig(init_from=str(d)), "cannot start from this OpenCLIP model exactly", why)


def test_init_clip_writes_what_open_clip_and_init_from_load(tmp_path):
    from moco_mm.cli import main
    from moco_mm.model.cli import DEMO_CLIP

    out = tmp_path / "demo-clip"
    assert main(["init-clip", "--out", str(out)]) == 0
    assert main(["init-clip", "--out", str(out)]) == 2  # never over a model
    oc = open_clip.create_model("local-dir:" + str(out)).eval()
    model, tok = _start(str(out), 24)
    size = DEMO_CLIP["vision_cfg"]["image_size"]
    pixels = torch.randn(2, 3, size, size)
    img, _ = _ours(model, tok, pixels, CAPTIONS, 24)
    with torch.no_grad():
        assert (img - oc.encode_image(pixels, normalize=True)).abs().max() <= 1e-5


def test_conversion_table_round_trips_and_refuses_what_it_cannot_hold():
    cfg = open_clip_to_hf_config(dict(OPEN_CLIP_CFG, quick_gelu=True))
    assert cfg["vision_config"]["hidden_act"] == cfg["text_config"]["hidden_act"] == "quick_gelu"
    back = hf_to_open_clip_config({"model_type": "clip", **cfg})
    assert back["vision_cfg"]["head_width"] == OPEN_CLIP_CFG["vision_cfg"]["head_width"] and back["quick_gelu"]
    from open_clip.model import CLIP

    state = CLIP(**OPEN_CLIP_CFG).state_dict()
    table = _key_table(2, 2)
    again = convert_state(convert_state(state, table, to_hf=True), table, to_hf=False)
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    with pytest.raises(ExportError, match="have no place"):
        convert_state({**state, "visual.extra": torch.zeros(1)}, table, to_hf=True)
    for bad, why in (({"vision_cfg": {"ls_init_value": 1e-5}}, "ls_init_value"),
                     ({"vision_cfg": {"layers": [1, 1, 1, 1]}}, "ModifiedResNet"),
                     ({"text_cfg": {"proj_bias": True}}, "proj_bias")):
        cfg = json.loads(json.dumps(OPEN_CLIP_CFG))
        for k, v in bad.items():
            cfg[k].update(v)
        with pytest.raises(ExportError, match=why):
            open_clip_to_hf_config(cfg)


# ---------------------------------------------------------------------------------------
# Train from a CLIP, hand it back: real runs, every format
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_runs(tmp_path_factory, sources, demo):
    """Two short real runs, started together: from the OpenCLIP directory (text tower
    checkpointed, image tower training only its last block) and from the Hugging Face one
    (gradient accumulation)."""
    root = tmp_path_factory.mktemp("clip_runs")
    runs, procs = {}, []
    for name, src, over in (("open_clip", sources[0], {"image": {"trainable_blocks": 1},
                                                         "text": {"max_length": 16, "grad_checkpointing": True}}),
                            ("hf", sources[1], {"text": {"max_length": 16}})):
        cfg = tiny_train_config(demo, root / name, run={"steps": 3, "log_every": 1}, checkpoint={"every": 3})
        cfg["model"] = {"init_from": str(src), "momentum": 0.9, **over}
        if name == "hf":
            cfg["optim"]["accum_steps"] = 2
            cfg["data"]["batch_size"] = 8
        runs[name] = root / name
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "moco_mm.train", "--config", str(write_config(cfg, root / f"{name}.yaml")),
             "logging.progress=false"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    return runs, demo


def _demo_pixels(enc: Encoder, demo: Path) -> torch.Tensor:
    """Real held-out demo images through the export's own eval transform (bicubic)."""
    from moco_mm.data import ShardSource, iter_eval_batches

    batch = next(iter_eval_batches(ShardSource.from_spec(str(demo / "val" / "manifest.json")), batch_size=4,
                                   transform=enc.transform, tokenizer=enc.tokenizer, max_length=enc.max_length))
    return enc.normalize(batch["image"])


@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_trained_clip_hands_back_in_every_format(clip_runs, sources, kind, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    runs, demo = clip_runs
    run = runs[kind]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 3
    ours = export_encoders(tmp_path / "ours", run_dir=run)
    enc = Encoder.from_export(ours.out)
    pixels = _demo_pixels(enc, demo)
    want_img = enc.image_features(pixels)
    want_txt = torch.from_numpy(enc.encode_texts(CAPTIONS[:2]))
    start, _ = _start(str(sources[0 if kind == "open_clip" else 1]), 16)
    with torch.no_grad():
        assert (start.query.image(pixels) - want_img).abs().max() > 1e-4, "the run did not train the image tower"

    res = export_clip(tmp_path / "oc", "open_clip", run_dir=run)
    assert res.max_abs_diff <= 1e-5
    oc = open_clip.create_model("local-dir:" + str(res.out)).eval()
    pre = json.loads((res.out / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert pre["interpolation"] == "bicubic" and pre["mean"] == list(enc.spec.image.mean)
    with torch.no_grad():
        assert (oc.encode_image(pixels, normalize=True) - want_img).abs().max() <= 1e-5
        tokens = open_clip.get_tokenizer("local-dir:" + str(res.out))(CAPTIONS[:2])
        assert (oc.encode_text(tokens, normalize=True) - want_txt).abs().max() <= 1e-5

    res = export_clip(tmp_path / "hf", "hf", run_dir=run)
    hf = AutoModel.from_pretrained(str(res.out)).eval()
    t = AutoTokenizer.from_pretrained(str(res.out))(CAPTIONS[:2], padding="max_length", truncation=True,
                                                    return_tensors="pt")
    with torch.no_grad():
        assert (_features(hf.get_image_features(pixel_values=pixels)) - want_img).abs().max() <= 1e-5
        assert (_features(hf.get_text_features(**t)) - want_txt).abs().max() <= 1e-5
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(res.out))
    assert proc.crop_size["height"] == IMAGE and list(proc.image_mean) == list(enc.spec.image.mean)
    # the temperature went both ways: trained value in, logit_scale out
    log_t = safetensors.torch.load_file(sorted((run / "checkpoints").glob("step_*"))[-1] / "model.safetensors")[
        "query.log_temperature"]
    assert hf.logit_scale.item() == pytest.approx(-float(log_t), abs=1e-6)
    assert oc.logit_scale.item() == pytest.approx(-float(log_t), abs=1e-6)


def test_frozen_blocks_stay_the_clips(clip_runs, sources):
    runs, _ = clip_runs
    tensors = safetensors.torch.load_file(sorted((runs["open_clip"] / "checkpoints").glob("step_*"))[-1]
                                          / "model.safetensors")
    start = safetensors.torch.load_file(sources[0] / "open_clip_model.safetensors")
    first = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    last = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    assert torch.equal(tensors["query.image.backbone." + first.removeprefix("visual.")], start[first])
    assert not torch.equal(tensors["query.image.backbone." + last.removeprefix("visual.")], start[last])


def test_finetune_recipe_config_fits_as_stated():
    from moco_mm import plan as memory
    from tests.test_plan_memory import GIB, _planner_line

    path = ROOT / "configs" / "finetune-openclip-vitb32-queue.yaml"
    cfg = load_config(path)
    p = memory.plan(cfg, "a100-40gb", world_size=4)  # planned without the weights file
    assert p.fits and cfg.model.embed_dim == 512 and cfg.model.image.image_size == 224
    stated = _planner_line(path)
    assert stated["peak"] == pytest.approx(p.peak_bytes / GIB, abs=0.006)
    assert stated["required"] == pytest.approx(p.required_bytes / GIB, abs=0.006)


def test_vision_text_dual_encoder_start_and_hand_back(tmp_path, tokenizer):
    """A VisionTextDualEncoderModel (a CLIP vision model + a BERT, projections without
    bias) starts exactly, and a run from it goes back with --format hf (not open_clip)."""
    from transformers import (
        BertConfig,
        CLIPImageProcessor,
        CLIPVisionConfig,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    from moco_mm.config import Config, dump_config
    from moco_mm.train.checkpoint import CheckpointManager

    src = tmp_path / "vtde"
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE, patch_size=8)
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=40)
    VisionTextDualEncoderModel(config=VisionTextDualEncoderConfig.from_vision_text_configs(
        vision, text, projection_dim=16)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(src)

    model, tok = _start(str(src), 16)
    hf = VisionTextDualEncoderModel.from_pretrained(src).eval()
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    t = tok(CAPTIONS[:2], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        img, txt = _ours(model, tok, pixels, CAPTIONS[:2], 16)
        assert (img - _features(hf.get_image_features(pixel_values=pixels))).abs().max() <= 1e-5
        assert (txt - _features(hf.get_text_features(**t))).abs().max() <= 1e-5
        model.query.image.backbone.projection.weight.mul_(1.5)  # "trained": no longer the start

    # A run directory as the trainer leaves it: the resolved config and a checkpoint.
    run = tmp_path / "run"
    cfg = Config()
    cfg.model = model.cfg
    cfg.queue.size = 16
    run.mkdir()
    dump_config(cfg, run / "config.yaml")
    CheckpointManager(run / "checkpoints").save(7, model.state_dict(), {"step": 7})
    res = export_clip(tmp_path / "hf", "hf", run_dir=run)
    back = VisionTextDualEncoderModel.from_pretrained(res.out).eval()
    with torch.no_grad():
        assert (_features(back.get_image_features(pixel_values=pixels)) - model.query.image(pixels)).abs().max() <= 1e-5
    with pytest.raises(ExportError, match="VisionTextDualEncoderModel"):
        export_clip(tmp_path / "oc", "open_clip", run_dir=run)
