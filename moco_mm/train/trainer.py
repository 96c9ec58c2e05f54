"""The Trainer: the training loop of `moco-mm train` / `python -m moco_mm.train` (see cli.py).

The same line runs a single process or, under `torchrun`, many processes on one or many
nodes. `Trainer` owns everything stateful (model, optimizer, data position, counters) and
the checkpoint manager saves and restores exactly that, so a run killed at any step and
started again with the same command finishes bit-identical to one that never stopped.

The optimizer step itself (accumulation, the non-finite skip, EMA, enqueue) is `TrainStep`
in step.py; the Trainer feeds it loader batches and owns logging, counters and checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moco_mm import distributed as D
from moco_mm.config import Config, ConfigError, dump_config, queue_warnings, to_dict
from moco_mm.data import (
    DataError,
    LoaderState,
    ShardSource,
    build_transforms,
    iter_eval_batches,
    make_stream,
    pin_memory_for,
    steps_per_epoch,
)
from moco_mm.data.labeled import LabeledImages, open_labeled
from moco_mm.metrics import (
    TOP5_MIN_CLASSES,
    ZEROSHOT_TEMPLATES,
    ZeroShotError,
    format_table,
    read_classes,
    read_templates,
    retrieval_metrics,
    zeroshot_evaluate,
)
from moco_mm.model import DualQueueMoCo, load_tokenizer, momentum_at, resolve_init
from moco_mm.train.checkpoint import (
    BackgroundWriter,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
    step_dir_name,
)
from moco_mm.train.parallel import gathered, load_whole
from moco_mm.train.preempt import EXIT_PREEMPTED, Preempted, Preemption, clear_marker, write_marker
from moco_mm.train.run_log import MetricsLog, ProgressBar, TensorBoardLogger, WandbLogger
from moco_mm.train.step import TrainStep

log = logging.getLogger("moco_mm.train")

# Config sections whose change makes a checkpoint's tensors or data position meaningless.
_SHAPE_KEYS = ("model", "queue")


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for (run seed, rank), different for every rank, stable across runs."""
    digest = hashlib.sha256(f"moco_mm/rank-rng/{seed}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Counters:
    """Run totals that survive a resume."""

    skipped_samples: int = 0  # corrupt samples the loader skipped (all ranks)
    bad_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    consecutive_bad: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Trainer:
    def __init__(self, cfg: Config, info: D.DistInfo):
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.run_dir = Path(cfg.run.output_dir)
        self.zeroshot = self._open_zeroshot()  # the data checked against its classes before any model exists
        # Identical seed on every rank: identical initial weights without a broadcast.
        torch.manual_seed(cfg.run.seed)
        resolve_init(cfg.model)  # a CLIP start fixes embed_dim, image_size and the tokenizer
        self.tokenizer = load_tokenizer(cfg.model.text)
        self.model = DualQueueMoCo(cfg.model, cfg.queue, vocab_size=len(self.tokenizer)).to(self.device)
        # From here on each rank draws its own dropout and drop-path masks: the seed above
        # made construction identical everywhere (the key towers are copies DDP never
        # broadcasts); left as it is, row j of every rank's batch would get the same mask.
        torch.manual_seed(rank_seed(cfg.run.seed, info.rank))  # CPU and every CUDA device
        # Channels-last, compile, DDP over the query towers, fused AdamW, autocast: the step.
        self.stepper = TrainStep(self.model, cfg, self.device, info.world_size, info.local_rank)
        self.optimizer = self.stepper.optimizer
        self.sharded = self.stepper.sharded  # FSDP: sharded checkpoints, every rank writes
        self.pending_skipped = 0  # corrupt samples skipped on this rank since the last reduction

        self.source = ShardSource.from_spec(cfg.data.train)
        self.batches_per_epoch = steps_per_epoch(
            self.source, batch_size=cfg.data.batch_size, world_size=info.world_size, workers=cfg.data.workers)
        if self.batches_per_epoch < 1:
            raise ConfigError(
                f"data.batch_size: {cfg.data.batch_size} per rank x {info.world_size} ranks leaves no full "
                f"batch in an epoch of {cfg.data.train}")
        tower = self.model.query.image
        mean, std, size, interp = tower.mean, tower.std, cfg.model.image.image_size, tower.interpolation
        self.train_transform = build_transforms(size, mean, std, train=True, crop_scale_min=cfg.data.crop_scale_min,
                                                hflip=cfg.data.hflip, interpolation=interp)
        self.eval_transform = build_transforms(size, mean, std, train=False, interpolation=interp)

        if info.is_main:
            for warning in queue_warnings(cfg, info.world_size):
                log.warning(warning)
        self.step = 0  # optimizer steps done
        self.loader_state = LoaderState.start(0, cfg.data.workers)
        self.counters = Counters()
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep)
        self.writer = BackgroundWriter(self.ckpt)  # rank 0 writes checkpoints off the training thread
        self.preemption = Preemption(D.store() if info.world_size > 1 else None, info.rank)
        self.last_eval: dict[str, float] = {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every model tensor under stable names: query.*, key.*, image_queue.*, text_queue.*."""
        return self.model.state_dict()

    def train_state(self) -> dict:
        """Everything but the weights (and, sharded, the optimizer: it is in the shards);
        collective: every rank must call it."""
        self.flush_counters()
        return {
            "step": self.step,
            "world_size": self.info.world_size,
            "loader": D.gather_objects(self.loader_state.to_dict()),
            "rng": D.gather_objects(capture_rng_state()),
            **({} if self.sharded else {"optimizer": self.optimizer.state_dict()}),
            "counters": self.counters.to_dict(),
            "config": to_dict(self.cfg),
        }

    def sharded_state(self) -> dict:
        """What a sharded checkpoint holds per rank: the model state (FSDP shards of the
        towers, replicated queues, scalars, buffers) and the optimizer's, keyed by
        parameter name."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {"model": self.model.state_dict(), "optim": get_optimizer_state_dict(self.model, self.optimizer)}

    def save_checkpoint(self) -> float:
        """Checkpoint this step (collective). Whole towers: rank 0 copies the state to the
        CPU and hands it to the background writer (which first waits for the previous write
        and raises its failure); training goes on while it writes. Sharded: every rank
        writes its shards now (`CheckpointManager.save_sharded`). Returns the seconds this
        thread spent."""
        t0 = time.perf_counter()
        state = self.train_state()  # collective
        if self.sharded:
            self.ckpt.save_sharded(self.step, self.sharded_state(), state)
        elif self.info.is_main:
            self.writer.submit(self.step, self.state_tensors(), state)
        # No barrier: a kill while the write runs leaves the previous complete checkpoint,
        # and every rank resumes from the same one.
        return time.perf_counter() - t0

    def restore(self) -> None:
        """Apply checkpoint.resume / checkpoint.init_weights."""
        c = self.cfg.checkpoint
        if self.sharded:
            self._restore_sharded()
        elif c.resume not in ("auto", "none"):
            try:
                tensors, state = CheckpointManager.load(Path(c.resume))
            except CheckpointError as e:
                raise SystemExit(f"checkpoint.resume: {e}") from e
            self._load_full(Path(c.resume), tensors, state)
        elif c.resume == "auto":
            found = self.ckpt.load_latest_valid()
            if found is not None:
                self._load_full(*found)
                return
        if c.init_weights and self.step == 0:
            self._load_weights_only(Path(c.init_weights))

    def _restore_sharded(self) -> None:
        """checkpoint.resume for sharded towers: every rank loads its own shards."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        c = self.cfg.checkpoint
        if c.resume == "none":
            return
        loaded = self.sharded_state()  # DCP reads into these tensors in place

        def check(path: Path, state: dict) -> None:
            self._check_compatible(path, state["config"])

        try:
            if c.resume == "auto":
                found = self.ckpt.load_latest_valid_sharded(loaded, check=check)
                if found is None:
                    # A fresh start. Building the optimizer's state dict ran one zero step to
                    # create its state (lr 0, weights unchanged): drop that state, or AdamW's
                    # bias correction would start from step 2.
                    self.optimizer.state.clear()
                    return
                path, state = found
            else:
                path = Path(c.resume)
                state = self.ckpt.load_sharded(path, loaded, check=check)  # refuses a whole-model one
        except CheckpointError as e:
            raise SystemExit(f"checkpoint.resume: {e}; resume it with the run.parallel it was written with, "
                             f"or start from its weights: checkpoint.init_weights=<step dir> "
                             f"checkpoint.resume=none") from e
        self.model.load_state_dict(loaded["model"])
        # The optimizer's state is keyed by parameter name: the layout of its groups may differ.
        set_optimizer_state_dict(self.model, self.optimizer, loaded["optim"])
        self._load_train_state(path, state)

    def _load_full(self, path: Path, tensors: dict, state: dict) -> None:
        self._check_compatible(path, state["config"])
        if "optimizer" not in state:
            raise SystemExit(f"checkpoint.resume: {path} was written by a sharded (run.parallel=fsdp) run or "
                             f"consolidated from one: resume it with run.parallel=fsdp, or start from its weights: "
                             f"checkpoint.init_weights={path} checkpoint.resume=none")
        self.model.load_state_dict(tensors)
        self.optimizer.load_state_dict(state["optimizer"])
        self._load_train_state(path, state)

    def _load_train_state(self, path: Path, state: dict) -> None:
        """Step, counters, data position and RNG from a checkpoint's train state."""
        self.step = int(state["step"])
        self.counters = Counters(**state["counters"])
        rank = self.info.rank
        same_layout = (state["world_size"] == self.info.world_size
                       and state["config"]["data"]["workers"] == self.cfg.data.workers
                       and state["config"]["data"]["batch_size"] == self.cfg.data.batch_size)
        loader = LoaderState.from_dict(state["loader"][rank if same_layout else 0])
        if same_layout:
            self.loader_state = loader
            restore_rng_state(state["rng"][rank])
        else:
            # The data order is a function of world size, workers and batch size: a new
            # layout cannot continue the old stream, so continue from the same epoch.
            log.warning("resuming %s with a different world size / data.workers / data.batch_size: "
                        "the data stream restarts at epoch %d; resume is no longer exact", path, loader.epoch)
            self.loader_state = LoaderState.start(loader.epoch, self.cfg.data.workers)
        if self.info.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def _check_compatible(self, path: Path, saved: dict) -> None:
        now = to_dict(self.cfg)
        for section in _SHAPE_KEYS:
            diff = _first_difference(saved.get(section, {}), now[section], section)
            if diff:
                key, old, new = diff
                raise SystemExit(
                    f"checkpoint {path} was trained with {key}={old!r}, this config has {new!r}: "
                    f"cannot resume. Start a new run.output_dir, or load only the weights with "
                    f"checkpoint.init_weights={path} checkpoint.resume=none")

    def _load_weights_only(self, path: Path) -> None:
        tensors, _ = CheckpointManager.load(path)
        own = self.model.state_dict()
        wanted = {k: v for k, v in tensors.items() if k.startswith(("query.", "key."))}
        bad = [k for k, v in wanted.items() if k in own and own[k].shape != v.shape]
        if bad:
            raise SystemExit(f"checkpoint.init_weights: {path} has other shapes for {bad[:5]}")
        loaded = {k: v for k, v in wanted.items() if k in own}
        if self.model.has_key_towers and not any(k.startswith("key.") for k in loaded):
            # Weights from a CLIP-mode run (no key towers): the key towers start, as they
            # always do, as exact copies of the query towers.
            twins = {"key." + k.removeprefix("query."): v for k, v in loaded.items() if k.startswith("query.")}
            loaded.update({k: v for k, v in twins.items() if k in own})
        missing = [k for k in own if k.startswith(("query.", "key.")) and k not in loaded]
        load_whole(self.model, loaded)  # sharded: each rank keeps its shards of them
        if self.info.is_main:
            log.info("loaded weights from %s (%d tensors; %d not in it, kept fresh)", path, len(loaded), len(missing))

    # --- data --------------------------------------------------------------------------

    def _batches(self):
        """Micro-batches forever, epoch after epoch, from one loader whose worker processes
        start once (`make_stream`); the caller keeps `loader_state` current with each batch.
        Images arrive as uint8: the image towers normalise them on the device."""
        d = self.cfg.data
        stream = make_stream(
            self.source, batch_size=d.batch_size, tokenizer=self.tokenizer,
            max_length=self.cfg.model.text.max_length, transform=self.train_transform,
            seed=self.cfg.run.seed, state=self.loader_state, rank=self.info.rank, world_size=self.info.world_size,
            workers=d.workers, shuffle_buffer=d.shuffle_buffer, max_consecutive_bad=d.max_consecutive_bad,
            pin_memory=pin_memory_for(d.pin_memory, self.device), prefetch_factor=d.prefetch_factor,
            pipe_retries=d.pipe_retries, pipe_backoff_s=d.pipe_backoff_s,
        )
        with stream:  # closing the generator stops the worker processes
            yield from stream

    # --- one optimizer step ------------------------------------------------------------

    def distill_alpha(self) -> float:
        """This step's momentum-distillation weight: `model.distill_alpha`, ramped linearly
        from 0 over `model.distill_warmup_steps` optimizer steps (-1: the first epoch, as
        ALBEF does)."""
        m = self.cfg.model
        if m.distill_alpha <= 0 or not m.momentum_encoder:
            return 0.0
        warmup = m.distill_warmup_steps
        if warmup < 0:
            warmup = max(1, self.batches_per_epoch // self.cfg.optim.accum_steps)
        return m.distill_alpha * (min(1.0, self.step / warmup) if warmup > 0 else 1.0)

    def train_step(self, batches, stats: bool = True) -> dict:
        """One optimizer step over `optim.accum_steps` micro-batches from `batches`.

        `stats` (logging steps): also return the metrics — losses, similarities, counters,
        reduced over ranks in ONE packed all-reduce. Other steps make one host sync (the
        finiteness decision) and no collective beyond each micro-batch's gather and DDP's
        gradient buckets; they return only `finite` and `data_s`.

        A step whose loss (on any rank) or gradient norm is not finite is skipped: weights,
        key towers, BatchNorm running statistics, queues and optimizer state stay exactly
        as they were; the step counter and the data position advance (its batches are
        consumed and not retried).
        """
        cfg = self.cfg
        accum = cfg.optim.accum_steps
        alpha = self.distill_alpha()
        data_s = 0.0

        def micro_batches():
            nonlocal data_s
            for _ in range(accum):
                t0 = time.perf_counter()
                batch = next(batches)
                data_s += time.perf_counter() - t0
                self.loader_state.update(batch)
                self.pending_skipped += int(batch["n_skipped"])  # reduced over ranks on logging steps
                yield {k: batch[k].to(self.device, non_blocking=True)
                       for k in ("image", "input_ids", "attention_mask", "sample_id", "fingerprints") if k in batch}

        r = self.stepper(self.step, micro_batches(), accum=accum, distill_alpha=alpha, stats=stats)
        if r.finite:
            self.counters.consecutive_bad = 0
        else:
            self.counters.bad_steps += 1
            self.counters.consecutive_bad += 1
        m = momentum_at(self.step, cfg.run.steps, cfg.model.momentum, cfg.model.momentum_schedule)
        self.step += 1
        result = {"finite": r.finite, "data_s": data_s}
        if not stats:
            return result
        # Logging step: everything reduced in one packed all-reduce, read back at once.
        neg = r.neg_sim if torch.is_tensor(r.neg_sim) else torch.tensor(float("nan"))
        local = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(())
                             for v in (r.loss, r.loss_i2t, r.loss_t2i, r.pos_sim, neg)]
                            + [torch.tensor(float(self.pending_skipped), device=self.device),
                               self.model.query.temperature().detach().float(), r.grad_norm.detach().float()]
                            + [p.detach().float() for p in self.model.query.loss_scalars.values()])
        total = D.all_reduce_sum(local).tolist()
        w = self.info.world_size
        loss, loss_i2t, loss_t2i, pos_sim, neg_sim = (v / w for v in total[:5])
        self.counters.skipped_samples += int(round(total[5]))
        self.pending_skipped = 0
        result.update({
            "loss": loss, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "lr": r.lr,
            **({"momentum": m} if self.model.has_key_towers else {}),
            "temperature": total[6] / w, "grad_norm": total[7] / w, "pos_sim": pos_sim, "neg_sim": neg_sim,
            "queue_fill": len(self.model.image_queue) / max(self.model.image_queue.size, 1),
        })
        if alpha > 0 or cfg.model.distill_alpha > 0:
            result["distill_alpha"] = alpha
        for j, name in enumerate(self.model.query.loss_scalars):
            result[f"loss/{name}"] = total[8 + j] / w
        return result

    def flush_counters(self) -> None:
        """Add every rank's skipped samples not yet counted (collective: all ranks)."""
        self.counters.skipped_samples += int(D.all_reduce_sum(
            torch.tensor(float(self.pending_skipped), device=self.device)).item())
        self.pending_skipped = 0

    # --- eval --------------------------------------------------------------------------

    def _open_zeroshot(self) -> tuple[LabeledImages, tuple[str, ...]] | None:
        z = self.cfg.eval.zeroshot
        if not z.data:
            return None
        try:
            data = open_labeled(z.data, read_classes(z.classes))
            templates = read_templates(z.templates) if z.templates else ZEROSHOT_TEMPLATES
        except (ZeroShotError, DataError) as e:
            raise ConfigError(f"eval.zeroshot.data: {e}") from None
        if self.info.is_main and len(data.classes) < TOP5_MIN_CLASSES:
            log.info("eval.zeroshot: %d classes, so eval/zeroshot_top5 is not logged (it needs at least %d)",
                     len(data.classes), TOP5_MIN_CLASSES)
        return data, templates

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out retrieval (data.val) and zero-shot classification (eval.zeroshot) with the
        query towers, divided between the ranks: each embeds its share (whole batches dealt
        out in turn), the shares are gathered (collectives bounded by the process-group
        timeout) and every rank computes the same numbers as one process would: no rank idles
        at a barrier while rank 0 evaluates. One process: no collective."""
        metrics: dict[str, float] = {}
        # Sharded towers are gathered once for the whole evaluation: ranks embed different
        # numbers of batches, which per-forward all-gathers could not match up.
        with gathered(self.model.query):
            if self.cfg.data.val:
                metrics.update(self.evaluate_retrieval())
            if self.zeroshot is not None:
                metrics.update(self.evaluate_zeroshot())
        self.last_eval = metrics
        return metrics

    @torch.no_grad()
    def evaluate_zeroshot(self) -> dict[str, float]:
        """CLIP's prompt-ensemble zero-shot classification of eval.zeroshot.data (the same
        code as `moco-mm eval-zeroshot`) -> zeroshot_top1, _top5 (6+ classes), _mean_per_class,
        _n_images."""
        data, templates = self.zeroshot
        q = self.model.query
        max_length = self.cfg.model.text.max_length

        def embed_images(pixels: torch.Tensor) -> torch.Tensor:
            with self.stepper.autocast():
                return q.image(pixels.to(self.device)).float()

        def embed_texts(texts: list[str]) -> torch.Tensor:
            tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                                 return_tensors="pt")
            with self.stepper.autocast():
                return q.text(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)).float()

        q.eval()
        try:
            # Each rank classifies its share of the images; the class embeddings are computed
            # whole on every rank (classes x templates prompts: small next to the images).
            result = zeroshot_evaluate(embed_images, embed_texts,
                                       data.batches(self.eval_transform, self.cfg.data.batch_size,
                                                    workers=self.cfg.data.workers, rank=self.info.rank,
                                                    world_size=self.info.world_size),
                                       data.classes, templates, gather=self._gather_eval)
        finally:
            q.train()
        return result.metrics("zeroshot_")

    def _gather_eval(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every rank's rows of each CPU tensor, in rank order, on the CPU (through the
        device: NCCL gathers CUDA tensors). Identity for one process."""
        if self.info.world_size == 1:
            return xs
        return tuple(x.cpu() for x in D.all_gather_varlen(*(x.to(self.device) for x in xs)))

    @torch.no_grad()
    def evaluate_retrieval(self) -> dict[str, float]:
        """Retrieval on the held-out shards (data.val) with the query towers.

        Rank r embeds the batches r, r + W, r + 2W, ... of the first eval.max_samples samples
        (whole batches: the same batches, so the same bits, as one process); the embeddings
        and each sample's position are gathered and put back in the single-process order, so
        the similarity matrix, and the metrics, are those of one process (ties included)."""
        cfg = self.cfg
        q = self.model.query
        q.eval()
        dim = cfg.model.embed_dim
        imgs, txts = [torch.zeros(0, dim)], [torch.zeros(0, dim)]
        img_pos, txt_owner = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
        try:
            for batch in iter_eval_batches(
                    ShardSource.from_spec(cfg.data.val), batch_size=cfg.data.batch_size,
                    transform=self.eval_transform, tokenizer=self.tokenizer,
                    max_length=cfg.model.text.max_length, max_samples=cfg.eval.max_samples,
                    rank=self.info.rank, world_size=self.info.world_size, block=cfg.data.batch_size,
                    pipe_retries=cfg.data.pipe_retries, pipe_backoff_s=cfg.data.pipe_backoff_s):
                with self.stepper.autocast():
                    imgs.append(q.image(batch["image"].to(self.device)).float().cpu())
                    txts.append(q.text(batch["input_ids"].to(self.device),
                                       batch["attention_mask"].to(self.device)).float().cpu())
                img_pos.append(batch["position"])
                # Caption owners by the image's position (sample ids need not be unique).
                txt_owner.append(torch.tensor([int(p) for p, caps in zip(batch["position"], batch["captions"])
                                               for _ in caps], dtype=torch.int64))
        finally:
            q.train()
        img, txt, pos, owner = self._gather_eval(torch.cat(imgs), torch.cat(txts), torch.cat(img_pos),
                                                 torch.cat(txt_owner))
        if self.info.world_size > 1:
            # Back to the single-process order: images by position; captions by their image's
            # position, a stable sort (an image's captions arrive together, in order).
            order = torch.argsort(pos)
            img, pos = img[order], pos[order]
            by_owner = torch.sort(owner, stable=True).indices
            txt, owner = txt[by_owner], owner[by_owner]
        if not len(pos):
            raise DataError(f"data.val: no readable held-out sample in {cfg.data.val}")
        txt_to_img = torch.searchsorted(pos, owner)
        metrics = retrieval_metrics(img @ txt.t(), txt_to_img)
        metrics["n_images"], metrics["n_captions"] = float(len(pos)), float(len(txt_to_img))
        return metrics

    # --- the loop ----------------------------------------------------------------------

    def train(self) -> None:
        """`_train` with SIGTERM / SIGUSR1 caught (preemption: preempt.py) and the background
        checkpoint write always waited for: at the end, at a stop, and on an error (whose
        own exception is the one raised; a failed write is then logged)."""
        self.preemption.install()
        try:
            self._train()
        except BaseException:
            if self.info.is_main:
                try:
                    self.writer.wait()
                except CheckpointError as e:
                    log.error("%s", e)
            raise
        finally:
            self.preemption.uninstall()

    def _train(self) -> None:
        cfg = self.cfg
        main = self.info.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        self.restore()
        if main:
            clear_marker(self.run_dir)  # a preempted run has resumed
        metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=main, resume_step=self.step)
        wandb = WandbLogger(cfg, enabled=main)
        tensorboard = TensorBoardLogger(self.run_dir / "tensorboard", enabled=main and cfg.logging.tensorboard,
                                        resume_step=self.step)
        bar = ProgressBar(total=cfg.run.steps, initial=self.step, enabled=main and cfg.logging.progress)
        global_batch = cfg.data.batch_size * self.info.world_size * cfg.optim.accum_steps
        batches = self._batches()
        window_t, window_steps, window_data = time.perf_counter(), 0, 0.0
        stop_reason, preempt = None, False
        while self.step < cfg.run.steps:
            next_step = self.step + 1
            m = self.train_step(batches, stats=next_step % cfg.run.log_every == 0 or next_step == cfg.run.steps)
            window_steps += 1
            window_data += m.pop("data_s")
            finite = m.pop("finite")
            if not finite and main:
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)",
                            self.step, self.counters.consecutive_bad)
            if self.counters.consecutive_bad >= cfg.optim.max_bad_steps:
                stop_reason = (f"{self.counters.consecutive_bad} consecutive steps with a non-finite loss or "
                               f"gradient (optim.max_bad_steps={cfg.optim.max_bad_steps}); the last good "
                               f"state is saved at step {self.step}. Lower optim.lr or check the data.")
            log_now = "loss" in m or stop_reason  # train_step computed the metrics of a logging step
            # A store call, no collective (preempt.py); at the last step the run just ends.
            preempt = self.preemption.should_stop(self.step) and self.step < cfg.run.steps
            checkpoint_now = (self.step % cfg.checkpoint.every == 0 or self.step == cfg.run.steps
                              or bool(stop_reason) or preempt)
            record = None
            if log_now:
                if "loss" not in m:  # a stop between logging steps: the counters, reduced now
                    self.flush_counters()
                elapsed = time.perf_counter() - window_t
                m.update(step=self.step, samples_per_s=global_batch * window_steps / max(elapsed, 1e-9),
                         data_wait_frac=window_data / max(elapsed, 1e-9),
                         skipped_samples=self.counters.skipped_samples, bad_steps=self.counters.bad_steps,
                         epoch=self.loader_state.epoch)
                if self.device.type == "cuda":
                    m["cuda_max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                if cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == cfg.run.steps):
                    m.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                record = m
            elif cfg.eval.every and self.step % cfg.eval.every == 0:
                record = {f"eval/{k}": v for k, v in self.evaluate().items()}
                record["step"] = self.step
            if checkpoint_now:
                # The checkpoint's cost to this thread goes in the step's own record (one line
                # per step: readers keep the last line of a step); the write continues behind.
                record = (record or {"step": self.step}) | {"checkpoint_stall_s": self.save_checkpoint()}
            if record is not None:
                metrics_log.write(record)
                wandb.log(record, self.step)
                tensorboard.log(record, self.step)
                if log_now:
                    bar.update_to(self.step, record)
                    window_t, window_steps, window_data = time.perf_counter(), 0, 0.0
            if checkpoint_now:
                tensorboard.flush()  # the events up to a checkpoint are on disk with it
            if stop_reason or preempt:
                break
        bar.close()
        wandb.finish()
        tensorboard.close()
        if main:
            self.writer.wait()  # the last checkpoint complete; a failed write is raised here
        if preempt:
            if main:
                write_marker(self.run_dir, self.step, self.preemption.signame,
                             self.ckpt.root / step_dir_name(self.step))
            log.warning("rank %d: preempted (%s): checkpoint of step %d written, exiting with status %d",
                        self.info.rank, self.preemption.signame, self.step, EXIT_PREEMPTED)
            D.barrier()  # no rank exits (torchrun then stops the rest) before the checkpoint is complete
            raise Preempted(self.step, self.preemption.signame)
        if stop_reason:
            raise SystemExit(stop_reason)
        if main:
            print(f"done: {self.step} steps; checkpoints in {self.ckpt.root}", flush=True)
            if "zeroshot_top1" in self.last_eval:
                z = self.last_eval
                top5 = f", top-5 {z['zeroshot_top5']:.2f}%" if "zeroshot_top5" in z else ""
                print(f"zero-shot classification at step {self.step} ({int(z['zeroshot_n_images'])} images, "
                      f"{len(self.zeroshot[0].classes)} classes): top-1 {z['zeroshot_top1']:.2f}%{top5}, "
                      f"mean per-class {z['zeroshot_mean_per_class']:.2f}%", flush=True)
            if "n_images" in self.last_eval:
                n_img = int(self.last_eval["n_images"])
                n_txt = int(self.last_eval["n_captions"])
                print(f"held-out retrieval at step {self.step} ({n_img} images, {n_txt} captions; "
                      f"R@1 by chance: {100 / n_img:.2f}%)", flush=True)
                print(format_table(self.last_eval), flush=True)


def _first_difference(old, new, prefix: str):
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            d = _first_difference(old.get(k), new.get(k), f"{prefix}.{k}")
            if d:
                return d
        return None
    return None if old == new else (prefix, old, new)
