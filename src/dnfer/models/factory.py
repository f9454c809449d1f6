"""``create_model(name, num_classes, ...)``: backbones as feature extractors + a linear head.

Every model is a :class:`FERNet`: ``backbone`` maps images ``(B, 3, H, W)`` to a feature map
``(B, D, h, w)``, global average pooling gives features ``(B, D)``, ``head`` gives logits
``(B, K)``. Methods that need features or class-activation maps (SCN, RUL, EAC) use
``forward_features``/``forward_maps``; everything else calls the model as usual.

The preprocessing the model expects (input size, mean/std, colour order) travels with it in
``model.preprocessing`` (a :class:`~dnfer.preprocessing.Preprocessing`) and into every checkpoint
(timm's ``pretrained_cfg`` idea), so inference matches training.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torchvision
from torch import Tensor, nn

from dnfer.errors import ConfigError
from dnfer.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from dnfer.registry import MODELS


class FEROutput(NamedTuple):
    """``logits (B, K)``, ``features (B, D)``, ``maps (B, D, h, w)``."""

    logits: Tensor
    features: Tensor
    maps: Tensor


class FERNet(nn.Module):
    """Backbone (to a spatial feature map) + global average pool + linear classifier.

    Attributes:
        backbone: ``(B, 3, H, W) -> (B, D, h, w)``.
        head: ``nn.Linear(D, K)``.
        feature_dim: D.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(feature_dim, num_classes)
        self.preprocessing = Preprocessing(image_size=224)  # create_model sets the real one

    def forward_maps(self, x: Tensor) -> Tensor:
        """Feature map ``(B, D, h, w)``."""
        return self.backbone(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, D)``."""
        return self.forward_maps(x).mean(dim=(2, 3))

    def forward(self, x: Tensor, *, return_features: bool = False) -> Tensor | FEROutput:
        """Logits ``(B, K)``; with ``return_features`` a :class:`FEROutput` (logits, pooled
        features ``(B, D)``, feature map ``(B, D, h, w)``).

        Methods that need features call ``model(x, return_features=True)`` rather than
        ``forward_features`` so that the call goes through DDP's wrapper (gradient sync).
        """
        maps = self.forward_maps(x)
        features = maps.mean(dim=(2, 3))
        logits = self.head(self.dropout(features))
        if return_features:
            return FEROutput(logits, features, maps)
        return logits

    def head_parameter_names(self) -> set[str]:
        return {f"head.{n}" for n, _ in self.head.named_parameters()}


def _resnet_backbone(net: torchvision.models.ResNet, small_input: bool) -> tuple[nn.Module, int]:
    if small_input:
        # Tiny inputs (<= 32 px by default): a stride-1 3x3 stem and no max-pool would keep resolution but
        # costs 16x the compute; we keep the 7x7/2 conv and drop only the max-pool (4x), which
        # leaves a 4x4 final map at 64 px instead of 2x2.
        net.maxpool = nn.Identity()
    # Named children keep torchvision's key names (backbone.conv1.weight, backbone.layer1...), so
    # torchvision-layout checkpoints load by prefixing "backbone." (see models/pretrained.py).
    # The stem pools before its ReLU (torchvision: ReLU, then pool). Exact, not an approximation:
    # max commutes with the non-decreasing ReLU and picks the same element, so outputs and all
    # gradients are bit-identical (tests/test_models.py), but the ReLU and its backward then touch
    # the pooled map, a quarter of the pixels (about 1.03x faster ResNet-18 steps at 112 px;
    # docs/performance.md, "ResNet stem"). Neither module has parameters, so checkpoints are unchanged.
    names = ("conv1", "bn1", "maxpool", "relu", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names)), net.fc.in_features


def _torchvision_resnet(arch: str) -> Callable[..., FERNet]:
    def build(num_classes: int, *, small_input: bool = False, dropout: float = 0.0, weights: str | None = None) -> FERNet:
        # Random init here; create_model loads named weights through models.pretrained (one download path).
        net = getattr(torchvision.models, arch)(weights=None)
        backbone, dim = _resnet_backbone(net, small_input)
        return FERNet(backbone, dim, num_classes, dropout=dropout)

    return build


for _arch in ("resnet18", "resnet34", "resnet50"):
    MODELS.register(_arch)(_torchvision_resnet(_arch))


@MODELS.register("resnet10_slim")
def resnet10_slim(num_classes: int, *, small_input: bool = False, dropout: float = 0.0, weights: str | None = None,
                  width: int = 32) -> FERNet:
    """ResNet-10 at half width: one BasicBlock per stage, channels 32-64-128-256 (1.2M parameters).

    The CPU benchmark model: at 64 px it trains about 8x faster than ResNet-18 on this project's
    2-core machine (1,041 vs 127 images/s, one thread, bf16; docs/performance.md) and still learns
    the synthetic faces, which is what a 144-run sweep on a CPU can afford. Same stem and layout
    as torchvision's ResNet, so small_input behaves as for resnet18. No pretrained weights exist.
    """
    if weights:
        raise ConfigError("resnet10_slim has no pretrained weights (train it from scratch)")
    net = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    # torchvision's ResNet has no width option for BasicBlock; rebuild the stem and stages at `width`.
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    block = torchvision.models.resnet.BasicBlock
    net.layer1 = net._make_layer(block, width, 1)
    net.layer2 = net._make_layer(block, 2 * width, 1, stride=2)
    net.layer3 = net._make_layer(block, 4 * width, 1, stride=2)
    net.layer4 = net._make_layer(block, 8 * width, 1, stride=2)
    net.fc = nn.Linear(8 * width, num_classes)
    for m in net.modules():  # the rebuilt convs get torchvision's ResNet initialisation too
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    backbone, dim = _resnet_backbone(net, small_input)
    return FERNet(backbone, dim, num_classes, dropout=dropout)


@MODELS.register("tiny_cnn")
def tiny_cnn(num_classes: int, *, small_input: bool = True, dropout: float = 0.0, weights: str | None = None, width: int = 16) -> FERNet:
    """A 4-block CNN for tests and smoke runs (a few thousand parameters)."""
    if weights:
        raise ConfigError("tiny_cnn has no pretrained weights")

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    w = width
    backbone = nn.Sequential(block(3, w, 2), block(w, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1))
    return FERNet(backbone, 2 * w, num_classes, dropout=dropout)


def _timm_builder(name: str, num_classes: int, *, small_input: bool, dropout: float, weights: str | None,
                  offline: bool | None = None) -> FERNet:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model {name!r} needs timm: pip install 'dnfer[timm]'") from None
    model_name = name.removeprefix("timm:")
    kwargs: dict[str, Any] = {}
    if weights:
        from dnfer.models.pretrained import timm_weights_file

        # weights: "timm", "timm:TAG", "DEFAULT" or a bare TAG; the file comes from the shared
        # download/cache path and timm loads it itself (its key filters, e.g. position-embedding resizing).
        tag = (weights.partition(":")[2] if weights.startswith("timm")
               else "" if weights.upper() in ("1", "TRUE", "DEFAULT") else weights)
        path = timm_weights_file(name, tag, offline=offline)
        if tag:
            model_name = f"{model_name.split('.')[0]}.{tag}"
        kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    try:
        net = timm.create_model(model_name, num_classes=0, global_pool="", **kwargs)
    except RuntimeError as e:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"timm does not know model {model_name!r}: {e}") from None
    return FERNet(net, net.num_features, num_classes, dropout=dropout)


def create_model(
    name: str,
    num_classes: int,
    *,
    image_size: int = 224,
    small_input: bool | None = None,
    dropout: float = 0.0,
    weights: str | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    offline: bool | None = None,
) -> FERNet:
    """Build a registered model (``resnet18``...) or any timm model as ``timm:NAME``.

    Args:
        small_input: use the small-image stem; None = automatic (image_size <= 32). At 48-64 px
            the standard stem (final map 2x2) learns the synthetic set as well at 1/4 of the
            compute (measured: docs/synthetic.md), so it stays the default there.
        weights: named weights: torchvision's (``IMAGENET1K_V1``, ``DEFAULT``) for the ResNets,
            ``timm`` / ``timm:TAG`` for ``timm:NAME``. Downloaded on first use into the torch hub /
            Hugging Face cache exactly as ``--pretrained`` does (one function,
            :func:`dnfer.models.pretrained.resolve_source`); local checkpoint files are loaded by
            :func:`dnfer.models.pretrained.load_pretrained`.
        offline: never download (None: ``DNFER_OFFLINE`` / ``HF_HUB_OFFLINE``); a weights file not
            in the cache is then a ConfigError naming the path to put it at.
    """
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    if small_input is None:
        small_input = image_size <= 32
    if name.startswith("timm:"):
        model = _timm_builder(name, num_classes, small_input=small_input, dropout=dropout, weights=weights,
                              offline=offline)
    elif weights and name in ("resnet18", "resnet34", "resnet50"):
        from dnfer.models.pretrained import load_pretrained

        model = MODELS.get(name)(num_classes, small_input=small_input, dropout=dropout)
        source = weights if weights.startswith("torchvision:") else f"torchvision:{weights}"
        load_pretrained(model, source, model_name=name, offline=offline)
    else:
        model = MODELS.get(name)(num_classes, small_input=small_input, dropout=dropout, weights=weights)
    model.preprocessing = model_preprocessing(image_size, mean, std)
    return model


def model_preprocessing(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Preprocessing:
    """What inference must do to an image before the model sees it (class names come with the data)."""
    return Preprocessing(image_size=int(image_size), mean=tuple(float(m) for m in mean),  # type: ignore[arg-type]
                         std=tuple(float(s) for s in std))  # type: ignore[arg-type]


def split_parameters(model: FERNet) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone params, head params): the paper uses a 10x larger learning rate on the head."""
    head_names = model.head_parameter_names()
    backbone, head = [], []
    for n, p in model.named_parameters():
        (head if n in head_names else backbone).append(p)
    return backbone, head
