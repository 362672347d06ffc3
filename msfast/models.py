"""ResNet trunks and MultiScaleResNet.

- ``ResNet``: a ResNet trunk (BasicBlock for depths 18 and 34, Bottleneck for 50) whose
  state_dict keys are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
  ``layer2.0.downsample.0``), so torchvision weights load into it
  (:func:`load_torchvision_weights`). It has no classifier: ``forward`` returns the last
  feature map.
- ``MultiScaleResNet``: ``ImagePyramid`` -> the trunk on every level (one shared trunk by
  default) -> ``UpsampleConcat`` of the per-level feature maps at the finest feature
  resolution -> 1x1 fusion conv + BatchNorm + ReLU -> global average pooling -> linear
  classifier. ``backend="torch"`` runs the two resampling steps on the pure-PyTorch path
  with the same numerics.

A shared trunk shares every learned weight across levels, but keeps BatchNorm's running
statistics per level (``LevelBatchNorm2d``): activations of a 0.25x image have other
statistics than those of the full image, and one running average of all levels, used at
evaluation, matches none of them (on digits it cost up to 10 points of test accuracy).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Callable

import torch
from torch import nn

from .nn import ImagePyramid, UpsampleConcat, _backend

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "MultiScaleResNet", "LevelBatchNorm2d", "resnet",
           "load_torchvision_weights", "DEPTHS"]

NormLayer = Callable[[int], nn.Module]


class LevelBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with one affine weight and bias, and running statistics per pyramid level:
    ``running_mean`` and ``running_var`` are ``[levels, C]``; ``level`` (set by
    MultiScaleResNet before each level) picks the row that training updates and evaluation
    uses. Its state_dict keys are BatchNorm2d's."""

    def __init__(self, num_features: int, levels: int):
        super().__init__(num_features)
        self.levels, self.level = levels, 0
        self.running_mean = torch.zeros(levels, num_features)
        self.running_var = torch.ones(levels, num_features)

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        # rows of the [levels, C] buffers: batch_norm updates them in place
        return nn.functional.batch_norm(x, self.running_mean[self.level], self.running_var[self.level], self.weight,
                                        self.bias, self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", levels={self.levels}"


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# depth -> (block, blocks per stage), as in torchvision
DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}
STEMS = ("large", "small")


def _check_depth(depth) -> None:
    if depth not in DEPTHS:
        raise ValueError(f"msfast: depth must be one of {sorted(DEPTHS)}, got {depth!r}")


