"""Typed run configuration: nested dataclasses, one per concern, loaded from YAML.

`load_config(path, overrides)` is the only way a run gets its configuration. It
checks every key and type against the dataclasses below (a `Literal[...]` field lists
its allowed values), applies `dotted.key=value` overrides, then runs the cross-field
checks in `Config.validate()`. Every error is a `ConfigError` whose message starts with
the dotted key, so a typo stops the run before any model is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible. The message names the key."""


# ---------------------------------------------------------------------------------------
# The concerns
# ---------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    steps: int = 1000  # total optimizer steps
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on CUDA, fp32 on the CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    log_every: int = 10
    # Bounds every collective wait (eval, checkpoint barriers); a hung peer ends the run
    # with an error instead of idling the cluster.
    process_group_timeout_s: int = 1800


@dataclass
class ImageTowerConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name
    pretrained: Union[bool, str] = False  # false | true (timm hub) | path to a weights file
    image_size: int = 224
    # Passed to timm.create_model: widths for models that take them (embed_dim, depth,
    # num_heads for a ViT), drop_path_rate, ...
    kwargs: dict = field(default_factory=dict)
    trainable_blocks: int = -1  # -1: all; N: only the last N blocks (and the head)
    grad_checkpointing: bool = False


@dataclass
class TextTowerConfig:
    name: str = "bert-base-uncased"  # Hugging Face hub name or local directory
    pretrained: bool = False  # false: build from the config with `overrides` (random init)
    tokenizer: str = ""  # hub name or directory; empty: same as `name`
    # Applied to the Hugging Face config: hidden_size, num_hidden_layers,
    # num_attention_heads, intermediate_size, vocab_size, ...
    overrides: dict = field(default_factory=dict)
    pooling: Literal["cls", "mean"] = "cls"
    max_length: int = 32
    trainable_blocks: int = -1
    grad_checkpointing: bool = False


@dataclass
class ModelConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 256
    head: Literal["linear", "mlp"] = "linear"
    head_hidden_dim: int = 0  # mlp only; 0: the tower's width
    # false: no key towers, no EMA, no queue; keys are the other tower's own outputs,
    # gathered with gradient (the CLIP objective). Needs queue.enabled: false.
    momentum_encoder: bool = True
    momentum: float = 0.995
    # cosine: m rises from `momentum` to 1.0 over run.steps (MoCo v3 / BYOL).
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    loss: Literal["infonce", "vse_max", "vse_sum"] = "infonce"
    margin: float = 0.2  # vse_* losses only
    temperature: float = 0.07
    learn_temperature: bool = True
    temperature_min: float = 0.01
    temperature_max: float = 0.5
    in_batch_negatives: bool = True


@dataclass
class QueueConfig:
    # false: in-batch negatives only; with model.momentum_encoder false as well, this is
    # the CLIP objective (with momentum keys, MoCo v3's).
    enabled: bool = True
    size: int = 4096  # rows per modality
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class DataConfig:
    train: str = ""  # shard spec: manifest.json, brace pattern, directory, or pipe: URL
    val: str = ""  # held-out shards for eval during training
    batch_size: int = 32  # per rank, per micro-batch
    workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 1000
    hflip: bool = False  # off by default: captions say "left" and "right"
    crop_scale_min: float = 0.5
    # The loader stops with an error naming the shard when this many consecutive
    # samples yield nothing (e.g. unexpected member names), instead of hanging.
    max_consecutive_bad: int = 1000


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    accum_steps: int = 1
    max_bad_steps: int = 5  # consecutive NaN/inf losses before the run stops


@dataclass
class CheckpointConfig:
    every: int = 1000
    keep: int = 2
    resume: str = "auto"  # auto | none | path to a step directory
    init_weights: str = ""  # load only model weights from this checkpoint into a new run


@dataclass
class EvalConfig:
    every: int = 0  # 0 disables eval during training
    max_samples: int = 1000


@dataclass
class LoggingConfig:
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "moco_mm"
    run_name: str = ""
    progress: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: int = 1) -> "Config":
        """Cross-field checks. Raises ConfigError naming the key; returns self."""
        validate_model(self.model)
        validate_queue(self.queue, self.model)
        _positive("run.steps", self.run.steps)
        _positive("run.log_every", self.run.log_every)
        _positive("run.process_group_timeout_s", self.run.process_group_timeout_s)
        _positive("data.batch_size", self.data.batch_size)
        _non_negative("data.workers", self.data.workers)
        _positive("data.max_consecutive_bad", self.data.max_consecutive_bad)
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
        from moco_mm.checkpoint import MARKER_FILE  # the completion marker's name

        c = self.checkpoint
        if c.resume not in ("auto", "none") and not (Path(c.resume) / MARKER_FILE).is_file():
            raise ConfigError(f"checkpoint.resume: auto, none, or a complete step directory; "
                              f"{c.resume!r} is none of these")
        if c.init_weights and not (Path(c.init_weights) / MARKER_FILE).is_file():
            raise ConfigError(f"checkpoint.init_weights: {c.init_weights!r} is not a complete step directory")
        _positive("checkpoint.every", self.checkpoint.every)
        _positive("checkpoint.keep", self.checkpoint.keep)
        _non_negative("eval.every", self.eval.every)
        _positive("eval.max_samples", self.eval.max_samples)
        global_batch = self.data.batch_size * world_size
        if self.queue.enabled and not self.model.in_batch_negatives and self.queue.size < global_batch:
            raise ConfigError(
                f"queue.size: with model.in_batch_negatives off the queue is the only source of "
                f"negatives and must hold at least one global batch ({global_batch} = "
                f"data.batch_size {self.data.batch_size} x world size {world_size}), got {self.queue.size}"
            )
        if self.eval.every and not self.data.val:
            raise ConfigError("data.val: eval.every is set but no held-out shards are given")
        return self


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
    _positive("model.image.image_size", m.image.image_size)
    _positive("model.text.max_length", m.text.max_length)
    for key, n in (("model.image.trainable_blocks", m.image.trainable_blocks),
                   ("model.text.trainable_blocks", m.text.trainable_blocks)):
        if n < -1:
            raise ConfigError(f"{key}: -1 (all) or a count >= 0, got {n}")


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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                world_size: int = 1) -> Config:
    """Read YAML (or start from defaults), apply `a.b.c=value` overrides, validate."""
    raw: dict = {}
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
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
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; allowed keys under "
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


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; `load_config` reads it back to an equal Config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
