"""The shared start of the torchrun test scripts that need a Trainer: parse --config and
--out, join the gloo process group, build the Trainer from the config."""

import argparse

from moco_mm import distributed as D
from moco_mm.config import load_config
from moco_mm.train import Trainer


def trainer_from_args() -> tuple[Trainer, D.DistInfo, argparse.Namespace]:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    info = D.init_distributed("cpu")
    return Trainer(load_config(args.config, world_size=info.world_size), info), info, args
