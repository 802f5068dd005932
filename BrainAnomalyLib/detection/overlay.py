"""PNG montage of axial slices: the scan in grey, the heatmap above threshold in 'hot', lesion outlines in cyan.

Drawn with numpy and Pillow rather than matplotlib: at the end of `detect` the montage is the last thing the user
waits for; without matplotlib's import and figure layout that wait fell from 1.86 to 1.39 s on 2 cores
(docs/benchmark/detect-timing-history.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..core.box import mask_box

COLS = 6
TILE_WIDTH = 198  # pixels: the width a tile had in the matplotlib montage (2.2 in at 90 dpi)
CAPTION = 16  # pixels above each tile for its slice number
TITLE = 26  # pixels above the tiles for the title
HEAT_ALPHA = 0.75
PRED_RGB = (0, 255, 255)  # cyan
TRUTH_RGB = (0, 255, 0)  # lime


def _ras_array(image: sitk.Image) -> np.ndarray:
    # Display in the radiological convention used by viewers: axial slices, anterior up.
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def hot(x: np.ndarray) -> np.ndarray:
    """matplotlib's 'hot' colour map (black, red, yellow, white) of values in [0, 1], as RGB in [0, 1]."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    return np.clip(np.concatenate([x / 0.365, (x - 0.365) / 0.381, (x - 0.746) / 0.254], axis=-1), 0.0, 1.0)


def _resized(plane: np.ndarray, size: Tuple[int, int], nearest: bool) -> np.ndarray:
    from PIL import Image

    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize(size, mode))


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _tile(img, heat, pred, true, lo, hi, threshold, vmax, size) -> np.ndarray:
    """One axial slice as RGB uint8 at `size` (width, height)."""
    grey = np.clip((_resized(img, size, False) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    h = _resized(heat, size, False)
    above = h > threshold
    if above.any():
        colour = hot((h[above] - threshold) / max(vmax - threshold, 1e-6))
        rgb[above] = (1 - HEAT_ALPHA) * rgb[above] + HEAT_ALPHA * colour
    rgb = (rgb * 255).round().astype(np.uint8)
    for mask, colour in ((pred, PRED_RGB), (true, TRUTH_RGB)):
        if mask.any():
            rgb[_outline(_resized(mask, size, True) > 0.5)] = colour
    return rgb


def _slices(brain: np.ndarray, focus: np.ndarray, n_slices: int) -> List[int]:
    """`n_slices` evenly through the brain, the ones through the largest lesions swapped in."""
    zs = np.where(brain.any(axis=(1, 2)))[0]
    if zs.size == 0:
        zs = np.arange(brain.shape[0])
    slices = list(np.linspace(zs[0], zs[-1], n_slices + 2)[1:-1].round().astype(int))
    if focus.any():
        per_slice = focus.sum(axis=(1, 2))
        for z in np.argsort(per_slice)[::-1][:4]:
            if per_slice[z] > 0 and z not in slices:
                slices[int(np.argmin([abs(s - z) for s in slices]))] = int(z)
    return sorted(set(int(s) for s in slices))


def overlay_montage(scan: sitk.Image, anomaly_map: sitk.Image, pred_mask: sitk.Image, threshold: float,
                    path: Path, brain_mask: Optional[sitk.Image] = None, n_slices: int = 12,
                    title: str = "", truth: Optional[sitk.Image] = None) -> Path:
    """Axial montage; `truth`, when given, is outlined in green and its slices are shown first."""
    from PIL import Image, ImageDraw, ImageFont

    img, heat, pred = _ras_array(scan), _ras_array(anomaly_map), _ras_array(pred_mask) > 0
    true = _ras_array(truth) > 0 if truth is not None else np.zeros_like(pred)
    brain = _ras_array(brain_mask) > 0 if brain_mask is not None else img > img.min()
    if brain.any():  # crop to the brain, with a small margin, so each tile shows it large
        crop = mask_box(brain, 4)
        img, heat, pred, brain, true = img[crop], heat[crop], pred[crop], brain[crop], true[crop]
    slices = _slices(brain, true if true.any() else pred, n_slices)
    inside = img[brain] if brain.any() else img.ravel()
    lo, hi = (float(v) for v in np.percentile(inside, [1, 99.5]))
    vmax = float(max(heat.max(), threshold * 1.5, 1e-6))
    # Pixels drawn as the scan's in-plane spacing says (an anisotropic slice is not squashed).
    sp = scan.GetSpacing()
    height, width = img.shape[1] * sp[1], img.shape[2] * sp[0]
    size = (TILE_WIDTH, max(1, int(round(TILE_WIDTH * height / max(width, 1e-6)))))
    rows = int(np.ceil(len(slices) / COLS))
    canvas = Image.new("RGB", (COLS * TILE_WIDTH, TITLE + rows * (CAPTION + size[1])), "black")
    draw = ImageDraw.Draw(canvas)
    small, large = ImageFont.load_default(size=11), ImageFont.load_default(size=13)
    for k, z in enumerate(slices):
        x, y = (k % COLS) * TILE_WIDTH, TITLE + (k // COLS) * (CAPTION + size[1])
        canvas.paste(Image.fromarray(_tile(img[z], heat[z], pred[z], true[z], lo, hi, threshold, vmax, size)),
                     (x, y + CAPTION))
        draw.text((x + TILE_WIDTH // 2, y + CAPTION // 2), f"axial {z}", fill="white", font=small, anchor="mm")
    if title:
        draw.text((canvas.width // 2, TITLE // 2), title, fill="white", font=large, anchor="mm")
    canvas.save(path, format="PNG", compress_level=3)
    return Path(path)