class ResNet(nn.Module):
    """A ResNet trunk: stem, then four stages of widths ``width * (1, 2, 4, 8)``.

    stem ``"large"`` (torchvision's, for ImageNet-sized images): 7x7 conv stride 2 + 3x3
    max-pool stride 2. stem ``"small"`` (for images of a few dozen pixels): one 3x3 conv
    stride 1, no pooling. ``out_channels`` is the channel count of the returned feature map.
    ``norm_layer``: as in torchvision, a callable ``num_features -> module``.
    """

    def __init__(self, depth: int = 18, width: int = 64, stem: str = "large", in_channels: int = 3,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        _check_depth(depth)
        if stem not in STEMS:
            raise ValueError(f"msfast: stem must be 'large' or 'small', got {stem!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"msfast: width must be a positive int, got {width!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"msfast: in_channels must be a positive int, got {in_channels!r}")
        block, counts = DEPTHS[depth]
        self.depth, self.width, self.stem, self.in_channels = depth, width, stem, in_channels
        if stem == "large":
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for i, n in enumerate(counts):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                                           norm_layer(planes * block.expansion))
            layers = [block(inplanes, planes, stride, downsample, norm_layer)]
            inplanes = planes * block.expansion
            layers += [block(inplanes, planes, norm_layer=norm_layer) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.out_channels = inplanes
        _init(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _init(module: nn.Module) -> None:
    # torchvision's initialization, so a trunk trained here starts like one trained there
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet(depth: int = 18, **kw) -> ResNet:
    return ResNet(depth, **kw)


def _check_scales(scales) -> list[float]:
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"msfast: scales must be a non-empty sequence of positive numbers, got {scales!r}")
    out = []
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"msfast: scales must be positive finite numbers, got {scales!r}")
        out.append(float(s))
    return out


class MultiScaleResNet(nn.Module):
    """A ResNet run on every level of an image pyramid, its feature maps fused and classified.

    Args:
        num_classes: classifier outputs.
        depth: 18, 34 or 50. width: channels of the first stage (64 is torchvision's).
        stem: ``"large"`` (7x7/2 + max-pool) or ``"small"`` (3x3/1).
        scales: the pyramid levels, e.g. ``(1, 0.5, 0.25)``; ``(1,)`` is a single-scale ResNet
            (with the same fusion conv, so that both compare at equal depth and width).
        in_channels: image channels. shared: one trunk for every level (default) or one per level.
        mean, std: per-channel normalization, applied inside the pyramid kernel (uint8 images
            are divided by 255 first).
        backend: ``"msfast"`` (fused operators) or ``"torch"`` (F.interpolate + torch.cat).
    """

    def __init__(self, num_classes: int, depth: int = 18, width: int = 64, stem: str = "large",
                 scales: Sequence[float] = (1.0, 0.5, 0.25), in_channels: int = 3, shared: bool = True,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, backend: str = "msfast"):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"msfast: num_classes must be a positive int, got {num_classes!r}")
        scales = _check_scales(scales)
        _backend(backend)
        for name, v in (("mean", mean), ("std", std)):
            if v is not None and len(v) != in_channels:
                raise ValueError(f"msfast: {name} must have in_channels={in_channels} values, got {list(v)!r}")
        self.scales, self.shared = scales, bool(shared)
        self.pyramid = ImagePyramid(scales=scales, mean=mean, std=std, backend=backend)
        n_trunks = 1 if shared else len(scales)
        norm = functools.partial(LevelBatchNorm2d, levels=len(scales)) if n_trunks < len(scales) else nn.BatchNorm2d
        self.trunks = nn.ModuleList(ResNet(depth, width, stem, in_channels, norm) for _ in range(n_trunks))
        c = self.trunks[0].out_channels
        self.concat = UpsampleConcat(mode="bilinear", backend=backend)
        self.fusion = nn.Sequential(nn.Conv2d(c * len(scales), c, 1, bias=False), nn.BatchNorm2d(c),
                                    nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        _init(self.fusion)

    @property
    def backend(self) -> str:
        return self.pyramid.backend

    @backend.setter
    def backend(self, name: str) -> None:
        _backend(name)
        self.pyramid.backend = self.concat.backend = name

    def trunk(self, level: int) -> ResNet:
        return self.trunks[0 if self.shared else level]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The trunk's feature map of every pyramid level."""
        feats = []
        for i, lv in enumerate(self.pyramid(x)):
            trunk = self.trunk(i)
            for m in trunk.modules():
                if isinstance(m, LevelBatchNorm2d):
                    m.level = i
            feats.append(trunk(lv))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        size = max((tuple(f.shape[-2:]) for f in feats), key=lambda hw: hw[0] * hw[1])  # the finest map
        y = self.fusion(self.concat(feats, size))
        return self.fc(torch.flatten(self.pool(y), 1))


def load_torchvision_weights(model: nn.Module, weights) -> list[str]:
    """Loads torchvision ResNet weights into a ``ResNet`` trunk or every trunk of a
    ``MultiScaleResNet``; returns the keys it did not use (the classifier ``fc.*``).

    ``weights``: a torchvision ``ResNet`` module, its ``state_dict()``, or the path of a saved
    state_dict (e.g. a ``resnet18-*.pth`` download). The trunk must have been built with the
    same depth, ``width=64`` and ``in_channels=3``, and with ``stem="large"`` (the small
    stem's 3x3 ``conv1`` cannot take a 7x7 kernel). Per-level running statistics
    (``LevelBatchNorm2d``) all start from torchvision's.
    """
    if isinstance(weights, (str, os.PathLike)):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"msfast: weights: no such file {os.fspath(weights)!r}")
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    if not isinstance(weights, dict):
        raise TypeError(f"msfast: weights must be a module, a state_dict or a path, got {type(weights).__name__}")
    if isinstance(model, MultiScaleResNet):
        trunks = list(model.trunks)
    elif isinstance(model, ResNet):
        trunks = [model]
    else:
        raise TypeError(f"msfast: model must be a ResNet or MultiScaleResNet, got {type(model).__name__}")
    unused = sorted(k for k in weights if k.startswith("fc."))
    trunk_sd = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    for trunk in trunks:
        own = trunk.state_dict()
        missing, extra = sorted(set(own) - set(trunk_sd)), sorted(set(trunk_sd) - set(own))
        if missing or extra:
            raise ValueError(f"msfast: weights do not fit a depth-{trunk.depth} trunk: missing keys {missing[:5]}, "
                             f"unexpected keys {extra[:5]}")
        sd = {k: v.expand_as(own[k]) if own[k].ndim == 2 and own[k].shape[1:] == v.shape and k.endswith(
            ("running_mean", "running_var")) else v for k, v in trunk_sd.items()}
        bad = [k for k in own if own[k].shape != sd[k].shape]
        if bad:
            k = bad[0]
            raise ValueError(f"msfast: weights: {k} has shape {tuple(trunk_sd[k].shape)}, the trunk has "
                             f"{tuple(own[k].shape)} (torchvision weights need width=64, in_channels=3, "
                             f"stem='large')")
        trunk.load_state_dict(sd, strict=True)
    return unused
