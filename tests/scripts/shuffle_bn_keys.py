"""Under torchrun: the key image tower (BatchNorm) run through Shuffle-BN on each rank's
slice of one global batch; rank 0 saves every rank's keys (gathered) for the test to
compare with a single-process reproduction of the exchange."""

import argparse

import torch
from safetensors.torch import save_file

from moco_mm import distributed as D
from moco_mm.config import QueueConfig
from moco_mm.model import DualQueueMoCo
from tests.tiny import tiny_batch, tiny_bn_model_config

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--batch", type=int, default=3)
args = p.parse_args()
info = D.init_distributed("cpu")
torch.manual_seed(0)
model = DualQueueMoCo(tiny_bn_model_config(), QueueConfig(size=8))
b = args.batch
gb = tiny_batch(b * info.world_size, seed=5, first_id=1000)
local = {k: v[info.rank * b:(info.rank + 1) * b] for k, v in gb.items()}
keys = model._shuffled(model.key.image, (local["image"],), local["sample_id"])
everyone = D.all_gather_cat(keys)
if info.is_main:
    save_file({"keys": everyone.contiguous()}, args.out)
D.shutdown()
