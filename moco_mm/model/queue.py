"""FeatureQueue: a ring buffer of key features and their sample ids.

Differences from the MoCo/ALBEF queue, on purpose:
- any `size` (no `size % batch == 0`): a write that runs past the end wraps around;
- only rows written so far are ever returned, so no random initial vector is ever used
  as a negative;
- ids are stored beside the features so the loss can mask stale copies of a query's
  own positive, and so are content fingerprints (caption text, image, group), so it can
  mask exact duplicates of the positive too;
- every buffer is persistent, so the queue resumes with the run (a non-persistent queue
  comes back random after a resume, silently).
"""

from __future__ import annotations

import torch
from torch import nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class FeatureQueue(nn.Module):
    """Ring buffer holding at most `size` rows of `dim` features.

    Invariants: `0 <= len(self) <= size`; rows `[0, len)` of the storage are the written
    ones; `ptr` is the slot the next row goes to. `features` [len, dim] and `ids` [len]
    describe the same rows in the same (storage) order.
    """

    def __init__(self, size: int, dim: int, dtype: str | torch.dtype = torch.float32, n_fingerprints: int = 0):
        super().__init__()
        if size < 0:
            raise ValueError(f"queue.size: illegal queue size {size}, must be >= 0")
        if dim < 1:
            raise ValueError(f"model.embed_dim: illegal feature dim {dim}, must be >= 1")
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"queue.dtype: {dtype!r} is not allowed; choose one of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        self.size = size
        self.dim = dim
        self.n_fingerprints = n_fingerprints
        self.register_buffer("feature_store", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("id_store", torch.full((size,), -1, dtype=torch.long))
        # -1: no fingerprint (never matches; see model.losses.excluded).
        self.register_buffer("fingerprint_store", torch.full((size, n_fingerprints), -1, dtype=torch.long))
        # Kept as tensors so they travel in state_dict / safetensors with the rows, and
        # mirrored as host ints so that no step reads them back from the device (a host
        # sync on CUDA, and a graph break under torch.compile). The ints are the truth;
        # the buffers are written alongside and read back only when a state dict loads.
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._ptr = 0
        self._filled = 0

    def __len__(self) -> int:
        return self._filled

    @property
    def features(self) -> torch.Tensor:
        """[len, dim] the written rows (a view: copy before the next enqueue if kept)."""
        return self.feature_store[: len(self)]

    @property
    def ids(self) -> torch.Tensor:
        """[len] sample ids of the written rows, matching `features` row for row."""
        return self.id_store[: len(self)]

    @property
    def fingerprints(self) -> torch.Tensor:
        """[len, n_fingerprints] int64 of the written rows, matching `features` row for row."""
        return self.fingerprint_store[: len(self)]

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, ids: torch.Tensor, fingerprints: torch.Tensor | None = None) -> None:
        """Write `features` [n, dim] with `ids` [n] (and `fingerprints` [n, n_fingerprints];
        none: -1); n may exceed `size` (last rows kept)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"enqueue: expected features [n, {self.dim}], got {tuple(features.shape)}")
        if ids.shape != (features.shape[0],):
            raise ValueError(f"enqueue: ids must be [{features.shape[0]}], got {tuple(ids.shape)}")
        if fingerprints is None:
            fingerprints = ids.new_full((features.shape[0], self.n_fingerprints), -1)
        if fingerprints.shape != (features.shape[0], self.n_fingerprints):
            raise ValueError(f"enqueue: fingerprints must be [{features.shape[0]}, {self.n_fingerprints}], "
                             f"got {tuple(fingerprints.shape)}")
        if self.size == 0:
            return
        n = features.shape[0]
        if n > self.size:  # only the newest `size` rows can survive anyway
            features, ids, fingerprints = features[-self.size:], ids[-self.size:], fingerprints[-self.size:]
            n = self.size
        ptr = self._ptr
        first = min(n, self.size - ptr)  # rows up to the end of the storage
        self.feature_store[ptr: ptr + first] = features[:first].to(self.feature_store.dtype)
        self.id_store[ptr: ptr + first] = ids[:first]
        self.fingerprint_store[ptr: ptr + first] = fingerprints[:first]
        rest = n - first  # wrap-around: the remainder goes to the front
        if rest:
            self.feature_store[:rest] = features[first:].to(self.feature_store.dtype)
            self.id_store[:rest] = ids[first:]
            self.fingerprint_store[:rest] = fingerprints[first:]
        self._ptr = (ptr + n) % self.size
        self._filled = min(self.size, self._filled + n)
        self.ptr.fill_(self._ptr)  # a device write of a host number: no sync
        self.filled.fill_(self._filled)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before fingerprints existed: their rows have none (-1).
        key = prefix + "fingerprint_store"
        if key not in state_dict and prefix + "id_store" in state_dict:
            state_dict[key] = torch.full_like(self.fingerprint_store, -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ptr, self._filled = int(self.ptr), int(self.filled)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.feature_store.dtype}"
