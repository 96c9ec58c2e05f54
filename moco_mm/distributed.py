"""Everything that touches `torch.distributed`, in one place.

This is the only module that reads the launcher's environment (torchrun's `RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, ...; SLURM's `SLURM_PROCID`, ... when a job is
started by `srun` without torchrun). Every helper works without a process group: a plain
`python -m moco_mm.train` is world size 1 and the collectives become identities, so the
model and trainer never branch on "am I distributed".
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def launcher_world_size() -> int:
    """World size the launcher asked for (1 when started without one)."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def launcher_info(device: str = "auto") -> DistInfo:
    """This process's rank, world size, local rank and device as the launcher set them,
    WITHOUT joining a process group: for jobs whose ranks never talk to each other (corpus
    embedding: each rank owns fixed shards, so no rank can wait on another). `device`:
    auto (CUDA when available), cuda or cpu; CUDA uses device LOCAL_RANK (made current)."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = launcher_world_size()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("run.device: 'cuda' was asked for but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group described by the environment; no-op for a single process.

    NCCL when the chosen device is CUDA, gloo otherwise. `timeout_s` bounds every
    collective wait so that a dead peer ends the run with an error rather than a hang.
    """
    info = launcher_info(device)
    rank, world, local_rank, dev = info.rank, info.world_size, info.local_rank, info.device
    use_cuda = dev.type == "cuda"
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=dev if use_cuda else None,
            store=_restart_scoped_store(world, timeout),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _restart_scoped_store(world: int, timeout: datetime.timedelta):
    """Under torchrun's elastic agent, a store whose keys are scoped to this restart.

    The agent keeps one TCP store across restarts, and the process group's connection
    keys carry no restart number: after `--max-restarts` brings a group back, a new rank
    can read the dead rank's address and gloo fails with "connection refused" (seen here,
    intermittently). Prefixing every key with the restart count removes the race. Returns
    None (plain env:// initialisation) outside the elastic agent.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=False, timeout=timeout)
    return dist.PrefixStore(f"moco_mm/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def store():
    """The c10d key-value store the default process group was built on (None for one
    process): for control data that must not cost a collective (the preemption flag)."""
    if not is_dist():
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [B, ...] from every rank along dim 0 -> [world*B, ...], rank order.

    No gradient flows through it (keys never need one). Every rank must pass the same
    shape: the loader guarantees equal batch sizes.
    """
    if not is_dist():
        return x
    out = torch.empty((world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    # all_gather_single is the newer name of all_gather_into_tensor (deprecated in 2.14).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous())
    return out


@torch.no_grad()
def all_gather_varlen(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate each `x` [n_r, ...] from every rank along dim 0, in rank order, when the
    row counts n_r differ between ranks (trailing dims and dtype may not; a rank with no rows
    passes [0, ...] of the same trailing shape). One gather of every tensor's row count, then
    one gather per tensor of its rows padded to the largest count; the padding is cut away.
    Tensors travel on their own device (CUDA under NCCL). Identity for one process. Waits
    are bounded by the process group's timeout (run.process_group_timeout_s), as every one is."""
    if not is_dist():
        return xs
    counts = all_gather_cat(torch.tensor([x.shape[0] for x in xs], dtype=torch.int64, device=xs[0].device))
    counts = counts.view(world_size(), len(xs)).tolist()  # [rank][tensor]
    out = []
    for j, x in enumerate(xs):
        sizes = [row[j] for row in counts]
        pad = max(sizes)
        buf = x.new_zeros((pad, *x.shape[1:]))
        buf[:x.shape[0]] = x
        full = all_gather_cat(buf)
        out.append(torch.cat([full[r * pad:r * pad + n] for r, n in enumerate(sizes)]))
    return tuple(out)


@torch.no_grad()
def all_to_all_rows(x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    """Exchange rows: the first send[0] rows of `x` go to rank 0, the next send[1] to rank 1,
    ...; returns the rows received, rank 0's first ([sum(recv), ...], x's dtype). The split
    sizes are host lists every rank agrees on (no host sync). Identity for one process."""
    if not is_dist():
        return x
    out = torch.empty((sum(recv), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send)
    return out


def all_gather_cat_with_grad(x: torch.Tensor) -> torch.Tensor:
    """`all_gather_cat` through which gradients flow back to their owner rank.

    The backward reduce-scatters (sums) the gradient of every rank's copy of row block r
    onto rank r. With each rank's loss a mean over its own rows and DDP averaging the
    gradients, the update is the gradient of the mean loss over the global batch, as if
    one process had computed it (the CLIP objective's need; keys never use this).
    """
    if not is_dist():
        return x
    from torch.distributed import _functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    return gather(x.contiguous(), 0, dist.group.WORLD)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (returns a new tensor; identity for one process)."""
    if not is_dist():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (used for small control data only)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (small control data only)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_dist():
        dist.barrier()


def ddp_buffer_sync(sync: bool) -> dict:
    """DDP keyword for whether buffers are re-broadcast from rank 0 before every forward:
    `forward_sync_buffers` where torch has it (newer releases deprecate `broadcast_buffers`
    and warn on every construction), `broadcast_buffers` before. Either way DDP still
    broadcasts parameters and buffers once at construction, which is what we rely on."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": sync}
    return {"broadcast_buffers": sync}


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor (FSDP2's sharded
    parameters; a view, so in-place ops on it change the parameter), the tensor itself
    otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def broadcast_coalesced(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite `tensors` (same shapes on every rank) with `src`'s values in place, in ONE
    broadcast per dtype (flattened); identity for one process."""
    if not is_dist() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        torch._foreach_copy_(group, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in group]), group)])
