"""Denoising autoencoder with coarse noise (Kascenas et al. 2022): a MONAI BasicUNet learns to remove smooth,
lesion-sized noise added inside the brain; at test time one pass on the clean input gives the pseudo-healthy image, and
the residual is the anomaly map.

BasicUNet rather than monai's UNet: BasicUNet keeps a full-resolution level (two convolutions and a skip connection at
the input's resolution), while UNet's first layer already has stride 2, so its output is rebuilt by a transposed
convolution from half-resolution features. On template-derived slices the BasicUNet with a similar parameter count
(0.5 M against 0.8 M) reached a 4x lower training loss after 100 steps (0.21 against 0.84, mean squared error)."""

from __future__ import annotations

from typing import Sequence

from .base import (NORMS, REC_LOSSES, SliceNet, check_choice, check_float, check_int, check_ints, check_layer_name,
                   check_size, mask_float, reconstruction_loss)
from .noise import coarse_noise


class DenoisingAE(SliceNet):
    """arch: features = BasicUNet's six widths (levels 0..4 at strides 1..16, then the last decoder level), norm,
    upsample ("deconv", "pixelshuffle" or "nontrainable"); noise_res = the coarse grid [h, w] (default: one cell per
    8 pixels, 16 mm at 2 mm voxels), noise_std = std of the coarse draw (standardised units; the per-pixel std after
    upsampling is about 2/3 of it); rec_loss and bg_weight as for the other nets. The UNet predicts the clean image
    (all channels) from the noisy one. Slice sizes must be divisible by 16."""

    type_name = "dae"
    UPSAMPLE = ("deconv", "pixelshuffle", "nontrainable")

    @staticmethod
    def defaults(in_channels: int = 1, size: Sequence[int] = (112, 96)) -> dict:
        size = [int(s) for s in size]
        return {"type": "dae", "in_channels": int(in_channels), "size": size,
                "features": [16, 16, 32, 64, 128, 16], "norm": "BATCH", "upsample": "deconv",
                "rec_loss": "l2", "bg_weight": 0.1,
                "noise_res": [max(1, size[0] // 8), max(1, size[1] // 8)], "noise_std": 0.2}

    def __init__(self, arch: dict) -> None:
        super().__init__(arch)
        a = self.arch
        check_int(a, "in_channels")
        features = check_ints(a, "features", length=6)
        self.stride_factor = 16
        size = check_size(a, self.stride_factor)
        self.noise_res = check_ints(a, "noise_res", length=2)
        if any(r > s for r, s in zip(self.noise_res, size)):
            raise ValueError(f"arch 'dae': noise_res {self.noise_res} must not exceed the size {size}")
        self.noise_std = check_float(a, "noise_std")
        self.rec_kind = check_choice(a, "rec_loss", REC_LOSSES)
        self.bg_weight = check_float(a, "bg_weight")
        norm = check_layer_name(a, "norm", NORMS)
        upsample = check_choice(a, "upsample", self.UPSAMPLE)
        from monai.networks.nets import BasicUNet  # imported here: a package import costs seconds (conv_autoencoder)

        c = self.in_channels
        self.unet = BasicUNet(spatial_dims=2, in_channels=c, out_channels=c, features=features,
                              norm=(norm.lower(), {"affine": True}), upsample=upsample)

    def forward(self, x):
        return self.unet(x)

    def noise(self, x, mask, generator=None):
        """The training corruption for the batch x: coarse noise inside `mask` (float (B, 1, H, W))."""
        return coarse_noise(x.shape, self.noise_res, self.noise_std, mask=mask, generator=generator,
                            device=x.device, dtype=x.dtype)

    def training_losses(self, x, mask, generator=None):
        self.check_input(x)
        m = mask_float(mask, x)
        out = self.unet(x + self.noise(x, m, generator))
        rec = reconstruction_loss(out, x, m, self.rec_kind, self.bg_weight)
        return {"loss": rec, "rec": rec.detach()}
