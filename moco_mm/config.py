"""Typed run configuration: nested dataclasses, one per concern, loaded from YAML.

`load_config(path, overrides)` is the only way a run gets its configuration. It
checks every key and type against the dataclasses below (a `Literal[...]` field lists
its allowed values), applies `dotted.key=value` overrides, then runs the cross-field
checks in `Config.validate()`. Every error is a `ConfigError` whose message starts with
the dotted key, so a typo stops the run before any model is built.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

# The file a checkpoint step directory gets last (moco_mm/train/checkpoint.py writes it):
# a directory without it is incomplete. Here so that config validation can check
# `checkpoint.resume` paths before any compute without importing the trainer.
CHECKPOINT_MARKER = "COMPLETE"


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible. The message names the key."""


# ---------------------------------------------------------------------------------------
# The concerns
# ---------------------------------------------------------------------------------------


def opt(default: Any, help: str) -> Any:
    """A config field with its one-line help (shown by `moco-mm train --help`). Mutable
    defaults (dict, list) are copied per instance."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class RunConfig:
    output_dir: str = opt("runs/default", "run directory: config.yaml, metrics.jsonl, checkpoints/")
    steps: int = opt(1000, "total optimizer steps")
    seed: int = opt(0, "seed of the initial weights, the data order and augmentation")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto: CUDA when available (NCCL), else the CPU (gloo)")
    precision: Literal["auto", "fp32", "bf16"] = opt("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU")
    compile: bool = opt(False, "torch.compile the query towers' forward")
    log_every: int = opt(10, "steps between metrics.jsonl lines")
    # A hung peer ends the run with an error instead of idling the cluster.
    process_group_timeout_s: int = opt(1800, "bound of every collective wait (eval, checkpoint barriers), seconds")
    deterministic: bool = opt(False, "bit-reproducible CUDA kernels (slower): use_deterministic_algorithms, "
                                     "CUBLAS_WORKSPACE_CONFIG")
    tf32: bool = opt(True, "TF32 for float32 matmuls and convolutions on Ampere and newer GPUs")
    channels_last: Literal["auto", "on", "off"] = opt("auto", "channels-last memory for convolutional image "
                                                              "towers; auto: on CUDA")
    ddp_bucket_mb: int = opt(25, "DDP gradient bucket size in MiB")
    parallel: Literal["ddp", "fsdp"] = opt("ddp", "ddp: whole towers on every rank; fsdp: query and key towers "
                                                  "sharded per block (FSDP2), for towers DDP cannot fit")


@dataclass
class ImageTowerConfig:
    name: str = opt("vit_tiny_patch16_224", "any timm model name")
    pretrained: Union[bool, str] = opt(False, "false | true (timm hub weights) | path to a weights file")
    image_size: int = opt(224, "input side in pixels (train crop and eval resize)")
    kwargs: dict = opt({}, "passed to timm.create_model: embed_dim, depth, num_heads, drop_path_rate, ...")
    trainable_blocks: int = opt(-1, "-1: train all; N: only the last N blocks (and the head)")
    grad_checkpointing: bool = opt(False, "recompute block activations in backward (non-reentrant)")


@dataclass
class TextTowerConfig:
    name: str = opt("bert-base-uncased", "a Hugging Face model type (bert), a local directory or a hub name")
    pretrained: bool = opt(False, "false: build from the config with `overrides` (random init)")
    tokenizer: str = opt("", "tokenizer directory or hub name; empty: same as `name`")
    overrides: dict = opt({}, "set on the HF config: hidden_size, num_hidden_layers, vocab_size, ...")
    pooling: Literal["cls", "mean"] = opt("cls", "cls token, or mean over real (unpadded) tokens")
    max_length: int = opt(32, "tokens per caption (padded and truncated to it)")
    trainable_blocks: int = opt(-1, "-1: train all; N: only the last N blocks")
    grad_checkpointing: bool = opt(False, "recompute block activations in backward (non-reentrant)")


@dataclass
class ModelConfig:
    init_from: str = opt("", "start from a CLIP: a directory saved by OpenCLIP (open_clip_config.json) or "
                             "Hugging Face (CLIPModel / VisionTextDualEncoderModel), open_clip:MODEL_NAME with "
                             "model.init_checkpoint, or hf-hub:ORG/REPO from the local cache. It sets both towers "
                             "and projections, embed_dim, image_size, preprocessing, the tokenizer and the "
                             "temperature (image/text names, head and kwargs are then unused)")
    init_checkpoint: str = opt("", "with init_from open_clip:MODEL_NAME: its weights file (.safetensors/.bin/.pt)")
    image: ImageTowerConfig = section(ImageTowerConfig, "the image tower")
    text: TextTowerConfig = section(TextTowerConfig, "the text tower")
    embed_dim: int = opt(256, "shared embedding dimension of both heads")
    head: Literal["linear", "mlp"] = opt("linear", "projection head from a tower's width to embed_dim")
    head_hidden_dim: int = opt(0, "mlp head only; 0: the tower's width")
    momentum_encoder: bool = opt(True, "false: no key towers, no EMA, no queue: the CLIP objective "
                                       "(needs queue.enabled: false)")
    momentum: float = opt(0.995, "EMA coefficient m of key <- m*key + (1-m)*query")
    momentum_schedule: Literal["constant", "cosine"] = opt("constant", "cosine: m rises to 1.0 over run.steps")
    loss: Literal["infonce", "vse_max", "vse_sum", "contrastive", "triplet", "margin", "multi_similarity",
                  "circle"] = opt("infonce", "the objective, both directions (README: the algorithm)")
    loss_params: dict = opt({}, "the objective's hyper-parameters by name (published defaults otherwise)")
    margin: float = opt(0.2, "the margin of objectives that take one (vse_*); loss_params.margin wins")
    temperature: float = opt(0.07, "initial (or fixed) softmax temperature")
    learn_temperature: bool = opt(True, "train the temperature (as a log), clamped after every step")
    temperature_min: float = opt(0.01, "lower clamp of a learnt temperature")
    temperature_max: float = opt(0.5, "upper clamp of a learnt temperature")
    in_batch_negatives: bool = opt(True, "the gathered batch keys are negatives too, beside the queue")
    mask_duplicates: Literal["none", "text", "image", "both"] = opt(
        "both", "a negative whose caption text / image equals the positive's is not a negative")
    distill_alpha: float = opt(0.0, "ALBEF momentum distillation weight of the key towers' soft targets; 0: off")
    distill_warmup_steps: int = opt(-1, "steps over which distill_alpha ramps up from 0; -1: one epoch (ALBEF)")


@dataclass
class QueueConfig:
    # false: in-batch negatives only; with model.momentum_encoder false as well, this is
    # the CLIP objective (with momentum keys, MoCo v3's).
    enabled: bool = opt(True, "false: no queues (in-batch negatives only)")
    size: int = opt(4096, "rows per modality (any size; wrap-around writes)")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "storage type of the queued keys")


@dataclass
class DataConfig:
    train: str = opt("", "training shards: manifest.json, directory, brace pattern or pipe: URLs ('::' joins)")
    val: str = opt("", "held-out shards for eval during training")
    batch_size: int = opt(32, "per rank, per micro-batch")
    workers: int = opt(2, "DataLoader worker processes per rank")
    shuffle_buffer: int = opt(1000, "raw samples in each reader's shuffle buffer")
    hflip: bool = opt(False, "random horizontal flips (off: captions say left and right)")
    crop_scale_min: float = opt(0.5, "smallest area fraction of the random resized crop")
    # Instead of hanging when nothing matches (e.g. unexpected member names).
    max_consecutive_bad: int = opt(1000, "consecutive samples that yield nothing before the loader stops "
                                         "with an error naming the shard")
    # Workers hand over uint8 batches in shared memory; the trainer normalises on the device.
    prefetch_factor: int = opt(2, "batches each DataLoader worker prepares ahead (with data.workers > 0)")
    pin_memory: Union[bool, Literal["auto"]] = opt("auto", "page-locked batches for asynchronous host-to-device "
                                                           "copies: true | false | auto (on when training on CUDA)")
    pipe_retries: int = opt(3, "a failing remote shard (pipe: command or http) is read again from its start up to "
                               "this many times (the samples already read are skipped); 0: fail at once")
    pipe_backoff_s: float = opt(1.0, "seconds before the first retry of a remote shard, doubling each try")


@dataclass
class OptimConfig:
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on biases, norms, tokens, the temperature)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.98, "AdamW beta2")
    eps: float = opt(1e-6, "AdamW epsilon")
    warmup_steps: int = opt(100, "linear warm-up steps, then cosine decay")
    min_lr_ratio: float = opt(0.0, "the cosine decays to lr * min_lr_ratio")
    grad_clip: float = opt(1.0, "max global gradient norm; 0 disables")
    accum_steps: int = opt(1, "micro-batches per optimizer step")
    max_bad_steps: int = opt(5, "consecutive non-finite steps before the run stops")


@dataclass
class CheckpointConfig:
    every: int = opt(1000, "steps between checkpoints")
    keep: int = opt(2, "complete checkpoints kept (the newest may be half-written: keep >= 2)")
    resume: str = opt("auto", "auto (newest complete checkpoint) | none | a step directory")
    init_weights: str = opt("", "a step directory whose model weights start a new run")


@dataclass
class ZeroShotConfig:
    # CLIP's prompt-ensemble protocol, the same code as `moco-mm eval-zeroshot` (README).
    data: str = opt("", "labelled images: an image folder (one sub-folder per class) or shards with KEY.cls or "
                        "'label' in KEY.json; empty: no zero-shot eval")
    classes: str = opt("", "classes file: one class name per line in sorted sub-folder order, or FOLDER<TAB>name")
    templates: str = opt("", "templates file, one per line with {} for the class name; empty: CLIP's 7 ImageNet "
                             "templates")


@dataclass
class EvalConfig:
    every: int = opt(0, "steps between held-out evaluations; 0 disables")
    max_samples: int = opt(1000, "held-out samples used")
    zeroshot: ZeroShotConfig = section(ZeroShotConfig, "zero-shot classification at eval.every (logged as "
                                                       "eval/zeroshot_top1, _top5, _mean_per_class)")


@dataclass
class LoggingConfig:
    wandb: Literal["disabled", "offline", "online"] = opt("disabled", "Weights & Biases logging")
    project: str = opt("moco_mm", "wandb project")
    run_name: str = opt("", "wandb run name; empty: wandb chooses one")
    progress: bool = opt(True, "the rank-0 progress bar")
    tensorboard: bool = opt(False, "rank 0 also writes every metrics.jsonl line as TensorBoard scalars to "
                                   "RUN_DIR/tensorboard/ (needs the tensorboard package: the 'logging' extra)")


@dataclass
class Config:
    run: RunConfig = section(RunConfig, "the run: directory, steps, seed, device, precision")
    model: ModelConfig = section(ModelConfig, "towers, heads, momentum, objective, temperature")
    queue: QueueConfig = section(QueueConfig, "the two negative queues")
    data: DataConfig = section(DataConfig, "shards, batch, loader")
    optim: OptimConfig = section(OptimConfig, "AdamW, schedule, clipping, accumulation")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "saving and resuming")
    eval: EvalConfig = section(EvalConfig, "held-out retrieval and zero-shot classification during training")
    logging: LoggingConfig = section(LoggingConfig, "wandb, TensorBoard and the progress bar")

    def validate(self, world_size: int = 1) -> "Config":
        """Cross-field checks. Raises ConfigError naming the key; returns self."""
        validate_model(self.model)
        validate_queue(self.queue, self.model)
        _positive("run.steps", self.run.steps)
        _positive("run.log_every", self.run.log_every)
        _positive("run.process_group_timeout_s", self.run.process_group_timeout_s)
        _positive("run.ddp_bucket_mb", self.run.ddp_bucket_mb)
        if self.run.parallel == "fsdp" and self.run.compile:
            raise ConfigError("run.compile: not supported with run.parallel=fsdp yet; set run.compile=false "
                              "(or run.parallel=ddp)")
        _positive("data.batch_size", self.data.batch_size)
        _non_negative("data.workers", self.data.workers)
        _positive("data.max_consecutive_bad", self.data.max_consecutive_bad)
        _positive("data.prefetch_factor", self.data.prefetch_factor)
        _non_negative("data.pipe_retries", self.data.pipe_retries)
        _non_negative("data.pipe_backoff_s", self.data.pipe_backoff_s)
        if not 0.0 < self.data.crop_scale_min <= 1.0:
            raise ConfigError(f"data.crop_scale_min: must be in (0, 1], got {self.data.crop_scale_min}")
        _positive("optim.lr", self.optim.lr)
        _non_negative("optim.weight_decay", self.optim.weight_decay)
        _non_negative("optim.warmup_steps", self.optim.warmup_steps)
        _non_negative("optim.grad_clip", self.optim.grad_clip)
        _positive("optim.accum_steps", self.optim.accum_steps)
        _positive("optim.max_bad_steps", self.optim.max_bad_steps)
        if self.optim.warmup_steps >= self.run.steps:
            raise ConfigError(
                f"optim.warmup_steps: warm-up ({self.optim.warmup_steps}) must be shorter than "
                f"training (run.steps={self.run.steps})"
            )
        if not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.optim.min_lr_ratio}")
        c = self.checkpoint
        if c.resume not in ("auto", "none") and not (Path(c.resume) / CHECKPOINT_MARKER).is_file():
            raise ConfigError(f"checkpoint.resume: auto, none, or a complete step directory; "
                              f"{c.resume!r} is none of these")
        if c.init_weights and not (Path(c.init_weights) / CHECKPOINT_MARKER).is_file():
            raise ConfigError(f"checkpoint.init_weights: {c.init_weights!r} is not a complete step directory")
        _positive("checkpoint.every", self.checkpoint.every)
        _positive("checkpoint.keep", self.checkpoint.keep)
        _non_negative("eval.every", self.eval.every)
        _positive("eval.max_samples", self.eval.max_samples)
        validate_zeroshot(self.eval)
        global_batch = self.data.batch_size * world_size
        if self.queue.enabled and not self.model.in_batch_negatives and self.queue.size < global_batch:
            raise ConfigError(
                f"queue.size: with model.in_batch_negatives off the queue is the only source of "
                f"negatives and must hold at least one global batch ({global_batch} = "
                f"data.batch_size {self.data.batch_size} x world size {world_size}), got {self.queue.size}"
            )
        if self.eval.every and not self.data.val and not self.eval.zeroshot.data:
            raise ConfigError("data.val: eval.every is set but no held-out shards are given (nor "
                              "eval.zeroshot.data)")
        if self.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(TENSORBOARD_MISSING)
        return self


TENSORBOARD_MISSING = ("logging.tensorboard: true needs the tensorboard package, which is not installed: "
                       "pip install 'moco-mm[logging]' (or 'tensorboard>=2.16'), or set logging.tensorboard: false")


def queue_warnings(cfg: Config, world_size: int) -> list[str]:
    """Settings that run but defeat the queue, as sentences with the numbers (logged at
    start-up by the trainer, printed by the memory planner)."""
    if not cfg.queue.enabled:
        return []
    per_step = cfg.optim.accum_steps * world_size * cfg.data.batch_size
    if cfg.queue.size > per_step:
        return []
    return [f"queue.size ({cfg.queue.size}) is not larger than the keys enqueued per optimizer step "
            f"(optim.accum_steps {cfg.optim.accum_steps} x world size {world_size} x data.batch_size "
            f"{cfg.data.batch_size} = {per_step}): every step replaces the whole queue, which then holds only "
            f"the last step's keys; the queue adds few negatives beyond the gathered batch. Raise queue.size "
            f"(MoCo and ALBEF use 65536) or set queue.enabled: false"]


def validate_model(m: ModelConfig) -> None:
    """Checks on the model alone (also run by the model's constructor)."""
    _positive("model.embed_dim", m.embed_dim)
    _non_negative("model.head_hidden_dim", m.head_hidden_dim)
    if not 0.0 <= m.momentum <= 1.0:
        raise ConfigError(f"model.momentum: must be in [0, 1], got {m.momentum}")
    _positive("model.temperature_min", m.temperature_min)
    if m.temperature_min > m.temperature_max:
        raise ConfigError(
            f"model.temperature_min/temperature_max: range inverted "
            f"({m.temperature_min} > {m.temperature_max})"
        )
    if not m.temperature_min <= m.temperature <= m.temperature_max:
        raise ConfigError(
            f"model.temperature: {m.temperature} is outside "
            f"[temperature_min={m.temperature_min}, temperature_max={m.temperature_max}]"
        )
    _non_negative("model.margin", m.margin)
    if not 0.0 <= m.distill_alpha <= 1.0:
        raise ConfigError(f"model.distill_alpha: must be in [0, 1], got {m.distill_alpha}")
    if m.distill_warmup_steps < -1:
        raise ConfigError(f"model.distill_warmup_steps: -1 (one epoch) or a count >= 0, got {m.distill_warmup_steps}")
    _positive("model.image.image_size", m.image.image_size)
    _positive("model.text.max_length", m.text.max_length)
    if m.init_checkpoint and not m.init_from.startswith("open_clip:"):
        raise ConfigError("model.init_checkpoint: only used with model.init_from: open_clip:MODEL_NAME "
                          f"(init_from is {m.init_from!r}; a directory or hf-hub: source holds its weights)")
    if m.init_from.startswith("open_clip:") and not m.init_checkpoint:
        raise ConfigError(f"model.init_checkpoint: model.init_from {m.init_from!r} names an OpenCLIP architecture; "
                          "give its weights file (nothing is downloaded), or point init_from at a directory")
    for key, n in (("model.image.trainable_blocks", m.image.trainable_blocks),
                   ("model.text.trainable_blocks", m.text.trainable_blocks)):
        if n < -1:
            raise ConfigError(f"{key}: -1 (all) or a count >= 0, got {n}")


def validate_zeroshot(e: EvalConfig) -> None:
    """eval.zeroshot: the classes and templates files are read and checked here (errors name
    the key, the file and the line); the data is checked against the classes when the
    trainer starts, before the model is built."""
    z = e.zeroshot
    if not z.data:
        for key, value in (("classes", z.classes), ("templates", z.templates)):
            if value:
                raise ConfigError(f"eval.zeroshot.{key}: set, but eval.zeroshot.data (the labelled images) is not")
        return
    if not z.classes:
        raise ConfigError("eval.zeroshot.classes: needed with eval.zeroshot.data (one class name per line, "
                          "or FOLDER<TAB>class name)")
    if not e.every:
        raise ConfigError("eval.every: eval.zeroshot.data is set but eval.every is 0 (it would never run)")
    from moco_mm.metrics import ZeroShotError, read_classes, read_templates

    for key, read, value in (("classes", read_classes, z.classes), ("templates", read_templates, z.templates)):
        if value:
            try:
                read(value)
            except ZeroShotError as err:
                raise ConfigError(f"eval.zeroshot.{key}: {err}") from None


def validate_queue(q: QueueConfig, m: ModelConfig | None = None) -> None:
    if q.size < 1:
        raise ConfigError(
            f"queue.size: illegal queue size {q.size}, must be >= 1 "
            "(set queue.enabled: false to train without queues)"
        )
    if m is not None and not q.enabled and not m.in_batch_negatives:
        raise ConfigError("queue.enabled: false with model.in_batch_negatives off leaves no negatives")
    if m is not None and q.enabled and not m.momentum_encoder:
        raise ConfigError(
            "model.momentum_encoder: false (no key towers: the CLIP objective) needs queue.enabled: false; "
            "a queue holds momentum keys, and with none it would hold stale query outputs"
        )


def _positive(key: str, v: float) -> None:
    if v <= 0:
        raise ConfigError(f"{key}: must be > 0, got {v}")


def _non_negative(key: str, v: float) -> None:
    if v < 0:
        raise ConfigError(f"{key}: must be >= 0, got {v}")


# ---------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> dataclasses, with key and type checks
# ---------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading scalars as YAML 1.2 and people do: YAML 1.1 (PyYAML's
    rule) needs a dot and a signed exponent in a float, so `2e-3` and `1.0e5` would be
    strings, and it reads `on`/`off`/`yes`/`no` as booleans, so `run.channels_last=on`
    would not be the string `on`. Here only true/false are booleans."""


_YamlLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML as configs and overrides are read (see `_YamlLoader`)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                world_size: int = 1) -> Config:
    """Read YAML (or start from defaults), apply `a.b.c=value` overrides, validate."""
    raw: dict = {}
    if path is not None:
        text = Path(path).read_text()
        raw = parse_yaml(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        _set_dotted(raw, key.strip(), parse_yaml(value) if value.strip() else "")
    cfg = from_dict(Config, raw)
    return cfg.validate(world_size)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: '{p}' is a value, not a section")
        d = nxt
    d[parts[-1]] = value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking keys and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(prefix + c for c in close)}? " if close else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; {hint}allowed keys under "
            f"'{prefix.rstrip('.') or '<root>'}': {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(arm, value, key)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is list or origin is list:
        if isinstance(value, list):
            return list(value)
    else:  # pragma: no cover - a field type this loader does not know is a bug here
        raise TypeError(f"{key}: unsupported config type {tp}")
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML; `load_config` reads it back to an equal Config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; `load_config` reads it back to an equal Config."""
    Path(path).write_text(config_yaml(cfg))


# ---------------------------------------------------------------------------------------
# Discoverability: every key with its type, default and help, from the dataclasses
# ---------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def iter_keys(cls: type = None, prefix: str = "") -> typing.Iterator[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) of every leaf config key, in declaration order."""
    cls = Config if cls is None else cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield f"{prefix}{f.name}", _type_name(tp), default, f.metadata.get("help", "")


def describe_keys() -> str:
    """Every config key as `key (type, default X): help`, grouped by section."""
    lines, section_name = [], None
    for key, tp, default, help_ in iter_keys():
        top = key.split(".", 1)[0]
        if top != section_name:
            section_name = top
            help_section = next(f.metadata.get("help", "") for f in dataclasses.fields(Config) if f.name == top)
            lines.append(f"\n{top}: {help_section}")
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {key} ({tp}; default {shown}): {help_}")
    return "\n".join(lines).lstrip("\n")
