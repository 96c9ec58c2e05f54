"""Under torchrun: build the Trainer from --config, run the query towers on the SAME input
on every rank in train and in eval mode, and write from rank 0 whether the ranks' weights
and outputs are equal."""

import json

import torch
from script_trainer import trainer_from_args

from moco_mm import distributed as D

trainer, info, args = trainer_from_args()
model = trainer.model
g = torch.Generator().manual_seed(123)  # the same input on every rank
size = trainer.cfg.model.image.image_size
image = torch.randn(4, 3, size, size, generator=g)
ids = torch.randint(5, 50, (4, 12), generator=g)
mask = torch.ones_like(ids)


def outputs(train: bool) -> torch.Tensor:
    model.query.train(train)
    with torch.no_grad():
        q_img, q_txt, _, _ = model.query(image, ids, mask)
    return torch.cat([q_img, q_txt], dim=1)


def equal_across_ranks(x: torch.Tensor) -> bool:
    everyone = D.all_gather_cat(x.unsqueeze(0))
    return bool((everyone == everyone[0]).all())


weights = torch.cat([v.flatten().float() for v in model.state_dict().values()])
res = {"weights_equal": equal_across_ranks(weights),
       "train_outputs_equal": equal_across_ranks(outputs(True)),
       "eval_outputs_equal": equal_across_ranks(outputs(False))}
if info.is_main:
    with open(args.out, "w") as f:
        json.dump(res, f)
D.shutdown()
