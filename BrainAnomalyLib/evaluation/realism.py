"""How realistic are the slices a diffusion model draws from noise? A Fréchet distance (FD) in the feature space of
our own trained encoder.

The encoder is the feature net inside the shipped `dpa-t1-ixi` model by default: a network trained by inpainting and
denoising on healthy IXI T1 slices (nets/perceptual.py), independent of the diffusion model being judged. A slice's
feature vector is the global average of every level of `FeatureNet.features`, concatenated (D = 160 for that net).
FD between two sets of vectors = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Fréchet distance of the two
Gaussians with those means and covariances, as in FID; not comparable with FID numbers, the features differ).

An FD on its own has no scale, and it is biased upwards at small sample sizes, so the report puts three sets of the
same size n against the same held-out real slices:
- samples: n slices drawn by the model (`sample`, DDIM from pure noise);
- training: n real training slices (spread over every training subject and the z range): the floor that real healthy
  data reaches at this n;
- blurred training: the same n slices smoothed with a Gaussian of `blur_sigma` pixels inside the brain: what plain
  loss of detail costs.
A model whose samples score near the floor draws healthy-looking slices; one near or beyond the blurred reference
draws slices no more realistic than blurred real ones.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..core.subsets import spread_pick

DEFAULT_ENCODER = "dpa-t1-ixi"
DEFAULT_SAMPLES = 256
DEFAULT_STEPS = 50
BLUR_SIGMA = 2.0
REALISM_JSON = "realism.json"
SAMPLES_PNG = "samples.png"
# Relative ridge added to both covariances: it keeps the square root defined when a set has fewer samples than
# feature dimensions (rank-deficient covariances), and moves FD by about RIDGE x tr(S) at most.
RIDGE = 1e-6


# ----------------------------------------------------------------------------------------------- the distance
def _moments(feats, name: str) -> Tuple[np.ndarray, np.ndarray]:
    f = np.asarray(feats, np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name}: features must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"{name}: a Fréchet distance needs at least 2 samples per set (a covariance), got "
                         f"{f.shape[0]}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name}: features are not all finite")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(feats_a, feats_b) -> float:
    """FD between the Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    tr (S_a S_b)^(1/2) is computed as tr (r S_b r)^(1/2) with r = S_a^(1/2) (scipy.linalg.sqrtm, real part): the two
    matrices are similar, and the second is symmetric, so its eigenvalues are real; round-off can still make a few
    slightly negative, and those are clipped to 0. A ridge of RIDGE times the mean variance goes onto both
    covariances (see RIDGE), so a set against itself gives 0 and equal covariances give exactly |mu_a - mu_b|^2."""
    from scipy.linalg import sqrtm

    mu_a, s_a = _moments(feats_a, "feats_a")
    mu_b, s_b = _moments(feats_b, "feats_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"the two feature sets have {mu_a.size} and {mu_b.size} dimensions")
    scale = max(float(np.trace(s_a) + np.trace(s_b)) / (2 * mu_a.size), 1e-12)
    ridge = RIDGE * scale * np.eye(mu_a.size)
    s_a, s_b = s_a + ridge, s_b + ridge
    root_a = np.real(sqrtm(s_a))
    inner = root_a @ s_b @ root_a
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    cross = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    fd = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * cross)
    return max(fd, 0.0)  # round-off around an exact 0


# ----------------------------------------------------------------------------------------------- the encoder
@dataclass
class Encoder:
    """A trained FeatureNet and where it came from (`modality` None: unknown, not checked)."""

    net: object
    name: str
    modality: Optional[str] = None

    def check_fits(self, slices_shape, modality: Optional[str] = None) -> None:
        """Refuse slices (N, C, H, W) or a modality the encoder was not trained on: its features would not mean
        what they mean on its own data."""
        c, h, w = (int(s) for s in tuple(slices_shape)[1:])
        if c != self.net.in_channels:
            raise ValueError(f"encoder {self.name} takes {self.net.in_channels}-channel slices, the slices have "
                             f"{c} channels (a model trained with --context > 0 needs an encoder of that context)")
        if (h, w) != tuple(self.net.size):
            raise ValueError(f"encoder {self.name} was trained on {tuple(self.net.size)} slices, the slices are "
                             f"{(h, w)}")
        if modality and self.modality and modality.upper() != self.modality.upper():
            raise ValueError(f"encoder {self.name} was trained on {self.modality} slices, the model is for "
                             f"{modality}: choose an encoder of that modality")


def load_encoder(name_or_path: str = DEFAULT_ENCODER, device: str = "cpu") -> Encoder:
    """The trained feature net of a model folder or installed model name: a dpa (its frozen feature net, tensors
    "net.feature_net.*") or a model whose network is a feature_net ("net.*"). Raises ModelError when the model is
    missing, holds no feature net, or holds an untrained one."""
    import torch

    from ..core.errors import ModelError
    from ..store.models import resolve_model
    from ..nets import build_net

    model = resolve_model(name_or_path)
    arch = (model.meta.get("params") or {}).get("arch") or {}
    if arch.get("type") == "dpa":
        sub, prefix = arch.get("feature_net"), "net.feature_net."
        ready = np.asarray(model.tensors.get("net.feature_net_ready", 0.0)).reshape(-1)  # (1,) in safetensors
        if ready.size != 1 or float(ready[0]) != 1.0:
            raise ModelError(f"model {model.name}: its feature net was never trained")
    elif arch.get("type") == "feature_net":
        sub, prefix = arch, "net."
    else:
        raise ModelError(f"model {model.name} ({model.kind}) holds no feature net to judge realism with; use a dpa "
                         f"model such as {DEFAULT_ENCODER}")
    net = build_net(sub)
    state = {k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in model.tensors.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"model {model.name}: its feature-net tensors do not fit its arch ({exc})") from None
    return Encoder(net.eval().to(device), model.name, model.modality)


def encoder_features(feature_net, slices, batch: int = 64) -> np.ndarray:
    """(N, D) float64: every level of `feature_net.features(slices)` averaged over space, concatenated. `slices`
    (N, C, H, W) array or tensor, run in batches on the net's device, in eval mode, without gradients."""
    import torch

    from ..nets.base import eval_mode

    device = next(feature_net.parameters()).device
    out = []
    with torch.no_grad(), eval_mode(feature_net):
        for start in range(0, int(slices.shape[0]), batch):
            xb = torch.as_tensor(np.asarray(slices[start:start + batch]), dtype=torch.float32).to(device)
            levels = feature_net.features(xb)
            out.append(torch.cat([f.float().mean(dim=(2, 3)) for f in levels], dim=1).cpu().double().numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------- the report
def blurred(x: np.ndarray, mask: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """Slices smoothed by a Gaussian of `sigma` pixels, kept inside their brain masks (0 outside, as real slices)."""
    import torch

    from ..nets.base import gaussian_blur

    y = gaussian_blur(torch.as_tensor(np.asarray(x), dtype=torch.float32), sigma).numpy()
    return y * np.asarray(mask, np.float32)


def realism_report(net, held_out, training, encoder: Encoder, n: int = DEFAULT_SAMPLES, steps: int = DEFAULT_STEPS,
                   seed: int = 0, batch: int = 32, out_dir=None, modality: Optional[str] = None, device=None,
                   blur_sigma: float = BLUR_SIGMA, progress=None, about: Optional[dict] = None) -> dict:
    """Draw `n` samples from the diffusion `net` and compare them, n training slices and those blurred with the
    held-out real slices, by FD in `encoder`'s feature space (see the module docstring). `held_out` and `training`
    are (x (N, C, H, W), brain mask (N, 1, H, W)) of healthy slices as training selects them; `modality` (the
    model's) is checked against the encoder's; `about` (e.g. which subjects) goes into the result as it is. With
    `out_dir`, writes realism.json and samples.png there."""
    import torch

    held_x = np.asarray(held_out[0], np.float32)
    train_x, train_m = np.asarray(training[0], np.float32), np.asarray(training[1], bool)
    for what, x in (("held-out", held_x), ("training", train_x)):
        if len(x) < 2:
            raise ValueError(f"realism: {len(x)} {what} slices; at least 2 are needed")
        if tuple(x.shape[1:]) != (net.in_channels, *net.size):
            raise ValueError(f"realism: {what} slices are {tuple(x.shape[1:])}, the model draws "
                             f"{(net.in_channels, *net.size)}")
    encoder.check_fits(held_x.shape, modality)
    if net.sampling_refusal:
        raise ValueError(f"{net.type_name} cannot sample slices from noise: {net.sampling_refusal}")
    started = time.perf_counter()
    samples = net.sample(n, torch.Generator().manual_seed(seed), steps, device, batch, progress).numpy()
    sample_seconds = time.perf_counter() - started
    pick = spread_pick(len(train_x), n)
    ref_x = np.asarray(train_x[pick], np.float32)
    feats = {key: encoder_features(encoder.net, x) for key, x in
             (("held_out", held_x), ("samples", samples), ("training", ref_x),
              ("blurred_training", blurred(ref_x, train_m[pick], blur_sigma)))}
    fd = {key: frechet_distance(feats[key], feats["held_out"]) for key in ("samples", "training", "blurred_training")}
    result = {
        "fd": fd, "fd_samples_over_training": fd["samples"] / fd["training"] if fd["training"] > 0 else None,
        "n_samples": int(n), "n_training_reference": int(len(pick)), "n_held_out": int(len(held_x)),
        "steps": int(steps), "seed": int(seed), "blur_sigma_px": float(blur_sigma),
        "encoder": encoder.name, "encoder_modality": encoder.modality, "feature_dims": int(feats["held_out"].shape[1]),
        "model_type": net.type_name, "noise": getattr(net, "noise_kind", "gaussian"),
        "sampling_seconds": round(sample_seconds, 1), "seconds": round(time.perf_counter() - started, 1),
        **(about or {}),
    }
    if out_dir is not None:
        write_realism(out_dir, result, samples, held_x)
    return result


def write_realism(out_dir, result: dict, samples: Optional[np.ndarray] = None,
                  real: Optional[np.ndarray] = None) -> Path:
    """realism.json (the result, or why the check was skipped) and, given the arrays, samples.png."""
    from ..core.files import write_atomic
    from ..learn.report import json_safe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REALISM_JSON
    write_atomic(path, json.dumps(json_safe(result), indent=1) + "\n")
    if samples is not None and real is not None:
        plot_samples(out_dir / SAMPLES_PNG, samples, real, result)
    return path


def plot_samples(path, samples: np.ndarray, real: np.ndarray, result: dict, columns: int = 8) -> Path:
    """Up to four rows of samples above one row of held-out real slices (centre channel), on one grey scale set by
    the real slices' brain intensities."""
    from matplotlib.figure import Figure

    from ..learn.report import _save_figure

    path = Path(path)
    centre = samples.shape[1] // 2
    shown = samples[:4 * columns, centre]
    rows = math.ceil(len(shown) / columns)
    reals = real[spread_pick(len(real), columns), centre]
    inside = reals[reals != 0]
    lo, hi = np.percentile(inside, [0.5, 99.5]) if inside.size else (-1.0, 1.0)
    fig = Figure(figsize=(1.2 * columns, 1.4 * (rows + 1) + 0.6))
    axes = fig.subplots(rows + 1, columns, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, img in enumerate(shown):
        axes[i // columns, i % columns].imshow(img, cmap="gray", vmin=lo, vmax=hi)
    for j, img in enumerate(reals):
        axes[rows, j].imshow(img, cmap="gray", vmin=lo, vmax=hi)
    axes[rows, 0].set_title("held-out real slices", fontsize=8, loc="left")
    fd = result["fd"]
    fig.suptitle(f"{result['model_type']} samples ({result['n_samples']}, {result['steps']} DDIM steps); FD to "
                 f"held-out real in {result['encoder']} features: samples {fd['samples']:.3g}, training slices "
                 f"{fd['training']:.3g}, blurred training {fd['blurred_training']:.3g}", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1.0 - 0.6 / fig.get_figheight(), wspace=0.03,
                        hspace=0.15)
    _save_figure(fig, path)
    return path
