"""A skipped non-finite step changes nothing but the step counter and the data position:
weights, key towers, BatchNorm statistics, queues and optimizer state stay exactly as they
were — for a LayerNorm (ViT) and a BatchNorm (ResNet) image tower, with accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from moco_mm import distributed as D
from moco_mm.config import load_config
from moco_mm.train import Trainer
from tests.trainrun import tiny_train_config, write_config


def _trainer(demo, tmp_path, image: dict) -> Trainer:
    cfg = tiny_train_config(demo, tmp_path / "run", data={"batch_size": 8, "workers": 0},
                            optim={"accum_steps": 2, "warmup_steps": 1}, queue={"size": 40},
                            model={"image": image})
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Trainer(load_config(write_config(cfg, tmp_path / "c.yaml")), D.init_distributed("cpu"))


def _state(t: Trainer) -> dict:
    opt = t.optimizer.state_dict()
    flat = {f"model.{k}": v.clone() for k, v in t.model.state_dict().items()}
    for i, st in opt["state"].items():
        for k, v in st.items():
            flat[f"opt.{i}.{k}"] = v.clone() if torch.is_tensor(v) else torch.tensor(v)
    return flat


def _poisoned(batches, which: int):
    """The trainer's own batches, with NaN pixels in micro-batch `which` of the next step."""
    for i, batch in enumerate(batches):
        if i == which:
            # float images reach the towers as already normalised: one NaN pixel among them
            batch = dict(batch, image=batch["image"].float())
            batch["image"][0, 0, 0, 0] = float("nan")
        yield batch


VIT = {"name": "vit_tiny_patch16_224", "image_size": 32,
       "kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}}
RESNET = {"name": "resnet10t", "image_size": 32}


@pytest.mark.parametrize("image", [VIT, RESNET], ids=["vit", "batchnorm"])
def test_a_skipped_step_leaves_the_state_exactly_as_it_was(demo, tmp_path, image):
    t = _trainer(demo, tmp_path, image)
    batches = t._batches()
    assert t.train_step(batches)["finite"]  # one good step: queues, optimizer state, EMA exist
    before = _state(t)
    if image is RESNET:
        assert any(k.endswith("running_mean") for k in before)
    loader_step = t.loader_state.step
    # NaN in the SECOND micro-batch: the first one's forward, backward and BatchNorm
    # update already happened when the step is found non-finite.
    m = t.train_step(_poisoned(batches, which=1))
    assert not m["finite"] and math.isnan(m["loss"])
    after = _state(t)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"a skipped step changed {changed[:8]}"
    assert t.step == 2 and t.loader_state.step == loader_step + 2  # both micro-batches consumed
    assert t.counters.bad_steps == 1 and t.counters.consecutive_bad == 1
    # and training goes on from the untouched state
    m = t.train_step(batches)
    assert m["finite"] and t.counters.consecutive_bad == 0
    for name, v in t.model.state_dict().items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), name
