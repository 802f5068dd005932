"""Training report: loss curves, example reconstructions and the history as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..core.files import write_atomic

CURVES = "loss_curves.png"
RECONSTRUCTIONS = "reconstructions.png"
HISTORY = "training.json"


def json_safe(value):
    """Floats that are not finite become None (JSON has no NaN); numpy scalars become python ones."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_history_json(folder, result: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / HISTORY
    write_atomic(path, json.dumps(json_safe(result), indent=1) + "\n")
    return path


def _epochs(history) -> List[dict]:
    return list(history.get("history", [])) if isinstance(history, dict) else list(history)


def png_bytes(fig, dpi: int = 100) -> bytes:
    """The figure as a 256-colour palette PNG: these figures hold grey slices, one colour map and line plots, so
    the palette looks the same as full RGBA at about half the bytes (reports travel inside shipped models)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    FigureCanvasAgg(fig)
    full = io.BytesIO()
    fig.savefig(full, dpi=dpi, format="png")
    return palette_png(Image.open(full))


def palette_png(image) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out, format="PNG", optimize=True)
    return out.getvalue()


def _save_figure(fig, path: Path) -> None:
    write_atomic(path, png_bytes(fig))


def _scale(ax, values: Sequence[float]) -> None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
    elif finite:
        ax.set_yscale("symlog", linthresh=max(1e-3, 0.01 * max(abs(v) for v in finite)))


def _series(epochs: List[dict], part: str, key: str) -> List[float]:
    out = []
    for e in epochs:
        d = e.get(part) or {}
        v = d.get(key)
        out.append(float("nan") if v is None else float(v))
    return out


def plot_loss_curves(path, history, title: str = "") -> Path:
    from matplotlib.figure import Figure

    path = Path(path)
    epochs = _epochs(history)
    x = [e["epoch"] for e in epochs]
    others = sorted({k for e in epochs for k in (e.get("train") or {}) if k != "loss"})
    fig = Figure(figsize=(11 if others else 6, 4))
    axes = fig.subplots(1, 2 if others else 1, squeeze=False)[0]
    ax = axes[0]
    train, val = _series(epochs, "train", "loss"), _series(epochs, "val", "loss")
    ax.plot(x, train, "o-", label="train", ms=3)
    if any(math.isfinite(v) for v in val):
        ax.plot(x, val, "s-", label="validation", ms=3)
    best = history.get("best_epoch") if isinstance(history, dict) else None
    if best:
        ax.axvline(best, color="grey", ls=":", label=f"best (epoch {best})")
    _scale(ax, train + val)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.legend(fontsize=8)
    if others:
        ax2 = axes[1]
        values = []
        for i, key in enumerate(others):
            colour = f"C{i % 10}"
            t = _series(epochs, "train", key)
            v = _series(epochs, "val", key)
            values += t + v
            ax2.plot(x, t, "-", color=colour, label=f"{key} train")
            if any(math.isfinite(u) for u in v):
                ax2.plot(x, v, "--", color=colour, label=f"{key} val")
        _scale(ax2, values)
        ax2.set_xlabel("epoch")
        ax2.set_title("loss terms")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def _example_arrays(examples: dict):
    """(input centre channel (K, H, W), reconstruction (K, H, W), mask (K, H, W) or None)."""
    x = np.asarray(examples.get("input", examples.get("x")), np.float32)
    mask = examples.get("mask")
    if "reconstruction" in examples:
        recon = np.asarray(examples["reconstruction"], np.float32)
    else:
        import torch

        net = examples["net"]
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                recon = net.reconstruct(torch.from_numpy(np.ascontiguousarray(x)).to(device)).float().cpu().numpy()
        finally:
            net.train(was_training)
    if x.ndim == 3:
        x = x[:, None]
    if recon.ndim == 3:
        recon = recon[:, None]
    centre = x.shape[1] // 2
    xc = x[:, centre]
    rc = recon[:, centre] if recon.shape[1] == x.shape[1] else recon[:, 0]
    m = None if mask is None else np.asarray(mask, bool).reshape(xc.shape)
    return xc, rc, m


def plot_reconstructions(path, examples: dict) -> Path:
    from matplotlib.figure import Figure

    path = Path(path)
    x, r, m = _example_arrays(examples)
    k = x.shape[0]
    residual = np.abs(x - r)
    if m is not None:
        residual = np.where(m, residual, 0.0)
    fig = Figure(figsize=(7.5, 2.4 * k + 0.4))
    axes = fig.subplots(k, 3, squeeze=False)
    rmax = float(np.percentile(residual, 99.5)) if residual.size else 1.0
    for i in range(k):
        inside = x[i][m[i]] if m is not None and m[i].any() else x[i].ravel()
        lo, hi = np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0)
        for j, (img, cmap, vmin, vmax) in enumerate(((x[i], "gray", lo, hi), (r[i], "gray", lo, hi),
                                                     (residual[i], "inferno", 0.0, max(rmax, 1e-6)))):
            ax = axes[i, j]
            ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, origin="upper")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(("input", "reconstruction", "|residual|")[j], fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1.0 - 0.3 / fig.get_figheight(), wspace=0.03,
                        hspace=0.03)  # tight_layout costs as much as the drawing
    _save_figure(fig, path)
    return path


def write_training_report(folder, history, examples: Optional[dict] = None) -> Dict[str, Path]:
    """Write `training.json` (the fit_net result, or a list of epoch records), `loss_curves.png` (train and
    validation loss per epoch, log scale, plus the other loss terms) and, with `examples`, `reconstructions.png`
    (input, reconstruction, |residual| inside the mask). `examples` is {"net": net, "x": (K, C, H, W),
    "mask": (K, 1, H, W)} (the net reconstructs) or {"input": ..., "reconstruction": ..., "mask": ...}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result = history if isinstance(history, dict) else {"history": list(history)}
    out = {"history": write_history_json(folder, result)}
    if _epochs(result):
        reason = result.get("stop_reason")
        out["curves"] = plot_loss_curves(folder / CURVES, result, f"loss (stopped: {reason})" if reason else "")
    if examples is not None and len(examples.get("input", examples.get("x", []))):
        out["reconstructions"] = plot_reconstructions(folder / RECONSTRUCTIONS, examples)
    return out
