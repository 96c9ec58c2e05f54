"""How the trained towers are spread over the ranks: `run.parallel` ddp | fsdp.

ddp (`ddp_query`): the query towers, whole on every rank, in DDP (gradients all-reduced in
buckets). Key towers and queues sit beside it, whole on every rank, never broadcast: every
rank computes the same EMA from the same query weights (model/dual_queue.py).

fsdp (`shard_towers`): FSDP2 `fully_shard` on each block (`model.tower_blocks`) of each of
the four towers and then on each tower (its root unit: embeddings, final norm, projection head). Per rank:

    query towers   fp32 master weights / W, fp32 gradients / W, AdamW states / W
    key towers     fp32 weights / W, sharded exactly like their query twins
    in flight      a block's parameters all-gathered (in the autocast dtype: bf16 on
                   CUDA) for its forward and again for its backward; gradients
                   reduce-scattered in fp32 after each micro-batch's backward

Query and key towers are identical modules sharded by identical calls, so a key
parameter's local shard holds exactly the elements of its query twin's: the momentum
update runs on local shards with no communication (`D.local_shard`). Key towers run
forward only, so each is resharded right after its forward (`reshard_after_forward` on
the tower too); a query tower's root unit stays gathered from forward to backward (FSDP's
default for a root: backward needs it at once).

The 0-d scalars (temperature, an objective's learnt scalars) cannot be sharded by FSDP2
and stay replicated: `TrainStep` averages their gradients itself, in one packed
all-reduce that also carries the step's non-finite flag. Buffers (BatchNorm statistics,
queues) are not sharded either.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from moco_mm import distributed as D
from moco_mm.model import DualQueueMoCo, has_batchnorm, tower_blocks

log = logging.getLogger("moco_mm.train")

# Each FSDP unit's reshard_after_forward as `shard_towers` set it, restored after an eval.
_RESHARD_ATTR = "_moco_mm_reshard_after_forward"


def ddp_query(model: DualQueueMoCo, bucket_mb: int, static_graph: bool, device: torch.device,
              local_rank: int) -> DDP:
    """The query towers in DDP: gradients living in the buckets (no second copy), buffers
    re-broadcast from rank 0 only where ranks can differ (BatchNorm statistics)."""
    return DDP(model.query, device_ids=[local_rank] if device.type == "cuda" else None,
               gradient_as_bucket_view=True, **D.ddp_buffer_sync(has_batchnorm(model.query)),
               bucket_cap_mb=bucket_mb, static_graph=static_graph)


def _fully_shard(module: nn.Module, reshard_after_forward: bool, mp_policy) -> None:
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    setattr(module, _RESHARD_ATTR, reshard_after_forward)


def shard_towers(model: DualQueueMoCo, param_dtype: torch.dtype | None) -> None:
    """FSDP2 over the query and key towers of `model`, in place (module docstring).

    `param_dtype`: the dtype blocks are gathered and computed in (None: their own, fp32);
    gradients are always reduced in fp32. Needs the default process group."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    groups = [(model.query, False)] + ([(model.key, True)] if model.key is not None else [])
    for towers, is_key in groups:
        for tower in (towers.image, towers.text):
            blocks = tower_blocks(tower)
            if not blocks and not is_key:
                # Still sharded (weights, gradients, AdamW states / W), but gathered whole
                # for its forward: fine for the small towers that have no block list.
                log.warning("run.parallel=fsdp: no list of blocks in the %s tower (%s): it is one FSDP unit",
                            "image" if tower is towers.image else "text", type(tower.backbone).__name__)
            for block in blocks:
                _fully_shard(block, True, mp)
            _fully_shard(tower, is_key, mp)


def is_sharded(module: nn.Module) -> bool:
    """True when some parameter of `module` is an FSDP2 shard (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def load_whole(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load whole tensors (some of `model`'s state names, e.g. a checkpoint's weights) into
    `model`, sharded or not: under FSDP each rank keeps its shards of them. Names not in
    `tensors` keep their values. Collective when sharded."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # A copy: torch replaces the dict's values with the distributed tensors it makes.
        set_model_state_dict(model, dict(tensors), options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict({**model.state_dict(), **tensors})


def split_sharded(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(FSDP shards, replicated tensors) of `params`, each in the given order."""
    from torch.distributed.tensor import DTensor

    return [p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Inside: every FSDP unit of `module` all-gathered once and kept so (no collective per
    forward), so that ranks may run different numbers of forwards (evaluation shares out
    whole batches); resharded on exit. Collective on entry: every rank must enter. A
    no-op for a module without FSDP units."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(getattr(unit, _RESHARD_ATTR, True), recurse=False)
