"""Post-processing of anomaly maps: template-space cleaning, thresholding and lesion components on the input grid."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..calibration.findings import FindingRule
from ..core.background import Background
from ..core.box import mask_box
from ..core.template import Grid, contralateral_difference, spacing_zyx, tissue_on_grid

if TYPE_CHECKING:
    import SimpleITK as sitk


@dataclass
class PostprocessConfig:
    # Registration-edge false positives sit at the cortex and ventricles; FINDINGS: erosion by 3 voxels and a
    # 5x5 median helped every scorer.
    erode_voxels: int = 3
    median_size: int = 5
    min_lesion_ml: float = 0.05
    # Weight of the map's mirror image (across the template midline) subtracted from it before filtering; 0 = off.
    # Healthy anatomy the model scores badly on one side it mostly scores badly on the other too, while most lesions
    # are one-sided; see core.template.contralateral_difference.
    contralateral: float = 0.0
    # Template white-matter probability above which the map is also kept unfiltered (small_lesions); 0 = off.
    small_lesion_wm: float = 0.0
    # What a voxel of that zone must clear to keep its unfiltered score: this many of its neighbourhood's typical
    # deviations (small_lesion_margin); 0 = none, the plain maximum.
    small_lesion_spread: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# small_lesions keeps the unfiltered map only this far inside the scan's brain mask: at the brain's edge the 2 mm
# grid mixes cortex, CSF and what the skull-strip left, and single voxels there are bright for no lesion's sake.
SMALL_LESION_DEPTH_MM = 4.0


def small_lesion_zone(mask: np.ndarray, config: PostprocessConfig, grid: Grid) -> np.ndarray:
    """Where small_lesions keeps the unfiltered map: the template's white matter (probability above
    `config.small_lesion_wm`) more than SMALL_LESION_DEPTH_MM inside `mask`; empty when the option is off."""
    if config.small_lesion_wm <= 0:
        return np.zeros(mask.shape, bool)
    wm = tissue_on_grid(grid)["WM"]
    if wm.shape != mask.shape:
        raise ValueError(f"the tissue maps are on a {wm.shape} grid but the scan is {mask.shape}")
    depth = ndimage.distance_transform_edt(mask, sampling=spacing_zyx(grid))
    return mask & (depth > SMALL_LESION_DEPTH_MM) & (wm > config.small_lesion_wm)


def small_lesions(filtered: np.ndarray, unfiltered: np.ndarray, zone: np.ndarray,
                  margin: Optional[np.ndarray] = None) -> np.ndarray:
    """The filtered map, raised to the unfiltered one (less `margin`, small_lesion_margin) inside `zone`
    (small_lesion_zone). The in-plane median erases any lesion that covers fewer than 13 of the 25 voxels of its
    10 x 10 mm window on the 2 mm grid, such as MS lesions of 2-8 mm; inside white matter, whose signal is uniform, a
    single voxel's excess still means something (scripts/robustness_flair.py, synthetic MS-like lesions on FLAIR:
    tissue-flair AUPRC 0.000 -> 0.038 on the dev scans at 1 mm, 0.028 less the margin; README "Small lesions")."""
    if not zone.any():
        return filtered
    raised = unfiltered if margin is None else unfiltered - margin
    return np.where(zone, np.maximum(filtered, raised), filtered).astype(filtered.dtype, copy=False)


def slab_dilution(acquisition_mm: Optional[Sequence[float]], spacing: Sequence[float]) -> float:
    """The share of a grid-sized lesion's contrast an input keeps through its coarsest voxel: the grid's spacing
    over the input voxel's extent along the axis where that ratio is smallest; 1 for inputs no coarser than the
    grid (and where the extent is unknown)."""
    if acquisition_mm is None:
        return 1.0
    return min(float(s) / max(float(a), float(s)) for a, s in zip(acquisition_mm, spacing))


def small_lesion_weight(config: PostprocessConfig, acquisition_mm: Optional[Sequence[float]], grid: Grid) -> float:
    """The spreads small_lesion_margin takes off for this input: `config.small_lesion_spread` times slab_dilution."""
    return config.small_lesion_spread * slab_dilution(acquisition_mm, spacing_zyx(grid))


def small_lesion_margin(filtered: np.ndarray, unfiltered: np.ndarray, config: PostprocessConfig,
                        acquisition_mm: Optional[Sequence[float]], grid: Grid) -> Optional[np.ndarray]:
    """What small_lesions takes off the unfiltered map: `config.small_lesion_spread` times the median, over the
    median filter's window, of the unfiltered map's distance from the filtered one, scaled by slab_dilution. A lone
    lesion in quiet white matter stands out of a small spread, while bands of bright tissue and textured regions
    spread wide and keep little: on brats18_dev FLAIR those outranked the gliomas' faintest voxels (AUPRC 0.882
    without the channel, 0.873 with the plain maximum, 0.881 with a margin of 1.5 spreads). A thick slice averages a
    small lesion with what surrounds it, so its excess shrinks by the dilution and the margin with it: without that
    scaling, the synthetic MS-like lesions on 8 mm slices fell under the plain intensity ranking (README, "Small
    lesions"). None when the option is off."""
    if config.small_lesion_spread <= 0:
        return None
    spread = filter_map(np.abs(unfiltered - filtered), config)
    return (small_lesion_weight(config, acquisition_mm, grid) * spread).astype(filtered.dtype, copy=False)


def clean_in_template(anomaly_map: np.ndarray, mask: np.ndarray, config: PostprocessConfig, grid: Grid,
                      acquisition_mm: Optional[Sequence[float]] = None) -> np.ndarray:
    """A raw grid map cleaned in template space, not yet clipped: its mirror image subtracted
    (`config.contralateral`), the in-plane median filter, and the unfiltered map kept in deep white matter where
    `config.small_lesion_wm` asks for it (small_lesions), less the margin for the input's `acquisition_mm`
    (small_lesion_margin)."""
    contrasted = contralateral_difference(anomaly_map, config.contralateral, grid)
    filtered = filter_map(contrasted, config)
    zone = small_lesion_zone(mask, config, grid)
    if not zone.any():
        return filtered
    return small_lesions(filtered, contrasted, zone,
                         small_lesion_margin(filtered, contrasted, config, acquisition_mm, grid))


def filter_map(anomaly_map: np.ndarray, config: PostprocessConfig) -> np.ndarray:
    """In-plane median filter of each axial slice (the first cleaning step)."""
    if config.median_size <= 1:
        return anomaly_map
    size = (1, config.median_size, config.median_size)
    half = anomaly_map.shape[0] // 2
    if anomaly_map.ndim != 3 or half == 0:
        return ndimage.median_filter(anomaly_map, size=size)
    # The slices are filtered apart, so the two halves of the stack on two threads give the same map (scipy releases
    # the GIL): the default's 0.12 s on the 2 cores, about halved.
    out = np.empty_like(anomaly_map)

    def upper() -> None:
        out[half:] = ndimage.median_filter(anomaly_map[half:], size=size)

    beside = Background(upper, name="median")
    try:
        out[:half] = ndimage.median_filter(anomaly_map[:half], size=size)
    finally:
        beside.wait()
    beside.result()
    return out


def slab_voxels(acquisition_mm: Optional[Sequence[float]], spacing_zyx: Sequence[float]) -> Tuple[int, int, int]:
    """Grid voxels to erode the brain mask by along each axis (z, y, x) for an input whose voxels reach
    `acquisition_mm` along the grid axes: the whole grid voxels that fit in the input voxel's extent beyond the
    grid's spacing. A thick slice averages the brain's top and bottom with what lies beyond over its slab, so the
    mask's edge across slices is that uncertain; on 8 mm FLAIR slices those edge voxels outranked synthetic
    hyperintense blobs (scripts/robustness_flair.py: tissue-flair AUPRC 0.699 -> 0.714). Inputs no coarser than
    the grid (1-2 mm scans on the 2 mm grid, obliques included) get none, so their results are unchanged."""
    if acquisition_mm is None:
        return (0, 0, 0)
    return tuple(int(max(0.0, float(a) - float(s)) // float(s)) for a, s in zip(acquisition_mm, spacing_zyx))


def _line(axis: int) -> np.ndarray:
    structure = np.zeros((3, 3, 3), bool)
    index = [1, 1, 1]
    for i in range(3):
        index[axis] = i
        structure[tuple(index)] = True
    return structure


def erode_mask(mask: np.ndarray, config: PostprocessConfig, slab: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """The mask the scores are kept in: eroded by the configured voxels (6-neighbour cross), then along each axis
    by `slab` voxels more (slab_voxels)."""
    if config.erode_voxels > 0:
        mask = ndimage.binary_erosion(mask, iterations=int(config.erode_voxels))
    for axis, k in enumerate(slab):
        if k > 0:
            mask = ndimage.binary_erosion(mask, structure=_line(axis), iterations=int(k))
    return mask


def clip_to_mask(filtered: np.ndarray, eroded: np.ndarray) -> np.ndarray:
    return np.where(eroded, np.maximum(filtered, 0.0), 0.0).astype(np.float32)


def robust_stats(values: np.ndarray) -> dict:
    """Median and scaled MAD (a standard deviation for normal data) of a scan's filtered scores in the brain."""
    if values.size == 0:
        return {"median": 0.0, "mad": 0.0}
    med = float(np.median(values))
    return {"median": med, "mad": float(1.4826 * np.median(np.abs(values - med)))}


def scan_score(anomaly_map: np.ndarray, mask: np.ndarray, top_fraction: float = 0.01) -> float:
    """Volume-level score: mean of the top 1 % of in-brain voxel scores."""
    values = anomaly_map[mask]
    if values.size == 0:
        return 0.0
    k = max(1, int(round(values.size * top_fraction)))
    return float(np.partition(values, values.size - k)[-k:].mean())


def ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """The 4x4 voxel index (i, j, k) -> RAS matrix of an image whose geometry SimpleITK holds in LPS."""
    to_ras = np.diag([-1.0, -1.0, 1.0])
    out = np.eye(4)
    out[:3, :3] = to_ras @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    out[:3, 3] = to_ras @ np.array(image.GetOrigin())
    return out


# Findings touch however they touch: a diagonal neighbour joins a component (26-connectivity).
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


def components(binary: np.ndarray, voxel_ml: float, min_lesion_ml: float):
    """The findings the lesion table lists: 26-connected components of the flagged voxels, labelled inside their
    bounding box only (labelling time follows the box, and flagged voxels sit inside the brain; raster order is
    kept, so the numbering is the whole volume's). Returns (labels in the box, the box, voxels per label with
    label 0 first, which labels are at least `min_lesion_ml` big)."""
    box = mask_box(binary)
    labels, n = ndimage.label(binary[box], structure=CONNECTIVITY)
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = counts * voxel_ml >= min_lesion_ml
    keep[0] = False
    return labels, box, counts, keep


def findings(binary: np.ndarray, voxel_ml: float, min_lesion_ml: float) -> np.ndarray:
    """`components` as a whole-volume array: each kept finding's number, 0 elsewhere (evaluation matches these
    against the ground truth)."""
    labels, box, _, keep = components(binary, voxel_ml, min_lesion_ml)
    out = np.zeros(binary.shape, labels.dtype)
    out[box] = np.where(keep[labels], labels, 0)
    return out


def label_lesions(anomaly_map: sitk.Image, threshold: float, min_lesion_ml: float, numbered: bool = False,
                  rule: Optional[FindingRule] = None) -> Tuple[sitk.Image, List[dict]]:
    """Threshold a map on its own grid into a label map (1 = anomaly; with `numbered`, each lesion's number in
    the table) and a lesion table (see label_array)."""
    import SimpleITK as sitk  # only here and in number_findings: the arrays' part runs on a host without it

    mask, lesions = label_array(sitk.GetArrayViewFromImage(anomaly_map), ijk_to_ras(anomaly_map), threshold,
                                min_lesion_ml, numbered, rule)
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(anomaly_map)
    return out, lesions


def label_array(arr: np.ndarray, index_to_ras: np.ndarray, threshold: float, min_lesion_ml: float,
                numbered: bool = False, rule: Optional[FindingRule] = None) -> Tuple[np.ndarray, List[dict]]:
    """label_lesions on a (k, j, i) array with its 4x4 index -> RAS matrix, for callers that hold the voxels in
    memory already (the Slicer module's threshold slider). Returns the label array and the lesion table.

    Without a `rule` every component is a finding, highest peak first. With one (the lesion-level operating
    point, `threshold` being the scan's base threshold), each finding gets its score and healthy rate, only those
    the rule reports are kept (in the table and the label map), and the rarest in healthy scans come first."""
    voxel_ml = float(np.prod(np.linalg.norm(index_to_ras[:3, :3], axis=0))) / 1000.0
    labels, box, counts, keep = components(arr > threshold, voxel_ml, min_lesion_ml)
    n = counts.size - 1
    lesions = []
    if n:
        # Statistics over the flagged voxels only (ndimage's per-label functions sort the whole volume, seconds on a
        # BraTS-sized map; a threshold slider needs this fast), and only for components big enough to keep.
        flat = np.flatnonzero(labels)
        lab = labels.ravel()[flat]
        chosen = keep[lab]
        flat, lab = flat[chosen], lab[chosen]
        coords = [c + b.start for c, b in zip(np.unravel_index(flat, labels.shape), box)]
        values = np.asarray(arr[tuple(coords)], np.float64)
        means = np.bincount(lab, weights=values, minlength=n + 1) / np.maximum(counts, 1)
        maxes = np.full(n + 1, -np.inf)
        np.maximum.at(maxes, lab, values)
        centroids = np.stack([np.bincount(lab, weights=c.astype(np.float64), minlength=n + 1)
                              for c in coords], axis=1) / np.maximum(counts, 1)[:, None]
        scores = rates = None
        if rule is not None:
            scores = rule.scores(values, lab, n, voxel_ml, threshold)
            rates = rule.rates(scores)
            keep &= rule.reported(rates)
        for i in np.flatnonzero(keep):
            ijk = [float(centroids[i, 2]), float(centroids[i, 1]), float(centroids[i, 0])]
            ras = index_to_ras @ np.array(ijk + [1.0])
            lesions.append({"component": int(i), "voxels": int(counts[i]),
                            "volume_ml": round(float(counts[i]) * voxel_ml, 4),
                            "centroid_ras": [round(float(v), 2) for v in ras[:3]],
                            "centroid_ijk": [round(v, 2) for v in ijk],
                            "mean_score": round(float(means[i]), 4), "max_score": round(float(maxes[i]), 4),
                            "finding_score": None if scores is None else float(f"{scores[i]:.4g}"),
                            "healthy_rate": None if rates is None else float(f"{rates[i]:.3g}"),
                            "_rank": -maxes[i] if scores is None else -scores[i]})
    # Most confident finding first: the rarest in healthy scans where the finding calibration says, else the peak.
    lesions.sort(key=lambda d: (d.pop("_rank"), -d["voxels"]))
    number = np.zeros(n + 1, np.uint16)
    for k, les in enumerate(lesions, start=1):
        les["label"] = k
        number[les.pop("component")] = k
    dtype = np.uint8 if len(lesions) < 256 or not numbered else np.uint16
    mask = np.zeros(arr.shape, dtype)
    mask[box] = (number if numbered else keep)[labels]
    return mask, lesions


def number_findings(pred_mask: sitk.Image, lesions: List[dict]) -> sitk.Image:
    """A 1 = anomaly label map with each finding's number from the lesion table instead (its `label`), as
    `label_lesions(numbered=True)` makes it: the map's components (the table's findings, nothing else) matched to
    the table's rows by voxel count and centroid. A map and a table that do not match are refused."""
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(pred_mask) > 0
    labels, box, counts, _ = components(arr, 1.0, 0.0)
    n = counts.size - 1
    centroids = np.zeros((n + 1, 3))
    if n:
        flat = np.flatnonzero(labels)
        lab = labels.ravel()[flat]
        coords = [c + b.start for c, b in zip(np.unravel_index(flat, labels.shape), box)]
        centroids = np.stack([np.bincount(lab, weights=c.astype(np.float64), minlength=n + 1)
                              for c in coords[::-1]], axis=1) / np.maximum(counts, 1)[:, None]  # i, j, k
    number = np.zeros(n + 1, np.uint16)
    for les in lesions:
        # The table's centroids are rounded to 0.01 voxel.
        gap = np.linalg.norm(centroids - np.asarray(les["centroid_ijk"], np.float64), axis=1)
        gap[(counts != les["voxels"]) | (number > 0)] = np.inf
        gap[0] = np.inf
        best = int(np.argmin(gap))
        if not gap[best] < 0.05:
            raise ValueError(f"finding {les['label']} of the lesion table is not in the label map")
        number[best] = les["label"]
    if np.count_nonzero(number) != n:
        raise ValueError(f"the label map holds {n} findings, the lesion table {len(lesions)}")
    out = np.zeros(arr.shape, np.uint8 if len(lesions) < 256 else np.uint16)
    out[box] = number[labels]
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(pred_mask)
    return image


# The lesion table's one schema, for every front end (CSV header, result.json, Slicer's table node):
# (column name, key in a lesion from `label_lesions`, index into that key's 3-vector or None).
LESION_COLUMNS = (
    ("label", "label", None), ("voxels", "voxels", None), ("volume_ml", "volume_ml", None),
    ("centroid_r", "centroid_ras", 0), ("centroid_a", "centroid_ras", 1), ("centroid_s", "centroid_ras", 2),
    ("centroid_i", "centroid_ijk", 0), ("centroid_j", "centroid_ijk", 1), ("centroid_k", "centroid_ijk", 2),
    ("mean_score", "mean_score", None), ("max_score", "max_score", None),
    # Lesion-level operating point (calibration.findings); empty for a voxel threshold.
    ("finding_score", "finding_score", None), ("healthy_rate", "healthy_rate", None),
)
LESION_COLUMN_NAMES = tuple(name for name, _, _ in LESION_COLUMNS)
INTEGER_COLUMNS = ("label", "voxels")


def lesion_row(lesion: dict) -> list:
    """One lesion as a table row in LESION_COLUMNS order."""
    return [lesion[key] if index is None else lesion[key][index] for _, key, index in LESION_COLUMNS]
