"""The one typed run configuration: dataclasses, loaded from YAML and overridden by flags.

``Config`` is saved resolved into the run directory (``config.yaml``) and into every checkpoint.
Unknown keys are errors that name the key and the valid ones; values are type-checked and range
checked in :meth:`Config.validate` so a typo never becomes a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dnfer.errors import ConfigError, choices_text

#: DNFER's options that used to sit in ``method`` itself and now live in ``method.params``.
LEGACY_METHOD_KEYS = ("alpha", "warmup_epochs", "threshold", "threshold_params")


@dataclass
class DataConfig:
    """Where the images come from and what is done to their labels.

    Attributes:
        spec: ``synthetic`` (embedded default) or ``NAME:PATH`` (rafdb, ferplus, ...).
        options: adapter options (``--data-option K=V``).
        image_size: training side length in px; None = the dataset's default (64 synthetic, else 224).
        noise: injected training-label noise, ``none`` or ``KIND:RATE``.
        noise_file: community noisy-label file (``name label`` lines) applied to the train split.
        noise_matrix: ``(K, K)`` transition matrix file (``.npy`` or text; rows = true class in the
            run's class order) the training labels are drawn from (any taxonomy).
        noise_seed: seed of the noise draw (None = ``train.seed``).
        classes: ``--classes`` selection/merge (e.g. ``surprise,fear,...`` or ``neutral=neutral+contempt``).
        val_fraction: share of the (noisy) training split held out for model selection when the
            dataset has no validation split of its own.
        cache: prepared-cache directory (built on first use, reused when valid).
        skip_bad: skip undecodable images (listed in the run dir) instead of failing.
        augment: ``batched`` (on the training device, per-sample randomness) or ``workers``
            (per-sample torchvision transforms in DataLoader workers).
        workers: DataLoader worker processes (``augment=workers``).
        pad, cutout: weak-view reflect pad and Cutout size in px (None = scaled from the paper's 224-px values).
        randaug_ops, randaug_magnitude: RandAugment of the strong view.
    """

    spec: str = "synthetic"
    options: dict[str, str] = field(default_factory=dict)
    image_size: int | None = None
    noise: str = "none"
    noise_file: str | None = None
    noise_matrix: str | None = None
    noise_seed: int | None = None
    classes: str | None = None
    val_fraction: float = 0.1
    cache: str | None = None
    skip_bad: bool = False
    augment: str = "batched"
    workers: int = 0
    pad: int | None = None
    cutout: int | None = None
    randaug_ops: int = 2
    randaug_magnitude: int = 10


@dataclass
class ModelConfig:
    """Backbone and initial weights (``pretrained``: a local checkpoint file)."""

    name: str = "resnet18"
    pretrained: str | None = None
    allow_partial_pretrained: bool = False
    small_input: bool | None = None
    dropout: float = 0.0


@dataclass
class MethodConfig:
    """Training method and its options.

    Attributes:
        name: registered method (``dnfer``, ``ce``, ...).
        noise_rate: (estimated) noise rate, for methods that need one (co-teaching); methods
            that do not use it ignore it, so one config can serve a sweep over methods.
        params: the method's own options (DNFER: ``alpha``, ``warmup_epochs``, ``threshold``,
            ``threshold_params``, ``kl_log_base``), typed, defaulted and range-checked by the
            method's ``Params`` dataclass (docs/methods.md lists them).
    """

    name: str = "dnfer_plus"
    noise_rate: float | None = None
    params: dict[str, Any] = field(default_factory=dict)


#: The paper's classifier-to-backbone learning-rate ratio (1e-2 vs 1e-3), for a pretrained backbone.
PRETRAINED_HEAD_LR_FACTOR = 10.0


@dataclass
class OptimConfig:
    """Optimiser; defaults follow the paper: Adam, backbone 1e-3, x0.95 per epoch.

    Attributes:
        head_lr: the classifier's learning rate; None = automatic (:meth:`resolved_head_lr`):
            the paper's 10 x ``lr`` (1e-2) when a pretrained backbone is loaded, ``lr`` from
            scratch, where a 10x head rate stalls training (configs/demo.yaml, docs/reproduce.md).
    """

    name: str = "adam"
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    lr_decay: float = 0.95
    grad_clip: float | None = None

    def resolved_head_lr(self, pretrained: str | None) -> float:
        """``head_lr`` if set, else 10 x ``lr`` with a pretrained backbone and ``lr`` without."""
        if self.head_lr is not None:
            return self.head_lr
        return self.lr * PRETRAINED_HEAD_LR_FACTOR if pretrained else self.lr


@dataclass
class TrainConfig:
    """The loop.

    Attributes:
        precision: ``auto`` (bf16 autocast where the CPU/GPU supports it), ``bf16``, ``fp16`` (CUDA), ``fp32``.
        channels_last: None = automatic (on for CUDA and CPU, see engine.device.default_channels_last).
        nan_policy: on a non-finite loss/gradient, ``stop`` (checkpoint and exit) or ``skip`` the step.
        save_every_steps: also checkpoint every N steps inside an epoch (0 = only at epoch ends).
        threads: torch intra-op threads on CPU (None = all cores); set back when ``fit`` ends.
        small_map_conv: ``auto`` runs convolutions with small output maps (<= 7x7) on a mosaic of
            the batch (images side by side, zero columns between) in bf16 CPU training and its
            evaluation passes, which oneDNN's kernels process several times faster
            (engine.cpu_tuning.small_map_conv); ``native``
            leaves every convolution to PyTorch.
        malloc: ``auto`` keeps freed host memory in the process during CPU training (glibc
            ``mallopt``: large blocks from the heap, no trimming), so a step's large activations
            reuse mapped pages instead of page-faulting them in again (engine.cpu_tuning.host_memory);
            ``system`` leaves the C library's defaults.
        keep_checkpoints: keep ``last.prev.pt`` (the fallback of ``--resume``) after the run
            finishes; by default a finished run keeps ``last.pt`` and the weights-only ``best.pt``.
    """

    epochs: int = 40
    batch_size: int = 128
    eval_batch_size: int = 256
    seed: int = 1
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    deterministic: bool = True
    nan_policy: str = "stop"
    save_every_steps: int = 0
    tensorboard: bool = False
    progress: bool = True
    sync_bn: bool = False
    threads: int | None = None
    small_map_conv: str = "auto"
    malloc: str = "auto"
    keep_checkpoints: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str | None = None

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolve_head_lr(self) -> str:
        """Fill in the automatic ``optim.head_lr`` (saved configs then say what ran); returns a
        line that says the value and where it came from."""
        o = self.optim
        if o.head_lr is not None:
            return f"head lr {o.head_lr:g} (optim.head_lr)"
        o.head_lr = o.resolved_head_lr(self.model.pretrained)
        why = (f"{PRETRAINED_HEAD_LR_FACTOR:g} x lr: pretrained backbone" if self.model.pretrained
               else "= lr: backbone from scratch")
        return f"head lr {o.head_lr:g} (automatic, {why}; --head-lr sets it)"

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, *, source: str = "config", saved: bool = False) -> Config:
        """Build from a mapping.

        Args:
            saved: ``raw`` was written by dnfer itself (a checkpoint's or run directory's config),
                possibly by an earlier version: its old layout is migrated silently (DNFER's
                options from ``method`` into ``method.params``). Hand-written configs (False)
                get an error saying where such a key belongs now.
        """
        return _build(cls, raw or {}, source, "", saved)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Config:
        path = Path(path)
        raw = read_yaml(path, what="config file")
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, method, optim, train)")
        return cls.from_dict(raw, source=str(path))

    def override(self, dotted: str, value: Any, *, source: str = "--set") -> None:
        """Set ``section.key`` (or ``section.key.subkey`` inside a dict field) from a flag."""
        section, _, key = dotted.partition(".")
        if section == "method" and key in LEGACY_METHOD_KEYS:
            raise _legacy_method_key_error(source, key)
        parts = dotted.split(".")
        obj: Any = self
        for i, part in enumerate(parts):
            path = ".".join(parts[: i + 1])
            last = i == len(parts) - 1
            if isinstance(obj, dict):
                if last:
                    obj[part] = value
                    return
                obj = obj.setdefault(part, {})
                continue
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                raise ConfigError(f"{source}: unknown config key {path!r}; valid keys here: {choices_text(names)}")
            if last:
                ftype = _field_types(type(obj))[part]
                setattr(obj, part, coerce_value(value, ftype, f"{source} {dotted}"))
                return
            obj = getattr(obj, part)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Range and combination checks; raises ConfigError with one clear sentence."""
        from dnfer.data.noise import parse_noise_spec

        d, m, me, o, t = self.data, self.model, self.method, self.optim, self.train
        parse_noise_spec(d.noise)
        if d.image_size is not None and not 8 <= d.image_size <= 1024:
            raise ConfigError(f"data.image_size must be in [8, 1024], got {d.image_size}")
        if not 0.0 <= d.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
        _choice("data.augment", d.augment, ("batched", "workers"))
        _positive_or_zero("data.workers", d.workers)
        given = [name for name, on in (("--noise", parse_noise_spec(d.noise).kind != "none"),
                                       ("--noise-file", d.noise_file is not None),
                                       ("--noise-matrix", d.noise_matrix is not None)) if on]
        if len(given) > 1:
            raise ConfigError(f"give one of --noise, --noise-file, --noise-matrix, not {' and '.join(given)}")
        if me.noise_rate is not None and not 0.0 <= me.noise_rate < 1.0:
            raise ConfigError(f"method.noise_rate must be in [0, 1), got {me.noise_rate}")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
        _choice("optim.name", o.name, ("adam", "adamw", "sgd"))
        for name in ("lr", "head_lr"):
            value = getattr(o, name)
            if not (value is None and name == "head_lr") and not value > 0:
                raise ConfigError(f"optim.{name} must be > 0, got {value}")
        if not 0.0 < o.lr_decay <= 1.0:
            raise ConfigError(f"optim.lr_decay must be in (0, 1], got {o.lr_decay}")
        if o.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        if o.grad_clip is not None and not o.grad_clip > 0:
            raise ConfigError(f"optim.grad_clip must be > 0, got {o.grad_clip}")
        check_seed("train.seed", t.seed)
        if d.noise_seed is not None:
            check_seed("data.noise_seed", d.noise_seed)
        if t.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {t.epochs}")
        if t.batch_size < 1 or t.eval_batch_size < 1:
            raise ConfigError("train.batch_size and train.eval_batch_size must be >= 1")
        _choice("train.device", t.device.split(":")[0], ("auto", "cpu", "cuda", "mps"))
        _choice("train.precision", t.precision, ("auto", "bf16", "fp16", "fp32"))
        _choice("train.nan_policy", t.nan_policy, ("stop", "skip"))
        _choice("train.small_map_conv", t.small_map_conv, ("auto", "native"))
        _choice("train.malloc", t.malloc, ("auto", "system"))
        _positive_or_zero("train.save_every_steps", t.save_every_steps)
        if t.threads is not None and t.threads < 1:
            raise ConfigError(f"train.threads must be >= 1, got {t.threads}")
        # Registered names and their options, checked before any data is loaded (a typo in
        # --method must not surface after minutes of decoding AffectNet).
        from dnfer.data.spec import parse_data_spec
        from dnfer.methods.base import parse_params
        from dnfer.registry import METHODS, MODELS

        method_cls = METHODS.get(me.name)
        method_cls.check_run(parse_params(method_cls, me.params, noise_rate=me.noise_rate), epochs=t.epochs)
        if not m.name.startswith("timm:"):
            MODELS.get(m.name)
        parse_data_spec(d.spec, d.options)  # dataset name, and that its path exists


def comparable_config(raw: dict[str, Any], *, source: str = "config") -> dict[str, Any]:
    """A saved config dict (any dnfer version's layout) in the current layout, with
    ``method.params`` holding every option's value (defaults included), so two runs' settings
    compare equal exactly when they train the same way (resume and sweep-cell checks)."""
    import dataclasses as dc

    from dnfer.methods.base import parse_params
    from dnfer.registry import METHODS

    cfg = Config.from_dict(raw, source=source, saved=True)
    cfg.resolve_head_lr()  # automatic and explicit values that train the same way compare equal
    out = cfg.to_dict()
    try:
        params = parse_params(METHODS.get(cfg.method.name), cfg.method.params, noise_rate=cfg.method.noise_rate)
        out["method"]["params"] = dc.asdict(params)
    except ConfigError:
        pass  # left as given: the comparison then reports the difference
    return out


def read_yaml(path: Path, *, what: str) -> Any:
    """Parse a YAML file; a missing file or a syntax error is a ConfigError naming file and line."""
    if not path.is_file():
        from dnfer.io_safety import not_a_file_text

        raise ConfigError(f"{what} {str(path)!r} {not_a_file_text(path)}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r} is not a text (UTF-8) YAML file (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r} cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None


#: Seeds are in [0, 2**32 - 1], the range numpy's generators accept.
MAX_SEED = 2**32 - 1


def check_seed(name: str, value: int) -> None:
    """A seed outside [0, 2**32 - 1] is a ConfigError naming ``name`` (a flag or a config key)."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be in [0, {MAX_SEED}] (0 to 2**32-1), got {value}")


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


def _positive_or_zero(name: str, value: int) -> None:
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce_value(value: Any, ftype: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type (YAML already parsed scalars)."""
    origin = typing.get_origin(ftype)
    args = typing.get_args(ftype)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.strip().lower() in ("none", "null", "~") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce_value(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is dict or ftype is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if ftype is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if ftype is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if ftype is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # inf/nan would only fail epochs later (a NaN loss, say)
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if ftype is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _legacy_method_key_error(source: str, key: str) -> ConfigError:
    return ConfigError(f"{source}: method.{key} is an option of the method now: write it as method.params.{key} "
                       f"(in YAML, under method: params:; on the command line --set method.params.{key}=...)")


def _migrate_saved_method(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved ``method`` section in the current layout: the old top-level DNFER options move
    into ``params`` for DNFER (explicit params win) and are dropped for the methods that ignored them."""
    raw = dict(raw)
    params = dict(raw.get("params") or {})
    for key in LEGACY_METHOD_KEYS:
        if key in raw:
            value = raw.pop(key)
            if raw.get("name", MethodConfig.name) == "dnfer":
                params.setdefault(key, value)
    raw["params"] = params
    return raw


def _build(cls: type, raw: dict[str, Any], source: str, prefix: str, saved: bool = False) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section {prefix.rstrip('.') or 'top level'!r} must be a mapping, got {raw!r}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if prefix == "method." and any(k in LEGACY_METHOD_KEYS for k in raw):
        if not saved:
            raise _legacy_method_key_error(source, next(k for k in raw if k in LEGACY_METHOD_KEYS))
        raw = _migrate_saved_method(raw)
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(
            f"{source}: unknown config key {prefix + str(unknown[0])!r}; valid keys"
            f"{' in ' + prefix.rstrip('.') if prefix else ''}: {choices_text(names)}"
        )
    kwargs = {}
    for k, v in raw.items():
        ftype = hints[k]
        if dataclasses.is_dataclass(ftype):
            kwargs[k] = _build(ftype, v or {}, source, f"{prefix}{k}.", saved)
        else:
            kwargs[k] = coerce_value(v, ftype, f"{source}: {prefix}{k}")
    return cls(**kwargs)
