"""Training recipes: typed dataclasses loaded from YAML, with `--set key=value` overrides.

A recipe is `recipes/<name>.yaml` (or any YAML path). Every key is checked against the dataclasses below, so a
typo or a wrong type fails before anything is built, with a message that lists what is valid. The model name is
checked later (at run time, against OpenCLIP's registry), because recipes may name towers that register later.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

RECIPE_DIR = Path(__file__).resolve().parents[3] / "recipes"  # repository checkout: <repo>/recipes


@dataclass
class ModelConfig:
    name: str = "DeFocus-Mamba-Tiny-8"  # an OpenCLIP model name (ours are registered on `import defocus_clip`)
    pretrained: str | None = None  # an OpenCLIP pretrained tag or a file to start from
    force_image_size: int | None = None  # train at another resolution than the config's
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile every block in place (towers/compile.py); for GPUs; not with ZeRO-3
    compile_backend: str = "inductor"  # torch.compile backend: inductor, or aot_eager / eager to debug a compile


@dataclass
class DataConfig:
    source: str = "wds"  # wds | synthetic | demo (the embedded demo set, built on first use)
    train_shards: str | None = None  # brace pattern, a folder of .tar, or several joined with '::'
    samples_per_epoch: int | None = None  # default: sizes.json / img2dataset *_stats.json beside the shards
    micro_batch_size: int | None = None  # per process and forward pass; default: global batch / world size
    workers: int = 2  # DataLoader workers per process
    shuffle_buffer: int = 2000  # samples held for shuffling (per worker)
    synthetic_captions: int = 16  # synthetic source: number of distinct caption/image classes


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.1


@dataclass
class ScheduleConfig:
    epochs: int = 1
    global_batch_size: int = 256  # samples per optimiser step over all processes (incl. grad accumulation)
    warmup_steps: int = 100
    min_lr: float = 0.0  # cosine floor
    max_steps: int | None = None  # stop early (smoke runs); the schedule still spans `epochs`


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1  # 0-3
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_clip: float | None = 1.0  # max global grad norm; null = off
    extra: dict = field(default_factory=dict)  # merged into the generated DeepSpeed config (expert use)


@dataclass
class DropPathConfig:
    schedule: str = "none"  # none | constant | linear (min -> max over training, per step)
    min: float = 0.1
    max: float = 0.1


@dataclass
class AuxLossConfig:
    weight: float = 0.0  # weight of the contrastive loss on the projected mean image token; 0 = off


@dataclass
class LoggingConfig:
    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar on rank 0


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # also at the end of training
    keep_last: int = 3  # complete checkpoints kept; 0 = keep all


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = only at the end
    datasets: list[str] = field(default_factory=list)  # clip-benchmark names (wds/...) or local wds folders
    dataset_root: str | None = None  # clip-benchmark root; '{dataset}' is replaced by the dataset name
    batch_size: int = 64
    at_end: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    drop_path: DropPathConfig = field(default_factory=DropPathConfig)
    aux_loss: AuxLossConfig = field(default_factory=AuxLossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    max_nonfinite_in_a_row: int = 5  # stop the run after this many consecutive NaN/Inf losses
    recipe: str = ""  # filled in by `load_recipe`: the name or path it came from

    def validate(self) -> None:
        """Value checks that need no model or data (the model name is checked when the model is built)."""
        def bad(key: str, value: Any, valid: str) -> ConfigError:
            return ConfigError(f"recipe {self.recipe or '<inline>'}: {key}={value!r} is invalid; {valid}")

        if self.data.source not in ("wds", "synthetic", "demo"):
            raise bad("data.source", self.data.source, "valid: wds, synthetic, demo")
        if self.data.source == "wds" and not self.data.train_shards:
            raise bad("data.train_shards", self.data.train_shards, "set it to your shards, e.g. "
                      "--set data.train_shards='/data/laion400m/{00000..41407}.tar'")
        if self.deepspeed.zero_stage not in (0, 1, 2, 3):
            raise bad("deepspeed.zero_stage", self.deepspeed.zero_stage, "valid: 0, 1, 2, 3")
        if self.deepspeed.precision not in ("fp32", "bf16", "fp16"):
            raise bad("deepspeed.precision", self.deepspeed.precision, "valid: fp32, bf16, fp16")
        if self.drop_path.schedule not in ("none", "constant", "linear"):
            raise bad("drop_path.schedule", self.drop_path.schedule, "valid: none, constant, linear")
        if not (0 <= self.drop_path.min <= 1 and 0 <= self.drop_path.max <= 1):
            raise bad("drop_path.min/max", (self.drop_path.min, self.drop_path.max), "rates must be in [0, 1]")
        for key, value in (("schedule.epochs", self.schedule.epochs), ("schedule.global_batch_size",
                           self.schedule.global_batch_size), ("logging.every_steps", self.logging.every_steps),
                           ("checkpoint.every_steps", self.checkpoint.every_steps),
                           ("max_nonfinite_in_a_row", self.max_nonfinite_in_a_row)):
            if value < 1:
                raise bad(key, value, "must be >= 1")
        if self.schedule.max_steps is not None and self.schedule.max_steps < 1:
            raise bad("schedule.max_steps", self.schedule.max_steps, "must be >= 1 or null")
        if self.model.compile and self.deepspeed.zero_stage == 3:
            raise bad("model.compile", True, "not with deepspeed.zero_stage=3, whose parameter-gathering hooks "
                      "cannot be traced into compiled blocks; use ZeRO 0-2 or model.compile=false")
        if self.aux_loss.weight < 0:
            raise bad("aux_loss.weight", self.aux_loss.weight, "must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- loading
def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe name from `recipes/` or a path to a YAML file."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {str(path)!r} does not exist")
        return path
    candidate = RECIPE_DIR / f"{recipe}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown recipe {str(recipe)!r}; known recipes ({RECIPE_DIR}): "
                          f"{', '.join(list_recipes()) or '(none)'}; or pass a path to a YAML file")
    return candidate


def load_recipe(recipe: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a recipe by name or path, apply `key=value` overrides (dotted keys), validate and return it."""
    path = resolve_recipe_path(recipe)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = from_dict(TrainConfig, raw, where=str(recipe))
    cfg.recipe = str(recipe)
    cfg.validate()
    return cfg


def config_from_dict(raw: dict, recipe: str = "<dict>") -> TrainConfig:
    cfg = from_dict(TrainConfig, raw, where=recipe)
    cfg.recipe = cfg.recipe or recipe
    cfg.validate()
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', YAML-parsed value): `3` is an int, `[1, 2]` a list, `null` None."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-3")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, where: str, prefix: str = ""):
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'recipe'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, where, prefix + name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, where, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, key)
            except ConfigError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else ConfigError(f"{where}: {key}={value!r} has the wrong type; "
                                                             f"expected {_type_name(tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: {key}={value!r} must be a list of {len(args)} values ({_type_name(tp)})")
        return tuple(_coerce(a, v, where, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if isinstance(value, str):  # --set eval.datasets=wds/a,wds/b
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}={value!r} must be a list ({_type_name(tp)})")
        return [_coerce(arg, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}={value!r} must be a mapping")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML reads 5e-4 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: {key}={value!r} must be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: {key}={value!r} must be an integer")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}={value!r} must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}={value!r} must be a string")
        return value
    raise ConfigError(f"{where}: {key}: unsupported field type {tp}")  # pragma: no cover


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def dump_recipe(cfg: TrainConfig) -> str:
    """The resolved recipe as YAML (tuples as lists, so it loads back)."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)
