"""Sweep specification: methods x noise settings x seeds over one shared base config.

A sweep file is YAML with two top-level keys::

    sweep:
      methods: [ce, dnfer]                 # labels; a label is a registered method name, or a
                                           # variant whose overrides set method.name
      noise: [none, symmetric:0.3]         # strings, or mappings for label files (below)
      seeds: [1, 2, 3]
      method_overrides:                    # per method label, dotted or nested config keys
        dnfer_fixed: {method.name: dnfer, method.params.threshold: fixed}
    base: {data: ..., model: ..., train: ...}   # a run config (or a path to one, relative
                                                # to the sweep file)
    base_overrides: {train.epochs: 10}          # optional, applied on top of ``base``

A plain run config (no ``sweep``/``base`` keys) is accepted too: it becomes the base and the
axes default to dnfer, ce x none, symmetric:0.3 x seed 1 (flags override them).

A noise entry given as a mapping names a community label file instead of a generated draw::

    {name: eac10, file: "{data_root}/EmoLabel/noise01.txt", kind: symmetric, rate: 0.1}

``{data_root}`` is replaced by the PATH part of the base's ``data.spec`` (``rafdb:PATH``).
``kind`` and ``rate`` are the nominal protocol: they place the setting on the plot's x axis and
feed ``method.noise_rate`` to methods that need one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnfer.config import Config, read_yaml
from dnfer.errors import ConfigError

#: The noise grid of the embedded benchmark (README table).
EMBEDDED_NOISE = ("none", "symmetric:0.1", "symmetric:0.2", "symmetric:0.3", "symmetric:0.4", "asymmetric:0.3")


@dataclass(frozen=True)
class NoiseSetting:
    """One column of the sweep.

    Attributes:
        label: how the setting is shown and named on disk (``symmetric:0.3``, ``eac10``).
        kind: ``none``, ``symmetric``, ``asymmetric``, ``pairflip`` (nominal for label files).
        rate: nominal flip probability (0 for ``none``).
        file: a ``name label`` noise file replacing the training labels, or None.
    """

    label: str
    kind: str
    rate: float
    file: str | None = None

    @property
    def slug(self) -> str:
        """Directory name: ``none``, ``symmetric-0.3``, ``eac10``."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.label.replace(":", "-")).strip("-") or "noise"


@dataclass
class SweepSpec:
    """Everything a sweep needs; ``base`` is the shared budget every cell starts from."""

    methods: list[str]
    noise: list[NoiseSetting]
    seeds: list[int]
    base: Config = field(default_factory=Config)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "defaults"


@dataclass(frozen=True)
class Cell:
    """One (method, noise, seed) run and its resolved config (``config.out`` = its directory)."""

    method: str
    noise: NoiseSetting
    seed: int
    config: Config
    notes: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        assert self.config.out is not None
        return Path(self.config.out)

    @property
    def key(self) -> str:
        return f"{self.method}/{self.noise.slug}/seed{self.seed}"


# ---------------------------------------------------------------------------------- parsing


def parse_noise_setting(entry: Any, *, where: str = "noise") -> NoiseSetting:
    """A noise string (``none``, ``symmetric:0.3``) or a label-file mapping -> NoiseSetting."""
    from dnfer.data.noise import parse_noise_spec

    if isinstance(entry, str):
        ns = parse_noise_spec(entry)
        return NoiseSetting(label=str(ns), kind=ns.kind, rate=ns.rate)
    if isinstance(entry, dict):
        allowed = {"name", "file", "kind", "rate"}
        unknown = sorted(set(entry) - allowed)
        if unknown or "file" not in entry or "name" not in entry:
            raise ConfigError(
                f"{where}: a noise-file entry needs keys name and file (optional kind, rate); got {sorted(entry)}"
            )
        kind = str(entry.get("kind", "symmetric"))
        if kind not in ("symmetric", "asymmetric", "pairflip", "none"):
            raise ConfigError(f"{where}: kind must be symmetric, asymmetric, pairflip or none; got {kind!r}")
        try:
            rate = float(entry.get("rate", 0.0))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: rate must be a number, got {entry.get('rate')!r}") from None
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"{where}: rate must be in [0, 1), got {rate}")
        return NoiseSetting(label=str(entry["name"]), kind=kind, rate=rate, file=str(entry["file"]))
    raise ConfigError(f"{where}: expected a noise spec string or a mapping, got {entry!r}")


