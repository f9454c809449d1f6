"""Initialise a :class:`~dnfer.models.factory.FERNet` backbone from pretrained weights.

``--pretrained`` (``model.pretrained``) accepts:

- a local file: a dnfer checkpoint (``model`` key), a plain ``state_dict``, a dict with a
  ``state_dict`` key — e.g. the MS-Celeb-1M ResNet-18 file ``res18_naive.pth_MSceleb.tar`` the
  FER community uses (keys prefixed ``module.``, ``fc.*`` and ``feature.*`` to skip, as in the
  DNFER authors' loader, https://github.com/1980x/DNFER) — or a torchvision/timm-layout ``state_dict``;
- ``torchvision:WEIGHTS`` (``torchvision:IMAGENET1K_V1``, ``torchvision:DEFAULT`` or the full
  ``torchvision:ResNet18_Weights.IMAGENET1K_V1``) for the torchvision ResNets;
- ``timm`` / ``timm:TAG`` for ``--model timm:NAME``;
- ``dnfer:NAME``, a named backbone that dnfer pretrains on first use and caches
  (:mod:`dnfer.engine.backbones`; ``dnfer:synthetic-identity`` is the embedded benchmark's
  face-pretrained regime).

Files are read as data: ``torch.load(weights_only=True)`` (tensors, numbers, strings, containers
and numpy arrays) or safetensors. A file that needs arbitrary unpickling is refused unless
``trust`` (``--trust-checkpoint``), since unpickling it can run any code.

Named weights are downloaded on first use into the caches torchvision and timm use (torch hub:
``$TORCH_HOME/hub/checkpoints``, checked against the SHA-256 prefix in the file name; Hugging
Face: ``$HF_HOME/hub``) and read from there afterwards. ``--offline`` / ``DNFER_OFFLINE=1`` (and
``HF_HUB_OFFLINE=1`` for timm) turn downloading off: a file not in the cache is then an error
naming the URL/repository and the exact cache path to put it at (docs/inference.md,
"Where named weights come from").

Key matching: ``module.``/``_orig_mod.`` prefixes are stripped; a key ``K`` loads into
``backbone.K`` (or ``K`` itself if it already starts with ``backbone.``). Keys that fit nowhere
and look like a classifier (``fc.``, ``feature.``, ``head.``, ``classifier.``, ``last_linear.``)
are skipped — the class count differs. Anything else that does not fit (missing backbone
tensors, unexpected keys, shape mismatches) is an error unless ``allow_partial``. Missing
BatchNorm ``num_batches_tracked`` counters (files saved by PyTorch < 0.4.1) are not errors:
they only count batches seen and are reset when training starts.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnfer.errors import ConfigError

#: Prefixes of checkpoint keys that belong to a classifier and are skipped.
CLASSIFIER_PREFIXES = ("fc.", "feature.", "head.", "classifier.", "last_linear.")
#: Prefixes stripped from every key (DataParallel/DDP, torch.compile).
STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did (tensor counts; names listed for error messages)."""

    source: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_classifier: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    ignored_counters: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every backbone tensor was loaded and nothing else was left over."""
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        return (
            f"loaded {self.loaded} tensors, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"shape-mismatched {len(self.shape_mismatch)}, skipped classifier {len(self.skipped_classifier)}"
        )


def _extract_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if key in obj and isinstance(obj[key], dict):
                return _extract_state_dict(obj[key], source)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors  # type: ignore[return-value]
    raise ConfigError(
        f"--pretrained {source!r}: no state_dict found (expected a dict of tensors or a 'state_dict'/'model' key)"
    )


def normalise_key(key: str) -> str:
    """Strip DataParallel/compile prefixes (repeatedly: ``module.module.`` occurs in the wild)."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _read_file(path: Path, source: str, trust: bool = False) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"--pretrained {source!r} does not exist")
    if path.stat().st_size == 0:
        raise ConfigError(f"--pretrained {source!r} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"--pretrained {source!r}: reading .safetensors needs the safetensors package") from None
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ConfigError(f"--pretrained {source!r} is not a readable safetensors file: {e}") from None
    from dnfer.engine.checkpoint import CheckpointError, checkpoint_from_payload, torch_load_plain

    try:
        obj = torch_load_plain(path, trust=trust, what=f"--pretrained {source!r}")
        if isinstance(obj, dict) and obj.get("format") == "dnfer-checkpoint" and obj.get("version", 1) != 1:
            return checkpoint_from_payload(obj, str(path)).model  # verified: checksum, version, finite weights
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return _extract_state_dict(obj, source)


#: Environment variable that turns every download of named weights off (like ``--offline``).
OFFLINE_ENV = "DNFER_OFFLINE"
#: Hugging Face's own switches; they turn off ``timm`` downloads too.
HF_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline_reason(offline: bool | None = None, *, hugging_face: bool = False) -> str | None:
    """Why downloading named weights is off (the flag or variable that says so), or None if allowed.

    ``offline`` (the API's argument, ``--offline`` on the CLI) wins when given; otherwise
    ``DNFER_OFFLINE=1`` turns every download off, and for Hugging Face files (timm) also
    ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``.
    """
    if offline is not None:
        return "--offline" if offline else None
    if _env_on(OFFLINE_ENV):  # the CLI's --offline sets it too, for the processes it starts
        return f"--offline or {OFFLINE_ENV}=1"
    return next((f"{n}=1" for n in HF_OFFLINE_ENVS if hugging_face and _env_on(n)), None)


def download_to_cache(url: str, path: Path, *, what: str) -> Path:
    """Download ``url`` to the cache file ``path`` as torch hub does (torchvision's own route).

    Like :func:`torch.hub.load_state_dict_from_url` with ``check_hash=True``: the hex digits after
    the last ``-`` of the file name (``resnet18-f37072fd.pth``) must start the file's SHA-256; the
    download goes to a temporary file next to ``path`` that is renamed only when complete and
    correct, so an interrupted or corrupt download never leaves a file in the cache.
    """
    match = torch.hub.HASH_REGEX.search(path.name)
    hash_prefix = match.group(1) if match else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix, progress=sys.stderr.isatty())
    except RuntimeError as e:  # torch hub's checksum error
        raise ConfigError(
            f"{what}: the file downloaded from {url} does not match the checksum in its name (SHA-256 starting "
            f"{hash_prefix}; {e}); nothing was cached; retry, or put a good copy at {path}"
        ) from None
    except (OSError, ValueError) as e:  # URLError/HTTPError are OSErrors; ValueError: a malformed URL
        reason = getattr(e, "reason", None) or e
        raise ConfigError(
            f"{what}: could not download {url} ({reason}); on a machine without internet, copy the file to "
            f"{path} (or run with --offline to never try)"
        ) from None
    return path


