"""Latent diffusion on a VQ-VAE (Pinaya et al. 2022, "Fast unsupervised brain anomaly detection and segmentation with
diffusion models"): the fast diffusion scorer.

vqvae: a MONAI VQVAE trained on healthy slices (brain-weighted reconstruction error + the quantiser's commitment
    loss; the codebook follows by exponential moving averages). Every entry of `channels` is one stride-2 level, so
    112 x 96 slices become latents of (embedding_dim, 28, 24) with the defaults.
ldm: a small DiffusionModelUNet trained, like ddpm (nets/diffusion.py), to predict Gaussian noise, here on the frozen
    vqvae's quantised latents scaled to unit spread (`latent_scale`, 1 / their std on the training slices). Training
    is two-stage, like the dpa's: fit a vqvae first, then `ldm.set_first_stage(vqvae, slices)` and fit the ldm.

Sampling (`sample(n)`): DDIM from Gaussian latents, divided by the latent scale and decoded (nets/diffusion.py).

Scoring one noise level (ensembles over `t_stars` as in nets/diffusion.py): encode and quantise the slice, noise the
latent to t*, denoise with DDIM; the latent positions whose root-mean-square change over channels exceeds
`latent_threshold` (in units of the latents' healthy spread) are those the model considers unlikely; replace them with
the denoised values, leave every other position as encoded, and decode (the decoder re-quantises, so a replaced
position takes the nearest healthy code). With `mask_residual` the reconstruction is the input itself outside the
replaced positions (the mask upsampled bilinearly to pixels, so it fades over one latent cell): the residual, and so
the anomaly map, is exactly zero where the diffusion model changed nothing, and the vqvae's own blur does not show up
as anomaly there. Without it, the reconstruction is the decoded image everywhere.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.subsets import spread_pick
from .base import (REC_LOSSES, SliceNet, check_choice, check_float, check_int, check_ints, check_size, jsonable,
                   mask_float, reconstruction_loss)
from .diffusion import DiffusionBase, build_unet, schedule_defaults, unet_defaults

LATENT_SCALE_SLICES = 256  # slices whose latents set the ldm's latent scale (evenly spaced over the training set)


class VQVAENet(SliceNet):
    """arch: channels (one stride-2 level each), num_res_layers, num_embeddings, embedding_dim, commitment_cost,
    decay (of the codebook's moving averages), rec_loss, bg_weight."""

    type_name = "vqvae"

    @staticmethod
    def defaults(in_channels: int = 1, size: Sequence[int] = (112, 96)) -> dict:
        return {"type": "vqvae", "in_channels": int(in_channels), "size": [int(s) for s in size],
                "channels": [32, 64], "num_res_layers": 1, "num_embeddings": 128, "embedding_dim": 8,
                "commitment_cost": 0.25, "decay": 0.9, "rec_loss": "l1", "bg_weight": 0.1}

    def __init__(self, arch: dict) -> None:
        super().__init__(arch)
        from monai.networks.nets import VQVAE

        a = self.arch
        check_int(a, "in_channels")
        channels = check_ints(a, "channels")
        self.stride_factor = 2 ** len(channels)
        check_size(a, self.stride_factor)
        res_layers = check_int(a, "num_res_layers", low=0)
        n_codes = check_int(a, "num_embeddings", low=2)
        self.embedding_dim = check_int(a, "embedding_dim")
        commitment = check_float(a, "commitment_cost")
        decay = check_float(a, "decay")
        if decay >= 1.0:
            raise ValueError(f"arch 'vqvae': 'decay' must be below 1, got {decay}")
        self.rec_kind = check_choice(a, "rec_loss", REC_LOSSES)
        self.bg_weight = check_float(a, "bg_weight")
        levels = len(channels)
        self.vqvae = VQVAE(spatial_dims=2, in_channels=self.in_channels, out_channels=self.in_channels,
                           channels=channels, num_res_layers=res_layers, num_res_channels=channels,
                           downsample_parameters=[(2, 4, 1, 1)] * levels,
                           upsample_parameters=[(2, 4, 1, 1, 0)] * levels,
                           num_embeddings=n_codes, embedding_dim=self.embedding_dim, commitment_cost=commitment,
                           decay=decay)

    def latent_shape(self, size) -> tuple:
        return (self.embedding_dim, int(size[0]) // self.stride_factor, int(size[1]) // self.stride_factor)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised latents (B, embedding_dim, H / f, W / f)."""
        return self.vqvae.encode_stage_2_inputs(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image from latents, each position re-quantised to its nearest code first."""
        return self.vqvae.decode_stage_2_outputs(z)

    def forward(self, x):
        return self.vqvae(x)[0]

    def training_losses(self, x, mask, generator=None):
        self.check_input(x)
        m = mask_float(mask, x)
        recon, quant = self.vqvae(x)
        rec = reconstruction_loss(recon.float(), x.float(), m, self.rec_kind, self.bg_weight)
        return {"loss": rec + quant, "rec": rec.detach(), "quant": quant.detach()}


class LatentDDPM(DiffusionBase):
    """ldm (see the module docstring). arch: vqvae = arch of the first stage; the UNet and schedule keys of ddpm;
    latent_threshold, mask_residual, rec_loss and bg_weight of the latent noise-prediction loss (brain = latent
    positions whose cell touches the brain)."""

    type_name = "ldm"
    first_stage_key = "vqvae"
    sampling_refusal = ""

    @staticmethod
    def defaults(in_channels: int = 1, size: Sequence[int] = (112, 96)) -> dict:
        return {"type": "ldm", "in_channels": int(in_channels), "size": [int(s) for s in size],
                "vqvae": VQVAENet.defaults(in_channels, size),
                **unet_defaults([32, 64, 64], [False, False, True]), **schedule_defaults(),
                "latent_threshold": 0.5, "mask_residual": True, "rec_loss": "l2", "bg_weight": 0.1}

    def __init__(self, arch: dict) -> None:
        super().__init__(arch)
        a = self.arch
        sub = a["vqvae"]
        if not isinstance(sub, dict) or sub.get("type") != "vqvae":
            raise ValueError(f"arch 'ldm': 'vqvae' must be an arch dict of type vqvae, got {sub!r}")
        for shared in ("in_channels", "size"):
            if shared in sub and jsonable(sub[shared]) != a[shared]:
                raise ValueError(f"arch 'ldm': vqvae[{shared!r}] = {sub[shared]!r} differs from the ldm's "
                                 f"{a[shared]!r}")
        self.vqvae = VQVAENet.from_arch(dict(sub, in_channels=a["in_channels"], size=a["size"]))
        a["vqvae"] = self.vqvae.arch
        channels = check_ints(a, "channels")
        self.stride_factor = self.vqvae.stride_factor * 2 ** (len(channels) - 1)
        check_size(a, self.stride_factor)
        self.latent_threshold = check_float(a, "latent_threshold")
        if not isinstance(a["mask_residual"], bool):
            raise ValueError(f"arch 'ldm': 'mask_residual' must be true or false, got {a['mask_residual']!r}")
        self.mask_residual = a["mask_residual"]
        self.rec_kind = check_choice(a, "rec_loss", REC_LOSSES)
        self.bg_weight = check_float(a, "bg_weight")
        self._init_schedule(None)
        dim = self.vqvae.embedding_dim
        self.unet = build_unet(a, dim, dim)
        self.vqvae.requires_grad_(False)
        self.vqvae.eval()
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("first_stage_ready", torch.zeros(()))

    # The first stage stays frozen and in eval mode (no codebook updates) whatever mode the ldm is put in.
    def train(self, mode: bool = True):
        super().train(mode)
        self.vqvae.eval()
        return self

    @torch.no_grad()
    def set_first_stage(self, vqvae: nn.Module, slices=None) -> None:
        """Copy a trained vqvae's weights in (its arch must equal arch["vqvae"]), freeze them, and set the latent
        scale from `slices` (x (N, C, H, W) array or tensor; up to LATENT_SCALE_SLICES evenly spaced ones are
        encoded with `vqvae`, on its device). Without slices the scale stays as it is."""
        if getattr(vqvae, "arch", None) != self.arch["vqvae"]:
            raise ValueError(f"ldm: the vqvae's arch {getattr(vqvae, 'arch', None)!r} differs from this ldm's "
                             f"vqvae arch {self.arch['vqvae']!r}")
        self.vqvae.load_state_dict(vqvae.state_dict())
        self.vqvae.requires_grad_(False)
        self.vqvae.eval()
        if slices is not None:
            x = slices[0] if isinstance(slices, (tuple, list)) else slices
            n = int(x.shape[0])
            if n == 0:
                raise ValueError("ldm: no slices to set the latent scale from")
            pick = spread_pick(n, LATENT_SCALE_SLICES)
            device = next(vqvae.parameters()).device
            was = vqvae.training
            vqvae.eval()
            chunks = []
            for start in range(0, len(pick), 64):
                xb = torch.as_tensor(np.asarray(x[pick[start:start + 64]]), dtype=torch.float32).to(device)
                chunks.append(vqvae.encode(xb).float().cpu())
            vqvae.train(was)
            std = float(torch.cat(chunks).std())
            self.latent_scale.fill_(1.0 / max(std, 1e-6))
        self.first_stage_ready.fill_(1.0)

    def _need_first_stage(self) -> None:
        if not bool(self.first_stage_ready):
            raise RuntimeError("ldm: no trained first stage; train a 'vqvae' on healthy slices and call "
                               "set_first_stage(...) first")

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"main": [p for p in self.unet.parameters() if p.requires_grad]}

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.vqvae.encode(x).float() * self.latent_scale

    def training_losses(self, x, mask, generator=None):
        self.check_input(x)
        self._need_first_stage()
        m = mask_float(mask, x)
        with torch.no_grad():
            z0 = self._latents(x)
        weight = F.adaptive_max_pool2d(m.float(), z0.shape[2:])  # a latent cell counts if it touches the brain
        noise = self._draw_noise(z0.shape, generator, x.device).to(z0)
        t = self._random_steps(z0.shape[0], generator, x.device)
        pred = self.inferer(inputs=z0, diffusion_model=self.unet, noise=noise, timesteps=t)
        loss = self._eps_loss(pred, noise, weight)
        return {"loss": loss, "eps": loss.detach()}

    def _sample_shape(self):
        self._need_first_stage()
        return self.vqvae.latent_shape(self.size)

    def _to_slices(self, z):
        return self.vqvae.decode(z / self.latent_scale)

    def latent_change(self, z0: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w): root-mean-square over channels of the denoised minus the encoded latent (scaled units)."""
        return (z_hat - z0).pow(2).mean(dim=1, keepdim=True).sqrt()

    def level_reconstructions(self, x):
        self._need_first_stage()
        z0 = self._latents(x)
        out = []
        for k in range(len(self.noise_levels)):
            z_hat = self.denoise(z0, k)
            flagged = (self.latent_change(z0, z_hat) > self.latent_threshold).float()
            healed = torch.lerp(z0, z_hat, flagged)
            decoded = self.vqvae.decode(healed / self.latent_scale).float()
            if self.mask_residual:
                up = F.interpolate(flagged, size=x.shape[2:], mode="bilinear", align_corners=False)
                decoded = torch.lerp(x.float(), decoded, up)
            out.append(decoded)
        return out

    def forward(self, x):
        self._need_first_stage()
        return super().forward(x)
