"""Denoising diffusion models that score by partial noising and denoising (MONAI DiffusionModelUNet, DDPMScheduler,
DDIMScheduler, DiffusionInferer).

ddpm  (AnoDDPM, Wyatt et al. 2022): a UNet predicts the noise added to a healthy slice at a random step t of a
      `train_steps` chain (DDPM, Ho et al. 2020). To score, the slice is noised to t* and denoised with `ddim_steps`
      deterministic DDIM steps: the noise wipes out a lesion's appearance at its scale, and the model, which has only
      seen healthy tissue, redraws healthy tissue there. arch["noise"]: "gaussian" or "simplex" (octave simplex noise,
      nets/simplex.py, as AnoDDPM proposes: low-frequency noise hides lesions better than white noise), used both in
      training and in scoring.
pddpm (patched DDPM, Behrendt et al. 2023): in training only one random patch is noised and the rest of the slice is
      left clean; the UNet sees the clean context plus a channel marking the patch. To score, every patch of a grid
      (`patch`, `patch_stride`) is noised and denoised in turn with the rest clean (re-imposed after every DDIM step);
      each pixel takes the mean of the reconstructions of the patches covering it.
cddpm (conditioned DDPM, Behrendt et al. 2023): the UNet is conditioned through cross-attention on `cond_tokens`
      vectors of `cond_dim` that a small convolutional encoder, trained jointly, computes from the clean slice. The
      condition carries the slice's global anatomy (position in the brain, ventricle size, contrast) so that denoising
      from a high t* stays faithful to this subject; it is far too small to copy a lesion through.

Conventions shared by all three (and by ldm, nets/latent_diffusion.py):
- The diffusion runs on x * data_scale (standardised intensities span about [-3, 2]; 0.5 brings them near the unit
  range the noise schedules are designed for). Predictions of the clean image are clipped to +-`clip` standardised
  units (0: no clipping).
- The noise-prediction loss is brain-weighted like the other nets' reconstruction losses: the mean squared (or
  absolute, `rec_loss`) error inside the brain plus `bg_weight` times that outside.
- Ensembles over noise levels: `t_stars` lists the levels. For each, DDIM runs `ddim_steps` steps of equal size r from
  t0 = ddim_steps * r down to 0 and the last step's prediction of the clean image is that level's reconstruction.
  MONAI's DDIMScheduler steps by r = train_steps // n for an integer n, so t0 is the achievable start nearest t*
  (exactly t* for the defaults); `net.noise_levels` lists (t0, r) per level.
- reconstruct(x) = the mean over levels of the levels' reconstructions. score_maps (SliceNet's) compares x with that
  mean, so the "signed" map is exactly the mean of the per-level signed residuals, while "l1" and "ssim" are those of
  the consensus reconstruction (not means of per-level l1/ssim maps).
- Determinism: the scoring noise of level k is drawn by a CPU torch.Generator seeded from (arch["seed"], k) and moved
  to the device, so CPU and CUDA start from the same noise, and it is one noise image (C, H, W) shared by every slice,
  so a slice's reconstruction does not depend on the batch it comes in. Training noise comes from the generator the
  training engine passes (seeded per epoch, so resumed runs continue identically).

Sampling (`sample(n)`, ddpm and ldm only): deterministic DDIM from pure noise of the net's own kind (simplex for a
simplex-trained ddpm: that is what it saw at the end of its training chain), returned in the units the net scores in.
pddpm and cddpm refuse: the first only ever learned to fill a patch inside clean context, the second needs the
condition of a real slice. Each sample's noise comes from its own seed, drawn in turn from the caller's generator, so
sample k is the same whatever the batch size. evaluation/realism.py judges the samples.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import (REC_LOSSES, SliceNet, check_choice, check_float, check_int, check_ints, check_size, eval_mode,
                   mask_float, masked_mean, pixel_error)
from .simplex import simplex_noise

NOISES = ("gaussian", "simplex")
SCHEDULES = ("linear_beta", "scaled_linear_beta", "cosine")


# ----------------------------------------------------------------------------------------------- arch helpers
def check_bools(arch: dict, key: str, length: int) -> List[bool]:
    v = arch[key]
    if not isinstance(v, (list, tuple)) or len(v) != length or not all(isinstance(b, bool) for b in v):
        raise ValueError(f"arch {arch['type']!r}: {key!r} must be a list of {length} booleans (one per level of "
                         f"'channels'), got {v!r}")
    return list(v)


def unet_defaults(channels: Sequence[int], attention: Sequence[bool]) -> dict:
    return {"channels": list(channels), "attention_levels": list(attention), "num_res_blocks": 1,
            "norm_groups": 16, "head_channels": 32}


def schedule_defaults() -> dict:
    return {"train_steps": 1000, "schedule": "linear_beta", "t_stars": [100, 250, 500], "ddim_steps": 5,
            "seed": 0}


def build_unet(arch: dict, in_channels: int, out_channels: int, cross_attention_dim: Optional[int] = None):
    """A 2D MONAI DiffusionModelUNet from the arch's UNet keys (see unet_defaults), with clear errors for the
    combinations MONAI would reject deep inside."""
    from monai.networks.nets import DiffusionModelUNet

    channels = check_ints(arch, "channels")
    attention = check_bools(arch, "attention_levels", len(channels))
    blocks = check_int(arch, "num_res_blocks")
    groups = check_int(arch, "norm_groups")
    heads = check_int(arch, "head_channels")
    if any(c % groups for c in channels):
        raise ValueError(f"arch {arch['type']!r}: every entry of 'channels' {channels} must be divisible by "
                         f"'norm_groups' {groups}")
    if any(a and c % heads for a, c in zip(attention, channels)):
        raise ValueError(f"arch {arch['type']!r}: 'channels' at attention levels must be divisible by "
                         f"'head_channels' {heads}")
    if cross_attention_dim is not None and not any(attention):
        raise ValueError(f"arch {arch['type']!r}: conditioning needs at least one attention level")
    return DiffusionModelUNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels,
                              num_res_blocks=blocks, channels=channels, attention_levels=attention,
                              norm_num_groups=groups, num_head_channels=heads,
                              with_conditioning=cross_attention_dim is not None,
                              cross_attention_dim=cross_attention_dim,
                              # torch's fused attention never holds the (tokens x tokens) matrix of a whole batch
                              # (80 slices at 28 x 24 would be 290 MB); same results, faster on CPU and GPU.
                              use_flash_attention=True)


def ddim_level(t_star: int, steps: int, train_steps: int) -> Tuple[int, int, int]:
    """(t0, r, n): the start step and DDIM stride nearest to noising to t_star and denoising in `steps` equal steps,
    with r = train_steps // n for an integer n (the only strides MONAI's DDIMScheduler takes: n is its number of
    inference steps) and t0 = steps * r < train_steps. Ties go to the smaller start."""
    best = None
    for n in range(1, train_steps + 1):
        r = train_steps // n
        t0 = steps * r
        if r < 1 or t0 >= train_steps:
            continue
        key = (abs(t0 - t_star), t0)
        if best is None or key < best[0]:
            best = (key, (t0, r, n))
    if best is None:
        raise ValueError(f"no DDIM schedule of {steps} steps fits in {train_steps} training steps")
    return best[1]


class DiffusionBase(SliceNet):
    """What ddpm, pddpm, cddpm and ldm share: the noise schedule, the noise draws, the DDIM loop and the ensemble over
    noise levels. Subclasses set `self.unet` and implement `_predict(xt, t, cond)` (noise prediction) and, for
    pixel-space nets, `_condition(x0)`."""

    def _init_schedule(self, clip: Optional[float]) -> None:
        from monai.inferers import DiffusionInferer
        from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

        a = self.arch
        self.train_steps = check_int(a, "train_steps", low=2)
        schedule = check_choice(a, "schedule", SCHEDULES)
        self.t_stars = check_ints(a, "t_stars")
        self.ddim_steps = check_int(a, "ddim_steps")
        if any(t >= self.train_steps for t in self.t_stars):
            raise ValueError(f"arch {a['type']!r}: every t_star must be below train_steps {self.train_steps}, "
                             f"got {self.t_stars}")
        if any(t < self.ddim_steps for t in self.t_stars):
            raise ValueError(f"arch {a['type']!r}: ddim_steps {self.ddim_steps} must not exceed any t_star "
                             f"{self.t_stars}")
        self.seed = check_int(a, "seed", low=0)
        clip_kwargs = {"clip_sample": False}
        if clip:
            clip_kwargs = {"clip_sample": True, "clip_sample_min": -clip, "clip_sample_max": clip}
        self.scheduler = DDPMScheduler(num_train_timesteps=self.train_steps, schedule=schedule, **clip_kwargs)
        self.ddim = DDIMScheduler(num_train_timesteps=self.train_steps, schedule=schedule, **clip_kwargs)
        self.inferer = DiffusionInferer(self.scheduler)
        levels = [ddim_level(t, self.ddim_steps, self.train_steps) for t in self.t_stars]
        self.noise_levels = [(t0, r) for t0, r, _ in levels]
        self._ddim_n = [n for _, _, n in levels]
        self._noise_cache: Dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ noise
    def _draw_noise(self, shape, generator, device) -> torch.Tensor:
        """Training-style noise of `shape` on the generator's device (or `device` with the global RNG)."""
        if getattr(self, "noise_kind", "gaussian") == "simplex":
            return simplex_noise(shape, self.simplex_scale, self.simplex_octaves, self.simplex_persistence,
                                 generator=generator, device=generator.device if generator is not None else device)
        return torch.randn(tuple(shape), generator=generator,
                           device=generator.device if generator is not None else device)

    def _random_steps(self, batch: int, generator, device) -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.train_steps, (batch,), generator=generator, device=gen_device).to(device)

    def scoring_noise(self, level: int, shape) -> torch.Tensor:
        """The fixed noise image (1, *shape) of noise level `level`, on the CPU (see the module docstring)."""
        key = (level, tuple(int(s) for s in shape))
        if key not in self._noise_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + level)
            self._noise_cache[key] = self._draw_noise((1, *key[1]), g, torch.device("cpu"))
        return self._noise_cache[key]

    # ------------------------------------------------------------------ denoising
    def _predict(self, xt: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self.unet(xt, timesteps=t, context=cond)

    def _condition(self, x0: torch.Tensor):
        return None

    def denoise(self, z0: torch.Tensor, level: int, cond=None, keep: Optional[torch.Tensor] = None,
                extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise z0 (B, C, h, w; the diffusion's own space) to level `level`'s start and denoise it with DDIM; the
        last step's prediction of the clean input. `keep` (B, 1, h, w) in [0, 1]: where 1 the clean z0 is put back
        after every step (the clean context of a patch); `extra` = channels appended to the UNet's input."""
        t0, r = self.noise_levels[level]
        noise = self.scoring_noise(level, z0.shape[1:]).to(device=z0.device, dtype=z0.dtype).expand_as(z0)
        zt = self.ddim.add_noise(z0, noise, torch.full((z0.shape[0],), t0, dtype=torch.long))
        self.ddim.set_timesteps(self._ddim_n[level])
        pred = z0
        for t in range(t0, 0, -r):
            if keep is not None:
                zt = torch.lerp(zt, z0, keep)
            inp = zt if extra is None else torch.cat([zt, extra.to(zt.dtype)], dim=1)
            steps = torch.full((z0.shape[0],), t, device=z0.device, dtype=torch.long)
            eps = self._predict(inp, steps, cond).float()
            zt, pred = self.ddim.step(eps, t, zt.float())
        return pred

    def level_reconstructions(self, x: torch.Tensor) -> List[torch.Tensor]:
        """One reconstruction (B, C, H, W) per noise level, in the order of t_stars."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sampling
    # Why the type cannot draw slices from pure noise; empty where it can.
    sampling_refusal = "it has no unconditional sampler"

    def _sample_shape(self) -> Tuple[int, ...]:
        """(C, h, w) of the diffusion's own space for slices of arch["size"]."""
        raise NotImplementedError

    def _to_slices(self, z: torch.Tensor) -> torch.Tensor:
        """Clean diffusion-space values back to slices in standardised intensities."""
        raise NotImplementedError

    def sampling_chain(self, steps: int) -> List[int]:
        """The timesteps of a `steps`-step DDIM chain from pure noise: from train_steps - 1 down by
        r = train_steps // steps. The scheduler's step() goes from t to t - r whatever its own timestep list says,
        so the chain keeps to that stride rather than to MONAI's rounded, unevenly spaced list."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.train_steps:
            raise ValueError(f"{self.type_name}: sampling steps must be an integer in [1, {self.train_steps}], "
                             f"got {steps!r}")
        r = self.train_steps // steps
        return [self.train_steps - 1 - k * r for k in range(steps)]

    def _sample_noise(self, seeds: Sequence[int], shape) -> torch.Tensor:
        # One CPU generator per sample: its noise depends on its seed alone, not on the batch or the device.
        return torch.cat([self._draw_noise((1, *shape), torch.Generator().manual_seed(s), torch.device("cpu"))
                          for s in seeds])

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None, steps: int = 50, device=None,
               batch: int = 32, progress: Optional[Callable[[float], None]] = None) -> torch.Tensor:
        """`n` slices (n, C, H, W) drawn from pure noise with `steps` deterministic DDIM steps, on the CPU, in the
        standardised intensities the net scores in. Deterministic given `generator` (torch's global RNG without
        one) and independent of `batch` (slices per UNet pass, which bounds memory). Runs on `device` (default:
        where the net's weights are) in eval mode; the net's mode is restored. `progress(fraction)` after every
        batch (a Reporter there makes the loop cancellable)."""
        if self.sampling_refusal:
            raise ValueError(f"{self.type_name} cannot sample slices from noise: {self.sampling_refusal}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{self.type_name}: the number of samples must be a positive integer, got {n!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"{self.type_name}: batch must be a positive integer, got {batch!r}")
        chain = self.sampling_chain(steps)
        device = torch.device(device) if device is not None else next(self.parameters()).device
        gen_device = generator.device if generator is not None else torch.device("cpu")
        seeds = torch.randint(0, 2 ** 62, (n,), generator=generator, device=gen_device).tolist()
        shape = self._sample_shape()
        out = []
        with eval_mode(self):
            self.ddim.set_timesteps(steps)  # sets the stride train_steps // steps that step() uses
            for start in range(0, n, batch):
                z = self._sample_noise(seeds[start:start + batch], shape).to(device)
                pred = z
                for t in chain:
                    ts = torch.full((z.shape[0],), t, device=device, dtype=torch.long)
                    eps = self._predict(z, ts, None).float()
                    z, pred = self.ddim.step(eps, t, z.float())
                out.append(self._to_slices(pred).float().cpu())
                if progress is not None:
                    progress(min(1.0, (start + batch) / n))
        return torch.cat(out)

    def forward(self, x):
        levels = self.level_reconstructions(x)
        return torch.stack(levels).mean(dim=0) if len(levels) > 1 else levels[0]

    # ------------------------------------------------------------------ loss
    def _eps_loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                  region: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Brain-weighted noise-prediction error; `region` (B, 1, h, w) restricts it (a patch)."""
        err = pixel_error(pred.float(), target.float(), self.rec_kind)
        inside = weight if region is None else weight * region
        loss = masked_mean(err, inside)
        if self.bg_weight > 0:
            outside = (1.0 - weight) if region is None else (1.0 - weight) * region
            loss = loss + self.bg_weight * masked_mean(err, outside)
        return loss


class PixelDiffusion(DiffusionBase):
    """ddpm; the base of pddpm and cddpm (see the module docstring). arch: UNet (channels, attention_levels,
    num_res_blocks, norm_groups, head_channels), schedule (train_steps, schedule, t_stars, ddim_steps, seed), noise
    ("gaussian" | "simplex"; simplex_scale = pixels per cycle of the coarsest octave, simplex_octaves,
    simplex_persistence), data_scale, clip, rec_loss, bg_weight."""

    type_name = "ddpm"
    default_noise = "simplex"

    @classmethod
    def defaults(cls, in_channels: int = 1, size: Sequence[int] = (112, 96)) -> dict:
        return {"type": cls.type_name, "in_channels": int(in_channels), "size": [int(s) for s in size],
                **unet_defaults([32, 64, 64, 128], [False, False, False, True]), **schedule_defaults(),
                "noise": cls.default_noise, "simplex_scale": 32.0, "simplex_octaves": 5, "simplex_persistence": 0.8,
                "data_scale": 0.5, "clip": 6.0, "rec_loss": "l2", "bg_weight": 0.1, **cls.extra_defaults()}

    @staticmethod
    def extra_defaults() -> dict:
        return {}

    def __init__(self, arch: dict) -> None:
        super().__init__(arch)
        a = self.arch
        check_int(a, "in_channels")
        channels = check_ints(a, "channels")
        self.stride_factor = 2 ** (len(channels) - 1)
        self.size_hw = check_size(a, self.stride_factor)
        self.noise_kind = check_choice(a, "noise", NOISES)
        self.simplex_scale = check_float(a, "simplex_scale", low=1e-3)
        self.simplex_octaves = check_int(a, "simplex_octaves")
        self.simplex_persistence = check_float(a, "simplex_persistence", low=1e-3)
        self.data_scale = check_float(a, "data_scale", low=1e-6)
        clip = check_float(a, "clip")
        self.rec_kind = check_choice(a, "rec_loss", REC_LOSSES)
        self.bg_weight = check_float(a, "bg_weight")
        self._init_schedule(clip * self.data_scale)
        self._build()

    sampling_refusal = ""

    def _build(self) -> None:
        self.unet = build_unet(self.arch, self.in_channels, self.in_channels)

    def _sample_shape(self):
        return (self.in_channels, *self.size_hw)

    def _to_slices(self, z):
        return z / self.data_scale

    def training_losses(self, x, mask, generator=None):
        self.check_input(x)
        m = mask_float(mask, x)
        x0 = x.float() * self.data_scale
        noise = self._draw_noise(x0.shape, generator, x.device).to(x0)
        t = self._random_steps(x0.shape[0], generator, x.device)
        pred = self.inferer(inputs=x0, diffusion_model=self.unet, noise=noise, timesteps=t,
                            condition=self._condition(x0))
        loss = self._eps_loss(pred, noise, m)
        return {"loss": loss, "eps": loss.detach()}

    def level_reconstructions(self, x):
        x0 = x.float() * self.data_scale
        cond = self._condition(x0)
        return [self.denoise(x0, k, cond) / self.data_scale for k in range(len(self.noise_levels))]


class PatchedDDPM(PixelDiffusion):
    """pddpm: PixelDiffusion whose UNet takes one more input channel (1 inside the noised patch). arch adds patch =
    [h, w] in pixels and patch_stride = [h, w] of the scoring grid (stride < patch: overlapping patches, averaged)."""

    type_name = "pddpm"
    default_noise = "gaussian"
    sampling_refusal = ("it only ever learned to fill one noised patch inside clean context, never a whole slice "
                        "from noise")

    @classmethod
    def defaults(cls, in_channels: int = 1, size: Sequence[int] = (112, 96)) -> dict:
        arch = super().defaults(in_channels, size)
        half = [max(1, int(s) // 2) for s in size]
        arch.update(t_stars=[250, 500], ddim_steps=2, patch=half, patch_stride=half)
        return arch

    def _build(self) -> None:
        a = self.arch
        self.patch = check_ints(a, "patch", length=2)
        self.patch_stride = check_ints(a, "patch_stride", length=2)
        if any(p > s for p, s in zip(self.patch, self.size_hw)):
            raise ValueError(f"arch 'pddpm': patch {self.patch} must fit in the size {self.size_hw}")
        if any(st > p for st, p in zip(self.patch_stride, self.patch)):
            raise ValueError(f"arch 'pddpm': patch_stride {self.patch_stride} must not exceed the patch "
                             f"{self.patch} (pixels between patches would never be reconstructed)")
        self.unet = build_unet(a, self.in_channels + 1, self.in_channels)

    def _patch_masks(self, corners: torch.Tensor, size, device) -> torch.Tensor:
        """(N, 1, H, W) float: 1 inside the patch whose top-left corners are `corners` (N, 2)."""
        h, w = size
        ys = torch.arange(h, device=device).view(1, h, 1)
        xs = torch.arange(w, device=device).view(1, 1, w)
        y0, x0 = corners[:, 0].view(-1, 1, 1), corners[:, 1].view(-1, 1, 1)
        inside = (ys >= y0) & (ys < y0 + self.patch[0]) & (xs >= x0) & (xs < x0 + self.patch[1])
        return inside.unsqueeze(1).float()

    def grid_corners(self, size) -> List[Tuple[int, int]]:
        """Top-left corners of the scoring patches: a regular grid, with a last row/column flush with the edge so
        every pixel is covered."""
        axes = []
        for s, p, st in zip(size, self.patch, self.patch_stride):
            p = min(p, s)
            starts = list(range(0, s - p + 1, st))
            if starts[-1] != s - p:
                starts.append(s - p)
            axes.append(starts)
        return [(y, x) for y in axes[0] for x in axes[1]]

    def training_losses(self, x, mask, generator=None):
        self.check_input(x)
        m = mask_float(mask, x)
        x0 = x.float() * self.data_scale
        b, _, h, w = x0.shape
        noise = self._draw_noise(x0.shape, generator, x.device).to(x0)
        t = self._random_steps(b, generator, x.device)
        gen_device = generator.device if generator is not None else x.device
        high = torch.tensor([h - min(self.patch[0], h) + 1, w - min(self.patch[1], w) + 1], device=gen_device)
        corners = (torch.rand((b, 2), generator=generator, device=gen_device) * high).floor().long().to(x.device)
        patch = self._patch_masks(corners, (h, w), x.device)
        xt = torch.lerp(x0, self.scheduler.add_noise(x0, noise, t), patch)
        pred = self.unet(torch.cat([xt, patch], dim=1), timesteps=t)
        loss = self._eps_loss(pred, noise, m, region=patch)
        return {"loss": loss, "eps": loss.detach()}

    def level_reconstructions(self, x):
        x0 = x.float() * self.data_scale
        b, _, h, w = x0.shape
        corners = self.grid_corners((h, w))
        masks = self._patch_masks(torch.tensor(corners, device=x.device), (h, w), x.device)  # (P, 1, H, W)
        coverage = masks.sum(dim=0, keepdim=True)
        out = []
        for k in range(len(self.noise_levels)):
            total = torch.zeros_like(x0)
            # One patch position at a time for the whole batch: memory stays that of a plain ddpm.
            for p in range(masks.shape[0]):
                mp = masks[p:p + 1].expand(b, -1, -1, -1)
                rec = self.denoise(x0, k, keep=1.0 - mp, extra=mp)
                total = total + mp * rec
            out.append(total / coverage / self.data_scale)
        return out


class ConditionedDDPM(PixelDiffusion):
    """cddpm: PixelDiffusion with a condition encoder. arch adds cond_channels (encoder widths; every stage halves
    the resolution), cond_tokens and cond_dim (the condition: cond_tokens vectors of cond_dim, cross-attended at the
    UNet's attention levels)."""

    type_name = "cddpm"
    default_noise = "gaussian"
    sampling_refusal = "it denoises under the condition encoded from a real slice, and there is none to sample from"

    @staticmethod
    def extra_defaults() -> dict:
        return {"cond_channels": [16, 32, 64, 64], "cond_tokens": 4, "cond_dim": 64}

    def _build(self) -> None:
        a = self.arch
        widths = check_ints(a, "cond_channels")
        self.cond_tokens = check_int(a, "cond_tokens")
        self.cond_dim = check_int(a, "cond_dim")
        layers, cin = [], self.in_channels
        for c in widths:
            g = 8 if c % 8 == 0 else 1
            layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1), nn.GroupNorm(g, c), nn.SiLU()]
            cin = c
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(cin, self.cond_tokens * self.cond_dim))
        self.unet = build_unet(a, self.in_channels, self.in_channels, cross_attention_dim=self.cond_dim)

    def _condition(self, x0):
        return self.encoder(x0).view(x0.shape[0], self.cond_tokens, self.cond_dim)
