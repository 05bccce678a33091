"""Stage B's image encoder: EfficientNetV2 features + a 1x1 conv mapper, in plain torch.

torchvision (which provides EfficientNetV2-S) does not import beside torch 2.13, so the
encoder is written here with torchvision's parameter names (``backbone.N.M.block...``,
``mapper.0/1``): the published stage-B checkpoint's ``effnet_state_dict`` loads into it
unchanged. This module imports torch; the plugin's hooks import it on first use.
"""

from __future__ import annotations

import torch
from torch import nn

from .encoder_io import encoder_config, stages_of

#: torchvision builds EfficientNetV2 with BatchNorm2d(eps=1e-3); the mapper's BatchNorm keeps torch's default.
BACKBONE_BN_EPS = 1e-3
#: How the stage-B training fed images to the encoder: ImageNet statistics on [0, 1] pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def effnet_pixels(pixel_values):
    """``[-1, 1]`` pixels -> what the encoder was trained on: ``[0, 1]`` normalised with ImageNet statistics."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixel_values.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixel_values.device, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixel_values.float() + 1.0) / 2.0 - mean) / std


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvNormAct(nn.Sequential):
    """conv (no bias) -> BatchNorm -> optional SiLU; children ``0``, ``1`` (and ``2``) like torchvision's."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1, act=True):
        layers = [
            nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=BACKBONE_BN_EPS),
        ]
        if act:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gate: global average -> ``fc1`` (1x1) -> SiLU -> ``fc2`` (1x1) -> sigmoid, times the input."""

    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        gate = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(gate) * x


class ResidualBlock(nn.Module):
    """``block`` with a skip connection when shape allows (stochastic depth is a no-op when frozen)."""

    def __init__(self, layers, residual):
        super().__init__()
        self.block = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x):
        out = self.block(x)
        return out + x if self.residual else out


def fused_mbconv(expand, kernel, stride, cin, cout) -> ResidualBlock:
    hidden = make_divisible(cin * expand)
    if hidden == cin:  # no expansion: one full conv
        layers = [ConvNormAct(cin, cout, kernel, stride)]
    else:  # full conv expands, 1x1 projects
        layers = [ConvNormAct(cin, hidden, kernel, stride), ConvNormAct(hidden, cout, 1, act=False)]
    return ResidualBlock(layers, stride == 1 and cin == cout)


def mbconv(expand, kernel, stride, cin, cout) -> ResidualBlock:
    hidden = make_divisible(cin * expand)
    layers = []
    if hidden != cin:
        layers.append(ConvNormAct(cin, hidden, 1))
    layers += [
        ConvNormAct(hidden, hidden, kernel, stride, groups=hidden),
        SqueezeExcitation(hidden, max(1, cin // 4)),
        ConvNormAct(hidden, cout, 1, act=False),
    ]
    return ResidualBlock(layers, stride == 1 and cin == cout)


BLOCKS = {"fused": fused_mbconv, "mbconv": mbconv}


class EfficientNetEncoder(nn.Module):
    """Stage B's image encoder: EfficientNetV2 features (``backbone``) + 1x1 conv and BatchNorm (``mapper``).

    Parameter names follow torchvision's ``efficientnet_v2_s().features`` so the published
    ``effnet_state_dict`` loads as it is. Output: ``(B, c_latent, H/32, W/32)``.
    """

    def __init__(self, config: dict | None = None, where: str = "image encoder config"):
        super().__init__()
        config = encoder_config(**(config or {}))
        stages = stages_of(config, where)
        self.config = config
        self.c_latent = int(config["c_latent"])
        c_cond = int(config["c_cond"])
        features = [ConvNormAct(3, stages[0][4], 3, stride=2)]
        for kind, expand, kernel, stride, cin, cout, layers in stages:
            make = BLOCKS[kind]
            # like torchvision: only a stage's first block changes stride and width
            blocks = [make(expand, kernel, stride, cin, cout)]
            blocks += [make(expand, kernel, 1, cout, cout) for _ in range(layers - 1)]
            features.append(nn.Sequential(*blocks))
        features.append(ConvNormAct(stages[-1][5], c_cond, 1))
        self.backbone = nn.Sequential(*features)
        self.mapper = nn.Sequential(nn.Conv2d(c_cond, self.c_latent, 1, bias=False), nn.BatchNorm2d(self.c_latent))
        self.reset_parameters()

    def reset_parameters(self):
        """torchvision's initialisation (random-weight encoders for tests and tiny models)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.mapper(self.backbone(x))
