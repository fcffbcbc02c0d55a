# The weight initialisation the convolutional backbones share (iresnet, MobileFaceNet, MobileFaceNet-large).
from __future__ import annotations

from torch import nn


def init_convs_and_norms_(model: nn.Module, *, linears: bool = False) -> None:
    """Kaiming-normal (fan_out, relu) convolutions (and linear layers when `linears`), batch norms at weight 1
    and bias 0, in module order (the order fixes which random numbers each layer draws)."""
    kaiming = (nn.Conv2d, nn.Linear) if linears else (nn.Conv2d,)
    for module in model.modules():
        if isinstance(module, kaiming):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
