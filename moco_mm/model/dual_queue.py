"""The dual-queue momentum contrastive model (WenLan/BriVL design, MoCo mechanics).

One training step, per rank (B local pairs, W ranks, D = embed_dim):

    meta = [sample_id, text_fp, image_fp, group]            # [B,4] int64: what must not be a negative
    q_img, q_txt, T = query(image, text)                    # [B,D] x2, grad
    k_img, k_txt   = key(image, text)                       # [B,D] x2, no grad
    K              = all_gather(cat[k_img, k_txt, meta])    # [W*B, 2D+8], ONE collective
    loss_i2t = L(q_img, k_txt, [K_txt ; text_queue],  T)    # image query vs text keys
    loss_t2i = L(q_txt, k_img, [K_img ; image_queue], T)    # text query vs image keys
    ... backward, optimizer step, then momentum_update(m) (the trainer) ...
    enqueue(K)                   # same gathered rows on every rank -> identical queues

A negative n_j is not a negative of query i when it carries the query's own sample id (a
stale copy of the positive), the fingerprint of the query's caption text or of its image
(an exact duplicate: `model.mask_duplicates`), or the query's group (e.g. the search query
behind a click). Every row carries its pair's meta; queues store it beside the keys. With
`model.distill_alpha` > 0 (ALBEF's momentum distillation) the key towers' own scores
soften the InfoNCE targets.

With `model.momentum_encoder: false` there are no key towers, no queues and no EMA: the
keys are the other tower's own outputs, gathered WITH gradient (the CLIP objective):

    K              = all_gather_with_grad(cat[q_img, q_txt, meta])  # [W*B, 2D+8], ONE collective
    loss_i2t = L(q_img, q_txt, K_txt, T);  loss_t2i = L(q_txt, q_img, K_img, T)

Module layout, chosen for DDP: `query` (both query towers and the temperature) is the
only trained module and the only thing the trainer wraps in DDP; `key` towers and the
two queues sit beside it, so DDP never broadcasts them (with `broadcast_buffers`, DDP
would otherwise resend every queue row and key weight each step). Every rank computes
identical key updates from identical query weights, so they stay equal without sync.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from moco_mm import distributed as D
from moco_mm.config import ModelConfig, QueueConfig, validate_model, validate_queue
from moco_mm.model.clip_towers import clip_towers
from moco_mm.model.losses import OBJECTIVES, excluded, learns_temperature, objective_params
from moco_mm.model.queue import FeatureQueue
from moco_mm.model.towers import ImageTower, TextTower, build_towers, has_batchnorm

log = logging.getLogger(__name__)


def momentum_at(step: int, total_steps: int, m0: float, schedule: str = "constant") -> float:
    """Momentum for `step` of `total_steps`: constant m0, or cosine from m0 (step 0) to 1.0."""
    if schedule == "constant":
        return m0
    if schedule == "cosine":
        progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return 1.0 - (1.0 - m0) * (math.cos(math.pi * progress) + 1.0) / 2.0
    raise ValueError(f"model.momentum_schedule: {schedule!r} is not allowed; choose one of constant, cosine")


class QueryTowers(nn.Module):
    """What the optimizer trains: both query towers and the (log) temperature.

    The temperature lives here so that, under DDP, its gradient is averaged across ranks
    like every other trained parameter. It is a parameter only when it is learnt AND the
    objective uses it (`learns_temperature`); otherwise a buffer.
    """

    def __init__(self, image: ImageTower, text: TextTower, cfg: ModelConfig, init_log_t: float | None = None):
        super().__init__()
        self.image = image
        self.text = text
        self.log_t_min = math.log(cfg.temperature_min)
        self.log_t_max = math.log(cfg.temperature_max)
        if init_log_t is None:
            init_log_t = math.log(cfg.temperature)
        elif not self.log_t_min - 1e-6 <= init_log_t <= self.log_t_max + 1e-6:
            log.warning("the source CLIP's temperature %.4g is outside [model.temperature_min, temperature_max] = "
                        "[%g, %g]: clamped", math.exp(init_log_t), cfg.temperature_min, cfg.temperature_max)
        log_t = torch.tensor(min(max(init_log_t, self.log_t_min), self.log_t_max))
        if learns_temperature(cfg.loss, cfg.learn_temperature):
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        # The objective's own trained scalars (e.g. the margin loss's boundary beta).
        self.loss_scalars = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(float(init))) for name, init in OBJECTIVES[cfg.loss].learnt})

    def temperature(self) -> torch.Tensor:
        """0-d tensor exp(log_temperature).

        Not clamped here: `clamp_temperature` after every optimizer step is the only limit
        (as in CLIP and ALBEF), so the stored value is always in range. A clamp in the
        forward would have a zero gradient at the bound, and a temperature that touched
        it could never come back inside.
        """
        return self.log_temperature.exp()

    def forward(self, image, input_ids, attention_mask):
        """-> q_img [B,D], q_txt [B,D] (unit rows), temperature (0-d), the objective's
        trained scalars {name: 0-d} (returned from here so that DDP sees them used)."""
        return (self.image(image), self.text(input_ids, attention_mask), self.temperature(),
                dict(self.loss_scalars.items()))

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Keep the stored value in range (run after every optimizer step)."""
        self.log_temperature.clamp_(self.log_t_min, self.log_t_max)


