"""Deep perceptual autoencoder (DPA, Shvetsova et al. 2020) and the feature network it measures distances with.

No ImageNet weights are available here, so the feature network is learned by us, self-supervised, on healthy slices
(`feature_net`): a small convolutional encoder trained as the encoder half of an inpainting + denoising autoencoder.
Its input is a healthy slice with coarse (lesion-like) noise added inside the brain and a few random rectangles erased
(set to 0); the decoder, which has NO skip connections, must restore the clean slice from the encoder's features
alone. To fill an erased box or remove a smooth blob, the features have to describe the surrounding anatomy, not only
copy intensities, which is what a perceptual distance needs. `features(x)` returns the encoder's stage outputs
(default: strides 2, 4 and 8), GroupNorm-ed so every layer has a comparable scale.

The DPA (`dpa`) is an autoencoder (ae_dense or ae_spatial, arch["ae"]) trained to minimise the distance between
F(x) and F(recon) inside the brain (+ pixel_weight x pixel error), with F a copy of a trained feature net, frozen:
its weights are part of the DPA's state_dict but in no parameter group and never receive gradients.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoders import DenseAE, SpatialAE
from .base import (REC_LOSSES, SliceNet, check_choice, check_float, check_int, check_ints, check_size,
                   feature_distances, jsonable, mask_float, masked_mean, pixel_error, reconstruction_loss)
from .noise import coarse_noise


def _block(cin: int, cout: int, stride: int, groups: int) -> nn.Sequential:
    g = groups if cout % groups == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(g, cout), nn.LeakyReLU(0.2),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(g, cout), nn.LeakyReLU(0.2))


def box_mask(batch: int, size: Sequence[int], count: int, box: Sequence[int],
             generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """(B, 1, H, W) float, 1 inside `count` random rectangles per slice with sides drawn from [box[0], box[1]]."""
    h, w = size
    out = torch.zeros(batch, 1, h, w, device=device)
    if count == 0:
        return out
    lo, hi = box
    sides = torch.randint(lo, hi + 1, (2, batch, count), generator=generator, device=device)
    sy = sides[0].clamp(max=h)
    sx = sides[1].clamp(max=w)
    y0 = (torch.rand((batch, count), generator=generator, device=device) * (h - sy + 1)).floor()
    x0 = (torch.rand((batch, count), generator=generator, device=device) * (w - sx + 1)).floor()
    ys = torch.arange(h, device=device).view(1, 1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, 1, w)
    inside = ((ys >= y0[..., None, None]) & (ys < (y0 + sy)[..., None, None])
              & (xs >= x0[..., None, None]) & (xs < (x0 + sx)[..., None, None]))  # (B, count, H, W)
    return inside.any(dim=1, keepdim=True).float()


class FeatureNet(SliceNet):
    """Self-supervised feature extractor (see the module docstring). arch: channels per encoder stage (stage 0 at
    full resolution, every later stage halves it), feature_layers = which stages `features` returns, norm_groups,
    holes / hole_size = erased rectangles per slice and their side range in pixels, hole_weight = extra weight of
    the erased brain pixels in the loss, noise_res / noise_std = the coarse noise (as for the dae), rec_loss,
    bg_weight."""

    type_name = "feature_net"

    @staticmethod
    def defaults(in_channels: int = 1, size: Sequence[int] = (112, 96)) -> dict:
        size = [int(s) for s in size]
        return {"type": "feature_net", "in_channels": int(in_channels), "size": size,
                "channels": [16, 32, 64, 64], "feature_layers": [1, 2, 3], "norm_groups": 4,
                "holes": 2, "hole_size": [8, 24], "hole_weight": 1.0,
                "noise_res": [max(1, size[0] // 8), max(1, size[1] // 8)], "noise_std": 0.2,
                "rec_loss": "l1", "bg_weight": 0.1}

    def __init__(self, arch: dict) -> None:
        super().__init__(arch)
        a = self.arch
        check_int(a, "in_channels")
        channels = check_ints(a, "channels")
        self.stride_factor = 2 ** (len(channels) - 1)
        size = check_size(a, self.stride_factor)
        self.feature_layers = check_ints(a, "feature_layers", low=0)
        if any(i >= len(channels) for i in self.feature_layers):
            raise ValueError(f"arch 'feature_net': feature_layers {self.feature_layers} must index the "
                             f"{len(channels)} stages")
        groups = check_int(a, "norm_groups")
        self.holes = check_int(a, "holes", low=0)
        self.hole_size = check_ints(a, "hole_size", length=2)
        if self.hole_size[0] > self.hole_size[1]:
            raise ValueError(f"arch 'feature_net': hole_size {self.hole_size} must be [min, max]")
        self.hole_weight = check_float(a, "hole_weight")
        self.noise_res = check_ints(a, "noise_res", length=2)
        if any(r > s for r, s in zip(self.noise_res, size)):
            raise ValueError(f"arch 'feature_net': noise_res {self.noise_res} must not exceed the size {size}")
        self.noise_std = check_float(a, "noise_std")
        self.rec_kind = check_choice(a, "rec_loss", REC_LOSSES)
        self.bg_weight = check_float(a, "bg_weight")

        stages, cin = [], self.in_channels
        for i, c in enumerate(channels):
            stages.append(_block(cin, c, 1 if i == 0 else 2, groups))
            cin = c
        self.stages = nn.ModuleList(stages)
        ups = []
        for i in range(len(channels) - 1, 0, -1):
            g = groups if channels[i - 1] % groups == 0 else 1
            ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                     nn.Conv2d(channels[i], channels[i - 1], 3, padding=1),
                                     nn.GroupNorm(g, channels[i - 1]), nn.LeakyReLU(0.2)))
        self.decoder = nn.Sequential(*ups, nn.Conv2d(channels[0], self.in_channels, 3, padding=1))

    def _encode(self, x) -> List[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = self._encode(x)
        return [outs[i] for i in self.feature_layers]

    def forward(self, x):
        return self.decoder(self._encode(x)[-1])

    def corrupt(self, x, m, generator=None):
        """(corrupted input, erased-box mask) for the pretext task."""
        noise = coarse_noise(x.shape, self.noise_res, self.noise_std, mask=m, generator=generator,
                             device=x.device, dtype=x.dtype)
        holes = box_mask(x.shape[0], x.shape[2:], self.holes, self.hole_size, generator, x.device).to(x.dtype)
        return (x + noise) * (1.0 - holes), holes

    def training_losses(self, x, mask, generator=None):
        self.check_input(x)
        m = mask_float(mask, x)
        xc, holes = self.corrupt(x, m, generator)
        out = self(xc)
        rec = reconstruction_loss(out, x, m, self.rec_kind, self.bg_weight)
        hole = masked_mean(pixel_error(out, x, self.rec_kind), holes * m)
        loss = rec + self.hole_weight * hole
        return {"loss": loss, "rec": rec.detach(), "hole": hole.detach()}


_AE_TYPES = {cls.type_name: cls for cls in (DenseAE, SpatialAE)}


class DPA(SliceNet):
    """Deep perceptual autoencoder. arch: "ae" = arch of the autoencoder (ae_dense or ae_spatial; its rec_loss and
    bg_weight serve the pixel term), "feature_net" = arch of the frozen feature network, pixel_weight.

    loss = perceptual + pixel_weight * pixel; perceptual = mean over feature layers of the brain-weighted mean of
    channel-mean |F(x) - F(recon)| (the mask area-averaged to each layer's grid). Call `set_feature_net(trained)`
    before training; training and score maps refuse to run with the untrained feature net."""

    type_name = "dpa"

    @staticmethod
    def defaults(in_channels: int = 1, size: Sequence[int] = (112, 96)) -> dict:
        return {"type": "dpa", "in_channels": int(in_channels), "size": [int(s) for s in size],
                "ae": DenseAE.defaults(in_channels, size), "feature_net": FeatureNet.defaults(in_channels, size),
                "pixel_weight": 0.1}

    def __init__(self, arch: dict) -> None:
        super().__init__(arch)
        a = self.arch
        self.pixel_weight = check_float(a, "pixel_weight")
        for key, allowed in (("ae", tuple(_AE_TYPES)), ("feature_net", (FeatureNet.type_name,))):
            sub = a[key]
            if not isinstance(sub, dict) or sub.get("type") not in allowed:
                raise ValueError(f"arch 'dpa': {key!r} must be an arch dict of type {' or '.join(allowed)}, "
                                 f"got {sub!r}")
            for shared in ("in_channels", "size"):
                if shared in sub and jsonable(sub[shared]) != a[shared]:
                    raise ValueError(f"arch 'dpa': {key}[{shared!r}] = {sub[shared]!r} differs from the "
                                     f"dpa's {a[shared]!r}")
        sub_arch = {k: dict(a[k], in_channels=a["in_channels"], size=a["size"]) for k in ("ae", "feature_net")}
        self.ae = _AE_TYPES[sub_arch["ae"]["type"]].from_arch(sub_arch["ae"])
        self.feature_net = FeatureNet.from_arch(sub_arch["feature_net"])
        a["ae"], a["feature_net"] = self.ae.arch, self.feature_net.arch  # completed with their defaults
        self.fixed_size = self.ae.fixed_size
        self.stride_factor = max(self.ae.stride_factor, self.feature_net.stride_factor)
        self.feature_net.requires_grad_(False)
        self.feature_net.eval()
        self.register_buffer("feature_net_ready", torch.zeros(()))

    # The feature net stays in eval mode whatever mode the DPA is put in.
    def train(self, mode: bool = True):
        super().train(mode)
        self.feature_net.eval()
        return self

    def set_feature_net(self, feature_net: nn.Module) -> None:
        """Copy a trained feature net's weights in (its arch must equal arch["feature_net"]) and freeze them."""
        if getattr(feature_net, "arch", None) != self.arch["feature_net"]:
            raise ValueError(f"dpa: the feature net's arch {getattr(feature_net, 'arch', None)!r} differs from "
                             f"this DPA's feature_net arch {self.arch['feature_net']!r}")
        self.feature_net.load_state_dict(feature_net.state_dict())
        self.feature_net.requires_grad_(False)
        self.feature_net.eval()
        self.feature_net_ready.fill_(1.0)

    def _need_features(self) -> None:
        if not bool(self.feature_net_ready):
            raise RuntimeError("dpa: no trained feature net; train a 'feature_net' on healthy slices and call "
                               "set_feature_net(...) first")

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"main": [p for p in self.ae.parameters() if p.requires_grad]}

    def forward(self, x):
        return self.ae(x)

    def training_losses(self, x, mask, generator=None):
        self.check_input(x)
        self._need_features()
        m = mask_float(mask, x)
        # The perceptual target is always the clean slice; with ae noise_std > 0 the input is corrupted.
        recon = self.ae(self.ae.corrupt(x, m, generator))
        with torch.no_grad():
            fx = self.feature_net.features(x)
        dists = feature_distances(self.feature_net, x, recon, x_features=fx)
        perceptual = torch.stack([masked_mean(d, F.interpolate(m, size=d.shape[2:], mode="area"))
                                  for d in dists]).mean()
        pixel = reconstruction_loss(recon, x, m, self.ae.rec_kind, self.ae.bg_weight)
        loss = perceptual + self.pixel_weight * pixel
        return {"loss": loss, "perceptual": perceptual.detach(), "pixel": pixel.detach()}

    def score_maps(self, x, recon, feature_net=None, **kwargs):
        """As for every net, plus "perceptual" through the DPA's own feature net (unless another is given)."""
        self._need_features()
        return super().score_maps(x, recon, feature_net=feature_net or self.feature_net, **kwargs)
