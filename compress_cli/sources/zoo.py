"""Small built-in networks (``model.source: zoo:NAME``) for the digits and Fashion-MNIST data.

Every network is built from standard ``torch.nn`` layers inside named ``nn.Sequential``s, so
stages can find and swap modules by name (``fc1``, ``conv2``, ``layer2.0.conv1``, ...). Each
activation is its own ``nn.ReLU`` instance used exactly once in ``forward`` (quantization and
export need that). Convolutions followed by batch norm have no bias. All builders accept
``num_classes`` (default 10) and ``in_channels`` (default 1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress_cli.errors import SourceError, did_you_mean
from compress_cli.sources.spec import ZOO_NAMES


def _conv_bn_relu(name: str, cin: int, cout: int) -> list[tuple[str, nn.Module]]:
    return [
        (f"conv{name}", nn.Conv2d(cin, cout, 3, padding=1, bias=False)),
        (f"bn{name}", nn.BatchNorm2d(cout)),
        (f"relu{name}", nn.ReLU()),
    ]


def digits_mlp(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """8x8 images: Flatten, Linear 64 -> 128 -> 64 -> classes with ReLU."""
    return nn.Sequential(
        OrderedDict(
            [
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(in_channels * 64, 128)),
                ("relu1", nn.ReLU()),
                ("fc2", nn.Linear(128, 64)),
                ("relu2", nn.ReLU()),
                ("fc3", nn.Linear(64, num_classes)),
            ]
        )
    )


def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """8x8 images: two 3x3 conv-BN-ReLU blocks (16, 32 channels), 2x2 max pool, Linear."""
    return nn.Sequential(
        OrderedDict(
            [
                *_conv_bn_relu("1", in_channels, 16),
                *_conv_bn_relu("2", 16, 32),
                ("pool", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(32 * 4 * 4, num_classes)),
            ]
        )
    )


def outlier_cnn(
    num_classes: int = 10, in_channels: int = 1, input_size: int = 8, outlier: float = 100.0
) -> nn.Module:
    """A CNN with an outlier activation channel (the accuracy-budget demonstration), for 8x8
    (digits) or 28x28 (``input_size: 28``, Fashion-MNIST) images: conv-BN-ReLU (16; a 2x2 max pool
    after it at 28x28), ``gain`` (a depthwise 1x1 convolution, weights 1 except channel 0 at
    ``outlier``, trained like the rest: a learned per-channel scale such as the large LayerNorm
    and LayerScale gains behind transformers' outlier features), conv-BN-ReLU (32), 2x2 max pool,
    Linear -> 64 -> classes. ``conv2``'s weights on that channel start divided by ``outlier``
    (the same function as without the gain, as a trained network that learned to damp the channel),
    so its input spans ``outlier`` times the range of the channels that carry the signal: one
    per-tensor int8 scale leaves them a few levels."""
    if input_size not in (8, 28):
        raise SourceError(f"zoo:outlier_cnn: model.kwargs.input_size must be 8 or 28 (got {input_size})")
    gain = nn.Conv2d(16, 16, 1, groups=16, bias=False)
    block2 = _conv_bn_relu("2", 16, 32)
    pool1 = [("pool1", nn.MaxPool2d(2))] if input_size == 28 else []
    side = input_size // (4 if pool1 else 2)
    model = nn.Sequential(
        OrderedDict(
            [
                *_conv_bn_relu("1", in_channels, 16),
                *pool1,
                ("gain", gain),
                *block2,
                ("pool", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(32 * side * side, 64)),
                ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(64, num_classes)),
            ]
        )
    )
    with torch.no_grad():
        gain.weight.fill_(1.0)
        gain.weight[0] = outlier
        conv2 = block2[0][1]
        assert isinstance(conv2, nn.Conv2d)
        conv2.weight[:, 0] /= outlier
    return model


def lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    """LeNet-5 (ReLU, max pool) for 28x28 (first conv padded by 2) or 32x32 inputs."""
    if input_size not in (28, 32):
        raise SourceError(f"zoo:lenet5: input_size must be 28 or 32 (got {input_size})")
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(in_channels, 6, 5, padding=2 if input_size == 28 else 0)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(6, 16, 5)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(16 * 5 * 5, 120)),
                ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(120, 84)),
                ("relu4", nn.ReLU()),
                ("fc3", nn.Linear(84, num_classes)),
            ]
        )
    )


def _fashion(channels: tuple[int, int, int], hidden: int, num_classes: int, in_channels: int, dropout: float):
    c1, c2, c3 = channels
    return nn.Sequential(
        OrderedDict(
            [
                *_conv_bn_relu("1", in_channels, c1),
                ("pool1", nn.MaxPool2d(2)),  # 28 -> 14
                *_conv_bn_relu("2", c1, c2),
                ("pool2", nn.MaxPool2d(2)),  # 14 -> 7
                *_conv_bn_relu("3", c2, c3),
                ("pool3", nn.MaxPool2d(2)),  # 7 -> 3
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(c3 * 3 * 3, hidden)),
                ("relu4", nn.ReLU()),
                ("dropout", nn.Dropout(dropout)),
                ("fc2", nn.Linear(hidden, num_classes)),
            ]
        )
    )


def fashion_cnn(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.25) -> nn.Module:
    """28x28 images, about 187k parameters: conv-BN-ReLU blocks 32/64/96 with max pools,
    Linear 864->128->10."""
    return _fashion((32, 64, 96), 128, num_classes, in_channels, dropout)


def fashion_cnn_small(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.1) -> nn.Module:
    """A quarter of :func:`fashion_cnn` (about 47k parameters): blocks 16/32/48, Linear 432->64->10.

    Meant as a distillation student for ``fashion_cnn``.
    """
    return _fashion((16, 32, 48), 64, num_classes, in_channels, dropout)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a shortcut, then ReLU.

    ``downsample`` (1x1 conv + BN) is set when the stride or width changes, else ``None`` (identity).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("conv", nn.Conv2d(cin, cout, 1, stride=stride, bias=False)),
                        ("bn", nn.BatchNorm2d(cout)),
                    ]
                )
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(conv-BN-ReLU-conv-BN of ``x`` + the shortcut: ``downsample(x)``, or ``x`` itself)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


def digits_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """A tiny ResNet for 8x8 images: stem, three basic blocks (8x8 identity, 4x4 and 2x2 with a
    downsample shortcut), global average pool, Linear."""
    w = width
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(in_channels, w, 3, padding=1, bias=False)),
                ("bn1", nn.BatchNorm2d(w)),
                ("relu", nn.ReLU()),
                ("layer1", nn.Sequential(BasicBlock(w, w))),
                ("layer2", nn.Sequential(BasicBlock(w, 2 * w, stride=2))),
                ("layer3", nn.Sequential(BasicBlock(2 * w, 4 * w, stride=2))),
                ("avgpool", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(4 * w, num_classes)),
            ]
        )
    )


#: name -> builder: each zoo network is the function of its name above (the names are listed once,
#: torch-free, in ``sources.spec`` for recipe validation)
ZOO: dict[str, Callable[..., nn.Module]] = {name: globals()[name] for name in ZOO_NAMES}

#: one sample's shape each network expects with default kwargs (``in_channels`` replaces dim 0)
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits_mlp": (1, 8, 8),
    "digits_cnn": (1, 8, 8),
    "digits_resnet": (1, 8, 8),
    "lenet5": (1, 28, 28),
    "fashion_cnn": (1, 28, 28),
    "fashion_cnn_small": (1, 28, 28),
    "outlier_cnn": (1, 8, 8),
}


def input_shape(name: str, **kwargs: Any) -> tuple[int, int, int]:
    """The sample shape ``zoo:name`` built with ``kwargs`` expects."""
    if name not in INPUT_SHAPES:
        raise SourceError(f"zoo:{name}: unknown zoo model{did_you_mean(name, ZOO)}")
    c, h, w = INPUT_SHAPES[name]
    if name in ("lenet5", "outlier_cnn") and "input_size" in kwargs:
        h = w = int(kwargs["input_size"])
    return (int(kwargs.get("in_channels", c)), h, w)


def build_zoo(name: str, **kwargs: Any) -> nn.Module:
    """Build ``zoo:name``; SourceError (with the nearest name) when it does not exist."""
    fn = ZOO.get(name)
    if fn is None:
        raise SourceError(f"zoo:{name}: unknown zoo model{did_you_mean(name, ZOO)}")
    try:
        return fn(**kwargs)
    except TypeError as e:
        import inspect

        allowed = ", ".join(inspect.signature(fn).parameters)
        raise SourceError(
            f"zoo:{name}: bad model.kwargs {sorted(kwargs)} ({e}); allowed: {allowed}"
        ) from None