class KeyTowers(nn.Module):
    """Momentum copies of the query towers. Never trained; updated by `momentum_update`."""

    def __init__(self, image: ImageTower, text: TextTower):
        super().__init__()
        self.image = image
        self.text = text
        self.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                # Key BatchNorm normalises with (shuffled) batch statistics and does not
                # update its running stats: those are copied from the query tower at every
                # momentum update, so ranks never drift apart through them.
                m.track_running_stats = False


@dataclass
class StepOutput:
    """What one forward returns to the trainer.

    `keys_*` are the gathered keys of the global batch [W*B, D] (float32), `key_ids` [W*B]
    and `key_fingerprints` [W*B, 3]: the trainer passes them to `enqueue` after backward.
    `neg_sim` is computed only when the forward is asked for statistics (else None).
    """

    loss: torch.Tensor
    loss_i2t: torch.Tensor
    loss_t2i: torch.Tensor
    temperature: torch.Tensor
    keys_img: torch.Tensor
    keys_txt: torch.Tensor
    key_ids: torch.Tensor
    key_fingerprints: torch.Tensor
    pos_sim: torch.Tensor
    neg_sim: torch.Tensor | None


class DualQueueMoCo(nn.Module):
    """Image-query/text-key and text-query/image-key momentum contrast with two queues."""

    def __init__(self, cfg: ModelConfig, queue_cfg: QueueConfig, vocab_size: int | None = None):
        super().__init__()
        validate_model(cfg)
        validate_queue(queue_cfg, cfg)
        self.cfg = cfg
        if cfg.init_from:  # a CLIP's towers, projections and temperature (key towers copy them)
            image, text, init_log_t = clip_towers(cfg)
        else:
            (image, text), init_log_t = build_towers(cfg, vocab_size), None
        self.query = QueryTowers(image, text, cfg, init_log_t)
        # Key towers start as exact copies of the query towers; none in the CLIP mode.
        self.key = KeyTowers(copy.deepcopy(image), copy.deepcopy(text)) if cfg.momentum_encoder else None
        # A disabled queue is an empty one: the loss then sees in-batch negatives only.
        size = queue_cfg.size if queue_cfg.enabled else 0
        self.image_queue = FeatureQueue(size, cfg.embed_dim, queue_cfg.dtype, N_FINGERPRINTS)
        self.text_queue = FeatureQueue(size, cfg.embed_dim, queue_cfg.dtype, N_FINGERPRINTS)
        self.objective = OBJECTIVES[cfg.loss]
        self.loss_fn = partial(self.objective.fn, **objective_params(cfg))
        # The meta columns that exclude negatives: the sample id, the fingerprints
        # `model.mask_duplicates` turns on, and the group (always: a group is a statement
        # of the data). Columns off are not compared at all (one [B, N] pass each).
        self.exclusion_columns = ([0] + ([1] if cfg.mask_duplicates in ("text", "both") else [])
                                  + ([2] if cfg.mask_duplicates in ("image", "both") else []) + [3])
        # BatchNorm key towers could cheat through batch statistics: shuffle their batch
        # across ranks (MoCo's Shuffle-BN). LayerNorm towers (ViT, BERT) need none.
        self.shuffle_image = cfg.momentum_encoder and has_batchnorm(image)
        self.shuffle_text = cfg.momentum_encoder and has_batchnorm(text)
        self._ema_cache = None

    @property
    def has_key_towers(self) -> bool:
        """False in the CLIP mode (`model.momentum_encoder: false`)."""
        return self.key is not None

    # --- momentum update -------------------------------------------------------------

    def _apply(self, fn, *args, **kwargs):
        self._ema_cache = None  # .to()/.cuda() replace buffers: rebuild the tensor lists
        return super()._apply(fn, *args, **kwargs)

    def _ema_lists(self):
        if self._ema_cache is None:
            q_params = dict(self.query.named_parameters())
            k_params = dict(self.key.named_parameters())
            # Only trained parameters move; frozen ones are equal from the start and an
            # EMA of two equal values could still drift by rounding.
            names = [n for n in k_params if q_params[n].requires_grad]
            q_bufs = dict(self.query.named_buffers())
            k_bufs = dict(self.key.named_buffers())
            self._ema_cache = (
                [k_params[n] for n in names], [q_params[n] for n in names],
                list(k_bufs.values()), [q_bufs[n] for n in k_bufs],
            )
        return self._ema_cache

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """key <- m*key + (1-m)*query over all trained parameters, as fused multi-tensor ops.

        Buffers (BatchNorm running statistics) are copied, not averaged: the key tower
        runs in train mode and normalises with batch statistics, so its running stats only
        matter at export, where the query tower's are the better estimate.
        """
        if self.key is None:
            return
        k_params, q_params, k_bufs, q_bufs = self._ema_lists()
        if k_params:
            # lerp: k + (1-m)(q-k) = m*k + (1-m)*q in one pass over the bytes (measured at
            # half the time of mul_ + add_ by moco-mm bench). Under FSDP each rank updates
            # its own shards: a key tower is sharded exactly like its query twin, so the
            # local shards hold the same elements (train/parallel.py); no communication.
            torch._foreach_lerp_([D.local_shard(k) for k in k_params], [D.local_shard(q) for q in q_params], 1.0 - m)
        if k_bufs:
            torch._foreach_copy_(k_bufs, q_bufs)

    def query_bn_state(self) -> list[torch.Tensor]:
        """Copies of the query towers' BatchNorm buffers (running mean/var, batch count);
        empty for towers without BatchNorm."""
        return [b.detach().clone() for b in self.query_bn_buffers()]

    @torch.no_grad()
    def load_query_bn_state(self, saved: list[torch.Tensor]) -> None:
        """Put back what `query_bn_state` copied (a skipped non-finite step)."""
        bufs = self.query_bn_buffers()
        if bufs:
            torch._foreach_copy_(bufs, saved)

    def query_bn_buffers(self) -> list[torch.Tensor]:
        """The query towers' BatchNorm buffers (running mean/var, batch count), in module order."""
        return [b for m in self.query.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for b in m.buffers()]

    # --- keys --------------------------------------------------------------------------

    @torch.no_grad()
    def _shuffled(self, tower, tensors: tuple[torch.Tensor, ...], ids: torch.Tensor) -> torch.Tensor:
        """Run `tower` on a batch shuffled across ranks (Shuffle-BN); -> this rank's keys
        [B, D] (float32), in its own rows' order.

        Each rank sends a random B/W of its rows to every rank (all-to-all, in the inputs'
        own dtype: uint8 images, int64 tokens) and receives B rows, so every rank's
        BatchNorm sees samples from all ranks (from B of them when B < W); the keys go back
        the same way. The split sizes follow from B and W alone
        and the rows are chosen by a hash of their sample ids (argsort on the device), so
        there is no host sync, nothing grows with W, and a resumed run shuffles alike. Every
        per-sample tensor moves with the same rows (BriVL shuffled the images but not their
        masks).
        """
        world, rank, b = D.world_size(), D.rank(), tensors[0].shape[0]
        send, recv = shuffle_splits(b, world, rank)
        order = torch.argsort(_hash64(ids))  # which rows go where: random, on the device
        received = [D.all_to_all_rows(t[order], send, recv) for t in tensors]
        keys = D.all_to_all_rows(tower(*received).float(), recv, send)
        out = torch.empty_like(keys)
        out[order] = keys
        return out

    @torch.no_grad()
    def compute_keys(self, image, input_ids, attention_mask, meta):
        """-> local (k_img, k_txt) [B,D] and gathered (K_img, K_txt) [W*B,D], meta [W*B,4].

        ONE all_gather for both modalities and the meta (the int64 columns ride along
        bit-for-bit as pairs of float32 columns). A BatchNorm tower under several
        processes computes its keys on a batch shuffled across ranks first (`_shuffled`:
        two all-to-alls of that tower's inputs and keys).
        """
        if self.key is None:
            raise RuntimeError("compute_keys: this model has no key towers (model.momentum_encoder is false)")
        shuffle = D.world_size() > 1
        ids = meta[:, 0]
        if shuffle and self.shuffle_image:
            k_img = self._shuffled(self.key.image, (image,), ids)
        else:
            k_img = self.key.image(image).float()
        if shuffle and self.shuffle_text:
            k_txt = self._shuffled(self.key.text, (input_ids, attention_mask), ids)
        else:
            k_txt = self.key.text(input_ids, attention_mask).float()
        packed = D.all_gather_cat(_pack(k_img, k_txt, meta))
        return (k_img, k_txt, *_unpack(packed, k_img.shape[1]))

    # --- the step ----------------------------------------------------------------------

    def forward(self, image, input_ids, attention_mask, sample_id, fingerprints=None,
                query: nn.Module | None = None, distill_alpha: float = 0.0, stats: bool = True) -> StepOutput:
        """Losses for one (micro-)batch; the queues are NOT changed here (call `enqueue`
        after backward).

        `fingerprints` [B, 3] int64: the pair's caption-text, image and group fingerprints
        (-1: none; None: all -1). `query` is the DDP-wrapped `self.query` when distributed.
        `distill_alpha`: this step's momentum-distillation weight (the trainer ramps it).
        `stats`: also compute `neg_sim` (logging steps only: it costs a [B, N] product).
        """
        query = self.query if query is None else query
        meta = _meta(sample_id, fingerprints)
        q_img, q_txt, temperature, scalars = query(image, input_ids, attention_mask)
        if self.key is None:
            # CLIP mode: each tower's own outputs are the other's keys. The gather carries
            # gradients, so every rank's loss trains the towers that produced its negatives.
            k_img, k_txt = q_img, q_txt
            all_img, all_txt, all_meta = _unpack(D.all_gather_cat_with_grad(_pack(q_img, q_txt, meta)),
                                                 q_img.shape[1])
        else:
            k_img, k_txt, all_img, all_txt, all_meta = self.compute_keys(image, input_ids, attention_mask, meta)
        loss_i2t, loss_t2i, (neg_img, neg_txt, q_meta, neg_keys, mask) = self.losses(
            q_img, q_txt, k_img, k_txt, all_img, all_txt, all_meta, meta, temperature, scalars, distill_alpha)
        with torch.no_grad():
            pos_sim = 0.5 * (torch.linalg.vecdot(q_img.float(), k_txt.float()).mean()
                             + torch.linalg.vecdot(q_txt.float(), k_img.float()).mean())
            neg_sim = None
            if stats:  # over the negatives the loss counts
                neg_sim = 0.5 * (mean_negative_sim(q_img, q_meta, neg_txt, neg_keys, mask)
                                 + mean_negative_sim(q_txt, q_meta, neg_img, neg_keys, mask))
        return StepOutput(
            loss=loss_i2t + loss_t2i, loss_i2t=loss_i2t, loss_t2i=loss_t2i,
            temperature=temperature.detach(), keys_img=all_img.detach(), keys_txt=all_txt.detach(),
            key_ids=all_meta[:, 0], key_fingerprints=all_meta[:, 1:], pos_sim=pos_sim, neg_sim=neg_sim,
        )

    def losses(self, q_img, q_txt, k_img, k_txt, all_img, all_txt, all_meta, meta, temperature,
               scalars: dict | None = None, distill_alpha: float = 0.0):
        """Both directions' objective over [gathered batch ; queue] (`model.in_batch_negatives`).

        q_img, q_txt [B, D] queries; k_img, k_txt [B, D] their positives; all_img, all_txt
        [W*B, D] and all_meta [W*B, 4] the gathered keys; meta [B, 4] the queries' own.
        Both directions score the same rows with the same meta, so ONE exclusion mask
        [B, N] serves both. Returns (loss_i2t, loss_t2i, (neg_img, neg_txt, q_meta,
        neg_keys, mask)), the last for statistics over the same negatives.
        """
        neg_txt, neg_meta = self._negatives(self.text_queue, all_txt, all_meta)
        # Both queues hold the same meta in the same rows (enqueued together): build it once.
        neg_img, _ = self._negatives(self.image_queue, all_img, None)
        q_meta, neg_keys = self.query_meta(meta), self.query_meta(neg_meta)
        mask = excluded(q_meta, neg_keys)
        kw = dict(grad_keys=self.key is None, mask=mask, **(scalars or {}))
        distill = self.key is not None and distill_alpha > 0
        loss_i2t = self.loss_fn(q_img, k_txt, neg_txt, temperature, q_meta, neg_keys, **kw,
                                **(dict(teacher=k_img, alpha=distill_alpha) if distill else {}))
        loss_t2i = self.loss_fn(q_txt, k_img, neg_img, temperature, q_meta, neg_keys, **kw,
                                **(dict(teacher=k_txt, alpha=distill_alpha) if distill else {}))
        return loss_i2t, loss_t2i, (neg_img, neg_txt, q_meta, neg_keys, mask)

    def query_meta(self, meta: torch.Tensor) -> torch.Tensor:
        """The exclusion keys of meta rows [n, 4] -> [n, F]: the id, the fingerprints
        `model.mask_duplicates` turns on, the group (`exclusion_columns`)."""
        return meta[:, self.exclusion_columns]

    def _negatives(self, queue: FeatureQueue, batch_keys: torch.Tensor, batch_meta: torch.Tensor | None):
        """[gathered batch keys ; written queue rows] (float32) and their meta [N, 4]
        (None when batch_meta is None: the caller has it from the other queue)."""
        queue_meta = None if batch_meta is None else torch.cat([queue.ids.view(-1, 1), queue.fingerprints], dim=1)
        return negative_bank(batch_keys, batch_meta, queue.features, queue_meta, self.cfg.in_batch_negatives)

    @torch.no_grad()
    def enqueue(self, out: StepOutput) -> None:
        """Push the gathered keys: image keys -> image queue, text keys -> text queue."""
        self.image_queue.enqueue(out.keys_img, out.key_ids, out.key_fingerprints)
        self.text_queue.enqueue(out.keys_txt, out.key_ids, out.key_fingerprints)