def parse_seeds(values: Any, *, where: str = "seeds") -> list[int]:
    items = values.split(",") if isinstance(values, str) else values
    if isinstance(items, int) and not isinstance(items, bool):
        items = [items]
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: expected a non-empty list of integers, got {values!r}")
    out = []
    for s in items:
        try:
            out.append(int(str(s).strip()))
        except ValueError:
            raise ConfigError(f"{where}: {s!r} is not an integer seed") from None
    if len(set(out)) != len(out):
        raise ConfigError(f"{where}: seeds repeat in {out}")
    return out


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested or dotted override mappings -> ``{"a.b.c": value}`` (leaves only)."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any], *, source: str) -> None:
    for key, value in flatten(overrides).items():
        cfg.override(key, value, source=source)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read a sweep YAML file (format in the module docstring)."""
    path = Path(path)
    raw = read_yaml(path, what="sweep file")
    if isinstance(raw, dict) and "sweep" not in raw and "base" not in raw:
        # a plain run config: it is the shared base, the sweep axes come from the defaults/flags
        return SweepSpec(methods=["dnfer_plus", "dnfer", "ce"], noise=[parse_noise_setting("none"), parse_noise_setting("symmetric:0.3")],
                         seeds=[1], base=Config.from_yaml(path), source=str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with 'sweep' (methods, noise, seeds) and 'base' (a run config)")
    unknown = sorted(set(raw) - {"sweep", "base", "base_overrides"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {unknown[0]!r}; valid: base, base_overrides, sweep")
    sw = raw["sweep"] or {}
    if not isinstance(sw, dict):
        raise ConfigError(f"{path}: 'sweep' must be a mapping with methods, noise, seeds")
    bad = sorted(set(sw) - {"methods", "noise", "seeds", "method_overrides"})
    if bad:
        raise ConfigError(f"{path}: unknown key sweep.{bad[0]}; valid: method_overrides, methods, noise, seeds")
    base_raw = raw.get("base") or {}
    if isinstance(base_raw, str):
        base_path = (path.parent / base_raw) if not Path(base_raw).is_absolute() else Path(base_raw)
        base = Config.from_yaml(base_path)
    else:
        base = Config.from_dict(base_raw, source=f"{path} (base)")
    if raw.get("base_overrides"):
        if not isinstance(raw["base_overrides"], dict):
            raise ConfigError(f"{path}: base_overrides must be a mapping of config keys")
        apply_overrides(base, raw["base_overrides"], source=f"{path} base_overrides")
    methods = sw.get("methods") or ["dnfer_plus", "dnfer", "ce"]
    if isinstance(methods, str):
        methods = split_list(methods)
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise ConfigError(f"{path}: sweep.methods must be a list of method names")
    noise_raw = sw.get("noise") or ["none"]
    if not isinstance(noise_raw, list):
        raise ConfigError(f"{path}: sweep.noise must be a list")
    noise = [parse_noise_setting(n, where=f"{path} sweep.noise[{i}]") for i, n in enumerate(noise_raw)]
    overrides = sw.get("method_overrides") or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ConfigError(f"{path}: sweep.method_overrides must map method labels to mappings of config keys")
    spec = SweepSpec(methods=list(methods), noise=noise, seeds=parse_seeds(sw.get("seeds", [1]), where=f"{path} sweep.seeds"),
                     base=base, method_overrides={str(k): dict(v) for k, v in overrides.items()}, source=str(path))
    check_unique(spec)
    return spec


def check_unique(spec: SweepSpec) -> None:
    for what, items in (("methods", spec.methods), ("noise settings", [n.slug for n in spec.noise])):
        dup = sorted({x for x in items if items.count(x) > 1})
        if dup:
            raise ConfigError(f"sweep {what} repeat: {dup[0]!r}")


# ---------------------------------------------------------------------------------- cells


def data_root(spec_text: str) -> str:
    """The PATH of ``NAME:PATH`` (empty for ``synthetic``)."""
    _, sep, path = spec_text.partition(":")
    return path if sep else ""


def build_cells(spec: SweepSpec, out: str | Path) -> list[Cell]:
    """Resolve every cell's config (method x noise x seed, in that nesting order).

    Raises ConfigError for an unknown method or a bad override before anything runs.

    The base's ``method.params`` are options of the base's method (``method.name``, default
    dnfer_plus) and of the methods that share its options (``dnfer`` and ``dnfer_plus``: one
    ``Params`` derives from the other): cells of other methods leave them out, with a note (a same-named option of another
    method, e.g. SCE's ``alpha``, means something else). ``method_overrides`` set any method's.
    """
    from dnfer.registry import METHODS

    out = Path(out)
    if spec.base.data.noise_matrix is not None:  # the sweep's noise axis sets every cell's label noise
        raise ConfigError(f"{spec.source}: data.noise_matrix cannot be combined with the sweep's noise axis; "
                          "run `dnfer train --noise-matrix FILE` per seed instead")
    cells: list[Cell] = []
    base_dict = spec.base.to_dict()
    base_method, base_params = spec.base.method.name, set(spec.base.method.params)
    for label in spec.methods:
        overrides = flatten(spec.method_overrides.get(label, {}))
        for noise in spec.noise:
            for seed in spec.seeds:
                cfg = Config.from_dict(base_dict, source=spec.source)
                cfg.method.name = label
                notes: list[str] = []
                if noise.file is not None:
                    cfg.data.noise = "none"
                    cfg.data.noise_file = noise.file.replace("{data_root}", data_root(cfg.data.spec))
                else:
                    cfg.data.noise_file = None
                    cfg.data.noise = noise.label
                cfg.train.seed = seed
                cfg.train.progress = False
                for key, value in overrides.items():
                    cfg.override(key, value, source=f"{spec.source} sweep.method_overrides.{label}")
                cls = METHODS.get(cfg.method.name)
                own = {k.split(".", 2)[2] for k in overrides if k.startswith("method.params.")}
                if not _same_options(cls, METHODS.get(base_method)):
                    for key in sorted(base_params - own):
                        del cfg.method.params[key]
                        notes.append(f"{label}: base method.params.{key} is an option of {base_method}, "
                                     f"left out for {cfg.method.name}")
                if cls.needs_noise_rate and "method.noise_rate" not in overrides:
                    cfg.method.noise_rate = noise.rate
                    notes.append(f"{label}: method.noise_rate set to the nominal rate of each noise setting")
                cfg.out = str(out / _slug(label) / noise.slug / f"seed{seed}")
                cfg.validate()
                cells.append(Cell(method=label, noise=noise, seed=seed, config=cfg, notes=tuple(notes)))
    return cells


def _same_options(a: type, b: type) -> bool:
    """Whether two methods' options mean the same: one's ``Params`` derives from the other's
    (``dnfer_plus`` is DNFER with other defaults)."""
    return a is b or issubclass(a.Params, b.Params) or issubclass(b.Params, a.Params)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "method"
