"""The same optimizer steps under run.parallel ddp and fsdp, in one torchrun (gloo); dump
what tests/test_fsdp.py compares.

For each variant (--variants NAME:STEPS,...) and each parallel mode, from the same
initial weights and the same per-rank batches: STEPS TrainSteps (dropout on, grad
clipping on). Rank 0 writes OUT/<variant>.json: {"ddp": {"loss": [...], "grad_norm":
[...], "finite": [...]}, "fsdp": {...}} and OUT/<variant>_<mode>.safetensors (the whole
model state after the steps, FSDP shards gathered). Then, on the FSDP model of the last
variant:

- momentum.json: the sharded EMA (each rank lerps its local shards) against the same lerp
  on whole tensors: {"max_abs_diff": ..., "n": tensors compared};
- skip.json: one step whose loss is NaN on rank 1 only: {"finite": [rank0, rank1],
  "unchanged": the whole model state equal before and after};
- init.json: the DDP run's whole tower weights loaded into it (checkpoint.init_weights'
  `load_whole`): {"n": tensors, "equal": all gathered back exactly}.

Each mode's log also has "state_bytes": rank 0's bytes of weights and AdamW states.
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from moco_mm import distributed as D
from moco_mm.config import Config, ImageTowerConfig, ModelConfig, QueueConfig, TextTowerConfig
from moco_mm.model import DualQueueMoCo
from moco_mm.train.parallel import load_whole
from moco_mm.train.step import TrainStep
from tests.tiny import VOCAB, tiny_batch

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--batch", type=int, default=6)  # per rank
p.add_argument("--variants", default="clip:3,accum_bn:2,bf16:2,demo:10")
args = p.parse_args()
out_dir = Path(args.out)
out_dir.mkdir(parents=True, exist_ok=True)
info = D.init_distributed("cpu")
IMAGE = 32


def demo_towers() -> ModelConfig:
    """configs/demo.yaml's towers (ViT 128 wide, 4 deep; BERT 128 wide, 2 deep), dropout on
    (BERT's default 0.1, drop-path 0.1 in the ViT), at the tests' 32 px and vocabulary."""
    image = ImageTowerConfig(name="vit_tiny_patch16_224", image_size=IMAGE,
                             kwargs=dict(patch_size=8, embed_dim=128, depth=4, num_heads=4, drop_path_rate=0.1))
    text = TextTowerConfig(name="bert", pooling="mean",
                           overrides=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=256, max_position_embeddings=64, vocab_size=VOCAB))
    return ModelConfig(image=image, text=text, embed_dim=64, momentum=0.99)


def config(variant: str, parallel: str, steps: int) -> Config:
    cfg = Config()
    cfg.model = demo_towers()
    cfg.queue = QueueConfig(size=40)
    cfg.run.device, cfg.run.parallel, cfg.run.steps = "cpu", parallel, steps
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip = 1e-3, 2, 1.0
    if variant == "accum_bn":  # Shuffle-BN and BatchNorm statistics; frozen text blocks
        cfg.model.image = ImageTowerConfig(name="resnet10t", image_size=IMAGE)
        cfg.model.text.trainable_blocks = 1
        cfg.optim.accum_steps = 2
    elif variant == "clip":  # the CLIP objective, with gradient checkpointing in both towers
        cfg.model.momentum_encoder = False
        cfg.model.image.grad_checkpointing = cfg.model.text.grad_checkpointing = True
        cfg.queue = QueueConfig(enabled=False)
    elif variant == "bf16":  # blocks gathered and computed in bf16 (FSDP's param_dtype)
        cfg.run.precision = "bf16"
    return cfg


def local_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
    b = args.batch
    gb = tiny_batch(b * info.world_size, seed=100 * step + micro, first_id=(100 * step + micro) * 1000)
    return {k: v[info.rank * b:(info.rank + 1) * b] for k, v in gb.items()}


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every model tensor, whole (FSDP shards gathered: collective)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone().contiguous()
            for k, v in model.state_dict().items()}


def run(variant: str, parallel: str, steps: int):
    cfg = config(variant, parallel, steps)
    torch.manual_seed(0)  # identical initial weights on every rank and in both modes
    model = DualQueueMoCo(cfg.model, cfg.queue, vocab_size=VOCAB)
    torch.manual_seed(1000 + info.rank)  # each rank its own dropout masks, the same in both modes
    stepper = TrainStep(model, cfg, torch.device("cpu"), info.world_size)
    assert stepper.sharded == (parallel == "fsdp")
    log = {"loss": [], "grad_norm": [], "finite": []}
    for step in range(steps):
        accum = cfg.optim.accum_steps
        r = stepper(step, (local_batch(step, i) for i in range(accum)), accum=accum)
        log["loss"].append(D.all_reduce_mean(r.loss.detach()).item())
        log["grad_norm"].append(float(r.grad_norm))
        log["finite"].append(r.finite)
    # What this rank holds of the weights (query and key towers) and AdamW's states.
    tensors = list(model.parameters()) + [t for st in stepper.optimizer.state.values() for t in st.values()
                                          if torch.is_tensor(t) and t.ndim > 0]
    log["state_bytes"] = sum(D.local_shard(t).numel() * t.element_size() for t in tensors)
    return model, stepper, log


def momentum_check(model: DualQueueMoCo) -> dict:
    q, k = whole_state(model.query), whole_state(model.key)
    model.momentum_update(0.9)
    after = whole_state(model.key)
    diffs = [(after[n] - torch.lerp(k[n], q[n], 0.1)).abs().max().item() for n in after
             if n in dict(model.key.named_parameters())]
    return {"max_abs_diff": max(diffs), "n": len(diffs)}


def skip_check(model: DualQueueMoCo, stepper: TrainStep) -> dict:
    before = whole_state(model)
    batch = local_batch(999, 0)
    if info.rank == 1:
        batch["image"] = torch.full_like(batch["image"], float("nan"))
    r = stepper(0, iter([batch]), accum=1)
    after = whole_state(model)
    unchanged = all(torch.equal(before[n], after[n]) for n in before)
    return {"finite": D.gather_objects(r.finite), "unchanged": unchanged}


def init_check(model: DualQueueMoCo, whole: dict[str, torch.Tensor]) -> dict:
    """checkpoint.init_weights' load (`load_whole`) of another run's whole tower weights
    into the sharded model: afterwards its towers, gathered, are exactly those weights."""
    # 2w + 1: values no run of this script holds, so nothing passes by coincidence.
    towers = {k: v * 2 + 1 if v.is_floating_point() else v for k, v in whole.items()
              if k.startswith(("query.", "key."))}
    load_whole(model, towers)
    after = whole_state(model)
    return {"n": len(towers), "equal": all(torch.equal(after[k], v) for k, v in towers.items())}


for spec in args.variants.split(","):
    variant, n = spec.split(":")
    logs, states = {}, {}
    for parallel in ("ddp", "fsdp"):
        model, stepper, logs[parallel] = run(variant, parallel, int(n))
        states[parallel] = whole_state(model)
        if info.is_main:
            save_file(states[parallel], out_dir / f"{variant}_{parallel}.safetensors")
    if info.is_main:
        (out_dir / f"{variant}.json").write_text(json.dumps(logs))
checks = {"momentum": momentum_check(model)} if model.key is not None else {}
checks["skip"] = skip_check(model, stepper)
checks["init"] = init_check(model, states["ddp"])
if info.is_main:
    for name, value in checks.items():
        (out_dir / f"{name}.json").write_text(json.dumps(value))
D.shutdown()