def negative_bank(batch_keys: torch.Tensor, batch_ids: torch.Tensor, queue_rows: torch.Tensor,
                  queue_ids: torch.Tensor, in_batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction's negatives [N, D] (float32) and ids [N] or meta [N, F]: the gathered
    batch keys (when `in_batch`) followed by the queue rows; batch_ids None: no ids built
    (None returned). The memory planner traces this too."""
    if not in_batch:
        return queue_rows.float(), queue_ids
    if queue_rows.shape[0] == 0:  # no copy: in the CLIP mode the gathered rows carry gradients
        return batch_keys, batch_ids
    ids = None if batch_ids is None else torch.cat([batch_ids, queue_ids])
    return torch.cat([batch_keys, queue_rows.float()]), ids


N_FINGERPRINTS = 3  # caption text, image, group


def shuffle_splits(b: int, world: int, rank: int) -> tuple[list[int], list[int]]:
    """Shuffle-BN's all-to-all split sizes for `rank`: rows it sends to each rank, rows it
    receives from each. Rank r sends b // W rows to every rank plus one more to the b % W
    ranks after it (cyclically), so every rank receives exactly b rows, also when b < W."""
    send = [b // world + ((j - rank) % world < b % world) for j in range(world)]
    recv = [b // world + ((rank - i) % world < b % world) for i in range(world)]
    return send, recv


def _hash64(x: torch.Tensor) -> torch.Tensor:
    """A fixed int64 mix of int64 values (splitmix64's finaliser, wrapping), on the device."""
    x = x.to(torch.int64)
    x = (x ^ (x >> 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64
    x = (x ^ (x >> 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ (x >> 31)


def _meta(sample_id: torch.Tensor, fingerprints: torch.Tensor | None) -> torch.Tensor:
    """[B, 1 + N_FINGERPRINTS] int64: the sample id, then its fingerprints (-1: none)."""
    ids = sample_id.to(torch.int64).view(-1, 1)
    if fingerprints is None:
        return torch.cat([ids, ids.new_full((ids.shape[0], N_FINGERPRINTS), -1)], dim=1)
    if fingerprints.shape != (ids.shape[0], N_FINGERPRINTS):
        raise ValueError(f"fingerprints must be [{ids.shape[0]}, {N_FINGERPRINTS}], got {tuple(fingerprints.shape)}")
    return torch.cat([ids, fingerprints.to(torch.int64)], dim=1)


def _pack(img: torch.Tensor, txt: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """[B, 2D + 2F] float32: both modalities and the int64 meta [B, F], bit-for-bit as pairs
    of float32 columns, so that ONE collective gathers all three."""
    meta_f = meta.to(torch.int64).contiguous().view(torch.float32)
    return torch.cat([img.float(), txt.float(), meta_f], dim=1)


def _unpack(packed: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `_pack` on gathered rows -> img [N, D], txt [N, D], meta [N, F] int64."""
    meta = packed[:, 2 * d:].detach().contiguous().view(torch.int64)
    return packed[:, :d], packed[:, d:2 * d], meta


@torch.no_grad()
def mean_negative_sim(q: torch.Tensor, q_ids: torch.Tensor, negatives: torch.Tensor,
                      neg_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows i of the mean similarity q_i . n_j over the negatives the loss counts
    (`losses.excluded` leaves them in); 0-d float32. Costs a [B, N] product: the trainer
    asks for it on logging steps only."""
    if negatives.shape[0] == 0:
        return torch.zeros((), device=q.device)
    sims = q.detach().float() @ negatives.detach().float().t()
    mask = excluded(q_ids, neg_ids, mask)
    if mask is None:
        return sims.mean()
    keep = (~mask).float()
    return ((sims * keep).sum(1) / keep.sum(1).clamp(min=1)).mean()