def torchvision_weights_file(model_name: str | None, weights: str, *, offline: bool | None = None) -> Path:
    """The torch-hub cache file of torchvision weights ``weights`` for ``model_name``, downloaded on
    first use into ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch``) as torchvision does.

    Raises ConfigError naming the URL and the expected path when it is absent and downloading is
    off (:func:`offline_reason`) or fails.
    """
    import torchvision

    try:
        if "." in weights:  # ResNet18_Weights.IMAGENET1K_V1
            w = torchvision.models.get_weight(weights)
        else:
            if not model_name or model_name.startswith("timm:") or model_name == "tiny_cnn":
                raise ConfigError(
                    f"--pretrained torchvision:{weights} needs a torchvision model (--model resnet18/34/50), got {model_name!r}"
                )
            enum = torchvision.models.get_model_weights(model_name)
            w = enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights]
    except (KeyError, ValueError, AttributeError) as e:
        valid = ""
        if model_name and "." not in weights:
            try:
                valid = ", ".join(["DEFAULT", *(m.name for m in torchvision.models.get_model_weights(model_name))])
            except (KeyError, ValueError):
                pass
        raise ConfigError(
            f"--pretrained torchvision:{weights}: unknown torchvision weights ({e})" + (f"; valid are {valid}" if valid else "")
        ) from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    if path.is_file():
        return path
    why = offline_reason(offline)
    if why:
        raise ConfigError(
            f"--pretrained torchvision:{weights}: {path} is not in the torch hub cache and downloading is off ({why}); "
            f"download {w.url} on a machine with internet and copy it to {path} (the cache is $TORCH_HOME/hub/checkpoints)"
        )
    return download_to_cache(w.url, path, what=f"--pretrained torchvision:{weights}")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's
    default (``~/.cache/huggingface/hub``). Read at each call, so a changed environment counts."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


#: The files timm reads from a Hugging Face repository, in its order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def timm_weights_file(model_name: str | None, tag: str, *, offline: bool | None = None) -> Path:
    """The weights of ``--model timm:NAME`` (optionally ``NAME.TAG``) from the Hugging Face hub
    cache, downloaded on first use as timm does (``huggingface_hub.hf_hub_download``)."""
    if not model_name or not model_name.startswith("timm:"):
        raise ConfigError(f"--pretrained timm needs --model timm:NAME, got {model_name!r}")
    try:
        import timm
    except ImportError:
        raise ConfigError("--pretrained timm needs timm: pip install 'dnfer[timm]'") from None
    name = model_name.removeprefix("timm:")
    if tag:
        name = f"{name.split('.')[0]}.{tag}"
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # older/newer timm raise different types for unknown names
        cfg = None
    if cfg is None:
        raise ConfigError(f"--pretrained timm: timm has no pretrained weights named {name!r}")
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        raise ConfigError(f"--pretrained timm: {name!r} has no Hugging Face weights; download its file and pass the path")
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError("--pretrained timm needs huggingface_hub (installed with timm)") from None
    repo, _, revision = hub_id.partition("@")  # timm writes a pinned revision as REPO@REV
    cache = hf_cache_dir()
    for fname in HF_WEIGHT_FILES:
        hit = huggingface_hub.try_to_load_from_cache(repo, fname, cache_dir=cache, revision=revision or None)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    where = cache / f"models--{repo.replace('/', '--')}"
    why = offline_reason(offline, hugging_face=True)
    if why:
        raise ConfigError(
            f"--pretrained timm: the weights of {name!r} (Hugging Face repo {repo}) are not in the Hugging Face cache "
            f"({where}) and downloading is off ({why}); on a machine with internet run `hf download {repo} "
            f"{HF_WEIGHT_FILES[0]}` and copy its cache folder {where.name} to {cache}, or pass the file's path"
        )
    from huggingface_hub.errors import EntryNotFoundError

    for fname in HF_WEIGHT_FILES:
        try:
            return Path(huggingface_hub.hf_hub_download(repo, fname, revision=revision or None, cache_dir=cache))
        except EntryNotFoundError:
            continue  # the repository has the other format
        except Exception as e:  # network, authentication, offline-mode errors of huggingface_hub
            raise ConfigError(
                f"--pretrained timm: could not download {fname} of Hugging Face repo {repo} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); on a machine without internet copy the cache folder "
                f"{where.name} to {cache} (or run with --offline to never try)"
            ) from None
    raise ConfigError(f"--pretrained timm: Hugging Face repo {repo} has none of {', '.join(HF_WEIGHT_FILES)}")


