"""PNG montage of axial slices: the scan in grey, the heatmap above threshold in 'hot', lesion outlines in cyan."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..core.box import mask_box


def _ras_array(image: sitk.Image) -> np.ndarray:
    # Display in the radiological convention used by viewers: axial slices, anterior up.
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def overlay_montage(scan: sitk.Image, anomaly_map: sitk.Image, pred_mask: sitk.Image, threshold: float,
                    path: Path, brain_mask: Optional[sitk.Image] = None, n_slices: int = 12,
                    title: str = "", truth: Optional[sitk.Image] = None) -> Path:
    """Axial montage; `truth`, when given, is outlined in green and its slices are shown first."""
    # A Figure of its own, without pyplot: no GUI backend or global figure list, so it may be drawn on any thread.
    from matplotlib.figure import Figure

    img, heat, pred = _ras_array(scan), _ras_array(anomaly_map), _ras_array(pred_mask) > 0
    true = _ras_array(truth) > 0 if truth is not None else np.zeros_like(pred)
    brain = _ras_array(brain_mask) > 0 if brain_mask is not None else img > img.min()
    if brain.any():  # crop to the brain, with a small margin, so each tile shows it large
        crop = mask_box(brain, 4)
        img, heat, pred, brain, true = img[crop], heat[crop], pred[crop], brain[crop], true[crop]
    zs = np.where(brain.any(axis=(1, 2)))[0]
    if zs.size == 0:
        zs = np.arange(img.shape[0])
    slices = list(np.linspace(zs[0], zs[-1], n_slices + 2)[1:-1].round().astype(int))
    # Make sure the slices through the largest lesions are shown.
    focus = true if true.any() else pred
    if focus.any():
        per_slice = focus.sum(axis=(1, 2))
        for z in np.argsort(per_slice)[::-1][:4]:
            if per_slice[z] > 0 and z not in slices:
                slices[int(np.argmin([abs(s - z) for s in slices]))] = int(z)
    slices = sorted(set(slices))
    inside = img[brain] if brain.any() else img.ravel()
    lo, hi = np.percentile(inside, [1, 99.5])
    vmax = float(max(heat.max(), threshold * 1.5, 1e-6))
    cols = 6
    rows = int(np.ceil(len(slices) / cols))
    sp = scan.GetSpacing()
    aspect = sp[1] / sp[0]
    fig = Figure(figsize=(cols * 2.2, rows * 2.4), facecolor="black")
    # No ticks: hidden with the axes anyway, but the title placement would lay them out on every tile.
    axes = fig.subplots(rows, cols, subplot_kw={"xticks": [], "yticks": []})
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, z in zip(np.atleast_1d(axes).ravel(), slices):
        ax.imshow(img[z], cmap="gray", vmin=lo, vmax=hi, origin="upper", aspect=aspect)
        h = np.ma.masked_where(heat[z] <= threshold, heat[z])
        ax.imshow(h, cmap="hot", vmin=threshold, vmax=vmax, alpha=0.75, origin="upper", aspect=aspect)
        if pred[z].any():
            ax.contour(pred[z], levels=[0.5], colors="cyan", linewidths=0.6)
        if true[z].any():
            ax.contour(true[z], levels=[0.5], colors="lime", linewidths=0.6)
        ax.set_title(f"axial {z}", color="white", fontsize=8)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, facecolor="black")
    return Path(path)


