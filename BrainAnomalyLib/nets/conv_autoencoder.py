"""The plain convolutional autoencoder of the slice models (no residual units), in torch alone.

Its layers carry the parameter names of MONAI's `AutoEncoder` with `num_res_units=0` (`encode.encode_i.conv`,
`...adn.N` / `...adn.A`, `decode.decode_i.conv.conv`), so weights trained with either load into the other, and on the
same weights it computes the same function (Testing/test_conv_autoencoder.py). Scoring with the shipped default then
needs no MONAI: importing MONAI loads every one of its submodules, 2.7 s of CPU on an idle core here and 19.6 s on a
lent GPU host, paid by every new detection process. Residual units still come from MONAI (autoencoders.py).

Each encoder layer is a 3x3 convolution at its stride, then norm and activation; each decoder layer a 3x3 transposed
convolution back up (output padding stride - 1, so even sizes are restored exactly), then norm and activation, except
the last, which is the convolution alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

KERNEL = 3


def _norm(name: str, channels: int) -> nn.Module:
    # MONAI's factories pass the channel count only: batch norm with its defaults, instance norm without affine.
    if name == "BATCH":
        return nn.BatchNorm2d(channels)
    if name == "INSTANCE":
        return nn.InstanceNorm2d(channels)
    raise ValueError(f"unknown norm {name!r}")


def _act(name: str) -> nn.Module:
    makers = {"PRELU": nn.PReLU, "RELU": nn.ReLU, "LEAKYRELU": nn.LeakyReLU, "ELU": nn.ELU, "GELU": nn.GELU,
              "SWISH": nn.SiLU}
    if name not in makers:
        raise ValueError(f"unknown activation {name!r}")
    return makers[name]()


def _layer(in_channels: int, out_channels: int, stride: int, transposed: bool, act: str, norm: str,
           conv_only: bool) -> nn.Sequential:
    padding = (KERNEL - 1) // 2
    if transposed:
        conv = nn.ConvTranspose2d(in_channels, out_channels, KERNEL, stride, padding, output_padding=stride - 1)
    else:
        conv = nn.Conv2d(in_channels, out_channels, KERNEL, stride, padding)
    layer = nn.Sequential()
    layer.add_module("conv", conv)
    if not conv_only:
        adn = nn.Sequential()
        adn.add_module("N", _norm(norm, out_channels))
        adn.add_module("A", _act(act))
        layer.add_module("adn", adn)
    return layer


class ConvAutoEncoder(nn.Module):
    """`encode` (strided convolutions through `channels`) and `decode` (transposed convolutions back to
    `out_channels`), each an nn.Sequential; forward = decode(encode(x))."""

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int], strides: Sequence[int],
                 act: str = "PRELU", norm: str = "BATCH") -> None:
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"channels {list(channels)} and strides {list(strides)} must be as long, and not empty")
        self.encode = nn.Sequential()
        previous = in_channels
        for i, (c, s) in enumerate(zip(channels, strides)):
            self.encode.add_module(f"encode_{i}", _layer(previous, c, s, False, act, norm, conv_only=False))
            previous = c
        self.decode = nn.Sequential()
        outs = list(channels[-2::-1]) + [out_channels]
        for i, (c, s) in enumerate(zip(outs, strides[::-1])):
            step = nn.Sequential()
            step.add_module("conv", _layer(previous, c, s, True, act, norm, conv_only=i == len(outs) - 1))
            self.decode.add_module(f"decode_{i}", step)
            previous = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