def resolve_source(source: str, model_name: str | None, *, offline: bool | None = None) -> Path:
    """``--pretrained`` value -> a local weights file; named weights (``torchvision:``, ``timm``)
    are downloaded into their standard cache on first use unless offline. The one entry point
    for both the CLI and :func:`dnfer.models.create_model`."""
    kind, sep, rest = source.partition(":")
    if sep and kind == "dnfer" and not Path(source).exists():
        from dnfer.engine.backbones import named_backbone  # builds it on first use

        return named_backbone(rest, model_name=model_name)
    if sep and kind == "torchvision":
        return torchvision_weights_file(model_name, rest or "DEFAULT", offline=offline)
    if kind == "timm" and (sep or source == "timm") and not Path(source).exists():
        return timm_weights_file(model_name, rest, offline=offline)
    return Path(source)


def match_state_dict(model: nn.Module, state: dict[str, Any], source: str) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map ``state`` keys onto ``model`` (a FERNet) and report; loads nothing."""
    target = model.state_dict()
    report = LoadReport(source=source, loaded=0)
    to_load: dict[str, torch.Tensor] = {}
    for raw_key, value in state.items():
        key = normalise_key(raw_key)
        if not isinstance(value, torch.Tensor):
            report.unexpected.append(key)
            continue
        name = key if key.startswith("backbone.") else f"backbone.{key}"
        if name not in target:
            if key.startswith(CLASSIFIER_PREFIXES):
                report.skipped_classifier.append(key)
            else:
                report.unexpected.append(key)
        elif target[name].shape != value.shape:
            report.shape_mismatch.append(f"{key} {tuple(value.shape)} vs {tuple(target[name].shape)}")
        else:
            to_load[name] = value
    head = {f"head.{k}" for k in getattr(model, "head", nn.Identity()).state_dict()}
    for k in target:
        if k in to_load or k in head:
            continue
        (report.ignored_counters if k.endswith("num_batches_tracked") else report.missing).append(k)
    report.loaded = len(to_load)
    return to_load, report


def load_pretrained(model: nn.Module, source: str | Path, *, allow_partial: bool = False,
                    model_name: str | None = None, trust: bool = False, offline: bool | None = None) -> LoadReport:
    """Load backbone weights into ``model`` (in place) and report the counts. The names of the
    loaded tensors are kept as ``model.pretrained_keys`` (a frozenset of state-dict keys).

    Args:
        source: a file path, ``torchvision:WEIGHTS`` or ``timm[:TAG]`` (see the module doc).
        allow_partial: load what matches instead of failing on a mismatch beyond the classifier.
        model_name: the ``--model`` name (needed for ``torchvision:``/``timm`` sources).
        trust: allow files that need arbitrary unpickling (``--trust-checkpoint``; unsafe).
        offline: never download named weights (None: ``DNFER_OFFLINE``/``HF_HUB_OFFLINE``, see
            :func:`offline_reason`).

    Raises:
        ConfigError: unreadable/absent file, or a mismatch (unless ``allow_partial``).
    """
    source = str(source)
    path = resolve_source(source, model_name, offline=offline)
    state = _read_file(path, source, trust)
    to_load, report = match_state_dict(model, state, source)
    if report.loaded == 0:
        raise ConfigError(f"--pretrained {source!r}: no tensor fits the model ({report.summary()}); wrong file or --model?")
    if not report.ok and not allow_partial:
        detail = (report.missing + report.unexpected + report.shape_mismatch)[:4]
        raise ConfigError(
            f"--pretrained {source!r} does not match the model beyond its classifier ({report.summary()}; e.g. {detail}); "
            "pass --allow-partial-pretrained to load what matches"
        )
    model.load_state_dict(to_load, strict=False)
    # which tensors came from the file: co-teaching's peer keeps them (methods/coteaching.py)
    model.pretrained_keys = frozenset(to_load)
    return report
