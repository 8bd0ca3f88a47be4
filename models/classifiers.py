"""Classifiers for the deep-learning studies: an MLP, a small CNN (MNIST-1D signals or small
images) and a ResNet-style CNN (the GPU benchmark).

All parameterized layers are ``nn.Linear`` / ``nn.Conv2d`` (``groups=1``, zero padding), which
``structngd.kron`` preconditions; the ResNet's ``BatchNorm2d`` layers (``norm="batch"``) are the
only modules it leaves to the base optimizer. The ReLUs are in-place (``ReLU(inplace=True)``),
which overwrites the layers' output tensors: the preconditioners' output-tensor hooks still
see the gradient of the pre-activation.

Conv1d is not supported by ``structngd.kron``; 1-D signals (``(N, L)`` or ``(N, C, L)``) go
through ``Conv2d`` with ``(1, k)`` kernels on a ``(N, C, 1, L)`` view.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import Tensor, nn

IntPair = Union[int, Tuple[int, int]]


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "tanh":
        return nn.Tanh()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be 'relu', 'tanh' or 'gelu', got {name!r}")


class MLP(nn.Module):
    """``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` (logits), ``activation`` between layers.

    Inputs are flattened to ``(N, sizes[0])``. ``activation="relu"`` uses in-place ReLUs.
    """

    def __init__(self, sizes: Sequence[int] = (40, 256, 256, 10), activation: str = "relu"):
        super().__init__()
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes needs at least two positive widths, got {sizes}")
        self.sizes = sizes
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(_activation(activation))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(x.shape[0], -1))


class CNN(nn.Module):
    """Small CNN: ``len(channels)`` conv + ReLU layers, then a linear classifier.

    Args:
        input_shape: ``(C, H, W)`` of one example; 1-D signals of length ``L`` use
            ``(C, 1, L)`` (inputs ``(N, L)`` or ``(N, C, L)`` are reshaped to it).
        channels: output channels of the conv layers.
        kernel_size, stride: of every conv layer (``"same"``-style zero padding
            ``k // 2``); the 1-D default is ``(1, 5)`` with stride ``(1, 2)``.
        num_classes: logits returned.

    For MNIST-1D (length 40): three ``(1, 5)`` convolutions with stride 2 (40 -> 20 -> 10 -> 5)
    as in the MNIST-1D paper's CNN, for 8x8 digits e.g. ``input_shape=(1, 8, 8)``,
    ``kernel_size=3, stride=1``.
    """

    def __init__(
        self,
        input_shape: Tuple[int, int, int] = (1, 1, 40),
        channels: Sequence[int] = (32, 32, 32),
        kernel_size: IntPair = (1, 5),
        stride: IntPair = (1, 2),
        num_classes: int = 10,
        activation: str = "relu",
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
        self.input_shape = tuple(int(s) for s in input_shape)
        kernel = nn.modules.utils._pair(kernel_size)
        padding = (kernel[0] // 2, kernel[1] // 2)
        layers, c_in = [], self.input_shape[0]
        for c in channels:
            layers += [nn.Conv2d(c_in, c, kernel, stride=stride, padding=padding), _activation(activation)]
            c_in = c
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            out = self.features(torch.zeros((1,) + self.input_shape))
        self.classifier = nn.Linear(out.numel(), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape((x.shape[0],) + self.input_shape)
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))``; the
    shortcut is a strided 1x1 convolution (+ norm) where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: str = "batch"):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, c_out)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), _norm(norm, c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _norm(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")


class ResNetCNN(nn.Module):
    """A CIFAR-style ResNet (He et al. 2016, ResNet-``6 blocks + 2``): a 3x3 stem, one stage of
    ``blocks`` basic blocks per entry of ``channels`` (stride 2 at the start of every stage
    after the first), global average pooling and a linear classifier.

    Args:
        channels: width of each stage, e.g. ``(16, 32, 64)`` (ResNet-20 with ``blocks=3``).
        blocks: basic blocks per stage.
        num_classes, in_channels: logits and input channels.
        image_size: input height = width (checked in ``forward``).
        norm: ``"batch"`` (``BatchNorm2d``, conv layers without bias) or ``"none"``
            (conv layers with bias; every parameterized layer is preconditioned).
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        blocks: int = 2,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        norm: str = "batch",
    ):
        super().__init__()
        if blocks < 1 or not channels:
            raise ValueError("ResNetCNN needs at least one stage and one block per stage")
        if image_size < 2 ** (len(channels) - 1):
            raise ValueError(f"image_size {image_size} is too small for {len(channels)} stages")
        self.image_size, self.in_channels = image_size, in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=norm == "none"),
            _norm(norm, channels[0]),
            nn.ReLU(inplace=True),
        )
        stages, c_in = [], channels[0]
        for i, c in enumerate(channels):
            for j in range(blocks):
                stages.append(BasicBlock(c_in, c, stride=2 if (i > 0 and j == 0) else 1, norm=norm))
                c_in = c
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(x.shape)}")
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))

    @property
    def num_layers(self) -> int:
        """``Conv2d`` + ``Linear`` layers, the 1x1 shortcut convolutions included."""
        return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in self.modules())
