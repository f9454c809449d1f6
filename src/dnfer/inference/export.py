"""Export a dnfer checkpoint to ONNX or TorchScript, with its preprocessing embedded.

Both formats take normalised float32 ``(B, 3, S, S)`` (B dynamic) and return logits
``(B, K)``; softmax and preprocessing are done by :class:`dnfer.inference.predictor.Predictor`
from the embedded metadata (a JSON object under the key ``dnfer``: class names, input size,
mean/std, colour order, resize filter, model name) — in ONNX ``metadata_props`` (also readable
with ``onnxruntime``'s ``get_modelmeta().custom_metadata_map``), in TorchScript an extra file
``dnfer.json`` (``torch.jit.load(path, _extra_files={"dnfer.json": ""})``).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dnfer.engine.checkpoint import load_checkpoint
from dnfer.errors import ConfigError
from dnfer.inference.predictor import ModelInfo, load_predictor, model_from_checkpoint
from dnfer.io_safety import atomic_path

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


class _Logits(nn.Module):
    """``x -> logits`` only: FERNet's keyword-only ``return_features`` confuses the tracers."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@dataclass
class ExportResult:
    """Where the file went and how closely it reproduces the eager model."""

    path: Path
    format: str
    max_abs_diff: float
    info: ModelInfo


def export_model(model: nn.Module, info: ModelInfo, out: str | os.PathLike, fmt: str, *, opset: int = 17) -> Path:
    """Write ``model`` (eval mode, CPU) to ``out`` as ``fmt`` with ``info`` embedded."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: valid are {', '.join(FORMATS)}")
    if opset < 17:
        raise ConfigError(f"--opset {opset}: dnfer exports need opset >= 17")
    out = Path(out)
    if fmt == "onnx" and out.suffix.lower() != ".onnx":
        raise ConfigError(f"--out {str(out)!r}: an ONNX export must end in .onnx (that is how predict recognises it)")
    wrapped = _Logits(model.cpu().eval()).eval()
    s = info.image_size
    example = torch.zeros(2, 3, s, s)
    meta = json.dumps(info.metadata())
    with atomic_path(out) as tmp:  # removed if the export fails; swept if the process is killed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit/onnx deprecation and tracer warnings: not the user's business
            if fmt == "onnx":
                import onnx

                torch.onnx.export(
                    wrapped, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False,
                )
                proto = onnx.load(str(tmp))
                entries = {"dnfer": meta, "class_names": json.dumps(list(info.class_names)),
                           "input_size": json.dumps([3, s, s]), "mean": json.dumps(list(info.mean)),
                           "std": json.dumps(list(info.std)), "color_order": info.color_order}
                del proto.metadata_props[:]
                for k, v in entries.items():
                    proto.metadata_props.add(key=k, value=v)
                proto.doc_string = "dnfer facial expression model: normalised float32 (B,3,S,S) -> logits (B,K)"
                onnx.checker.check_model(proto)
                onnx.save(proto, str(tmp))
            else:
                with torch.no_grad():
                    traced = torch.jit.trace(wrapped, example)
                torch.jit.save(traced, str(tmp), _extra_files={"dnfer.json": meta})
    return out


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *,
                      opset: int = 17, check_batch: int = 4, seed: int = 0,
                      trust_checkpoint: bool = False, progress: bool = False) -> ExportResult:
    """Export a training checkpoint and check the file against the eager model.

    The check feeds ``check_batch`` random normal inputs (a batch size other than the one
    traced with, so the dynamic batch axis is exercised) to both and reports the max abs
    logit difference. ``trust_checkpoint`` allows a checkpoint that needs arbitrary unpickling (unsafe).
    ``progress``: a bar on stderr (a terminal only) over the stages load, export, check.
    """
    from dnfer.progress import progress_bar

    bar = progress_bar(3, "export: loading", enabled=progress)
    ckpt_path = Path(checkpoint)
    model, info = model_from_checkpoint(load_checkpoint(ckpt_path, trust=trust_checkpoint))
    if out is None:
        out = ckpt_path.with_name(ckpt_path.name.removesuffix(ckpt_path.suffix) + SUFFIX.get(fmt, ""))
    bar.set_description(f"export: writing {fmt}")
    bar.update(1)
    path = export_model(model, info, out, fmt, opset=opset)
    bar.set_description("export: checking")
    bar.update(1)
    diff = parity(model, path, info, batch=check_batch, seed=seed)
    bar.update(1)
    bar.close()
    return ExportResult(path=path, format=fmt, max_abs_diff=diff, info=info)


def parity(model: nn.Module, exported: str | os.PathLike, info: ModelInfo, *, batch: int = 4, seed: int = 0) -> float:
    """Max abs difference of logits, eager vs the exported file, on random ``(batch, 3, S, S)`` inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, info.image_size, info.image_size, generator=g)
    with torch.inference_mode():
        ref = model.cpu().eval()(x).numpy()
    pred = load_predictor(exported, device="cpu", trust_checkpoint=True)  # the file this process just wrote
    got = np.asarray(pred.backend(x))
    return float(np.abs(got - ref).max())
