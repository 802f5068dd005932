"""The MNI152 2009a template (shipped inside nilearn) and the model grid that every scorer works on."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

TEMPLATE_NAME = "MNI152NLin2009aSym (nilearn mni_icbm152_*_tal_nlin_sym_09a_converted)"
_FILES = {"T1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
          "GM": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
          "WM": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}


# One lock for every builder below: `warm_grid` builds them on a thread while the scan is read, and a caller that
# arrives meanwhile waits for that build instead of making the same arrays a second time.
_BUILDING = threading.RLock()


def _built_once(fn):
    """`fn` cached (lru_cache) and built under _BUILDING; a call spelt with or without its defaults (f(grid) and
    f(grid, "T1")) is one entry of the cache, not two builds."""
    cached = lru_cache(maxsize=4)(fn)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with _BUILDING:
            return cached(*bound.args)

    call.cache_clear = cached.cache_clear
    return call


@dataclass(frozen=True)
class Grid:
    """A voxel grid in template (LPS physical) space. Axial slices of 96x112 at 2 mm cover the whole brain."""

    size: Tuple[int, int, int] = (96, 112, 80)
    spacing: Tuple[float, float, float] = (2.0, 2.0, 2.0)
    # Centre of the MNI brain bounding box (LPS mm); the direction makes the voxel axes point R, A, S like MNI files.
    centre: Tuple[float, float, float] = (0.0, 17.0, 5.0)
    direction: Tuple[float, ...] = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)

    def reference(self) -> sitk.Image:
        import SimpleITK as sitk

        ref = sitk.Image([int(s) for s in self.size], sitk.sitkFloat32)
        ref.SetSpacing([float(s) for s in self.spacing])
        ref.SetDirection([float(d) for d in self.direction])
        d = np.array(self.direction).reshape(3, 3)
        half = (np.array(self.size) - 1) / 2.0 * np.array(self.spacing)
        ref.SetOrigin([float(v) for v in np.array(self.centre) - d @ half])
        return ref

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(**{k: tuple(v) for k, v in d.items()})


def _template_file(which: str) -> Path:
    # Found without importing nilearn.datasets, which pulls in scikit-learn, pandas and scipy.stats (seconds of
    # start-up for three file names).
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed; install nilearn>=0.10 (it carries the MNI template)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / _FILES[which]
    if not path.is_file():
        raise FileNotFoundError(f"nilearn does not carry {_FILES[which]}; install nilearn>=0.10")
    return path


def _read_1mm(which: str) -> sitk.Image:
    import SimpleITK as sitk

    image = sitk.Cast(sitk.ReadImage(str(_template_file(which))), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(arr / max(float(arr.max()), 1e-6))
    out.CopyInformation(image)
    return out


@_built_once
def template_1mm(which: str = "T1") -> sitk.Image:
    """The 1 mm template (T1 brain, or the GM/WM probability maps) as float32 scaled to 0..1."""
    return _read_1mm(which)


def _on_grid(image: sitk.Image, grid: Grid, interpolator=None) -> sitk.Image:
    import SimpleITK as sitk

    return sitk.Resample(image, grid.reference(), sitk.Transform(),
                         sitk.sitkLinear if interpolator is None else interpolator, 0.0, sitk.sitkFloat32)


@_built_once
def template_on_grid(grid: Grid = Grid(), which: str = "T1") -> sitk.Image:
    # From a 1 mm copy of its own, not template_1mm's kept one: a detection needs only the grid, and the three
    # 1 mm volumes (105 MB), built while the scan is read (warm_grid), would still be held at deepbet's peak.
    return _on_grid(_read_1mm(which), grid)


@_built_once
def brain_mask_on_grid(grid: Grid = Grid()) -> np.ndarray:
    """Template brain mask on the grid (bool, z,y,x), the region where every scorer is allowed to score."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(template_on_grid(grid, "T1"))
    mask = arr > 0.1
    from scipy import ndimage

    mask = ndimage.binary_fill_holes(mask)
    return mask


def midline_axis(grid: Grid) -> int:
    """The array axis (z,y,x order) whose reversal mirrors a grid volume across the template's midsagittal plane.
    The template is the symmetric MNI152 2009a, so this holds only for a grid centred on x = 0 with its axes along
    the template's; ValueError otherwise."""
    d = np.array(grid.direction, dtype=float).reshape(3, 3)
    if not np.allclose(np.abs(d), np.eye(3)) or abs(float(grid.centre[0])) > 1e-6:
        raise ValueError("the model grid is not symmetric about the template's midline (centre x = 0, axes along "
                         "the template's), so its maps cannot be compared with their mirror image")
    return 2


def contralateral_difference(volume: np.ndarray, weight: float, grid: Grid) -> np.ndarray:
    """`volume` minus `weight` times its mirror image across the template's midline (see midline_axis).

    On an anomaly map a voxel then scores how much more anomalous it is than the same place in the other
    hemisphere: much of what a model scores badly on healthy anatomy it scores badly on both sides, while most
    lesions are one-sided. Measured on brats18_dev T1 (grid AUPRC, pooled; weights 0.5 / 0.75 / 1.0): dpa 0.425 ->
    0.485 / 0.489 / 0.481, cae 0.349 -> 0.419 / 0.424 / 0.409. What it costs: a lesion with a mirror twin
    (bilateral and symmetric) keeps only (1 - weight) of its score, which is why the weight stays below 1."""
    if weight == 0:
        return volume
    return volume - np.float32(weight) * np.flip(volume, axis=midline_axis(grid))


def spacing_zyx(grid: Grid) -> Sequence[float]:
    return tuple(reversed(grid.spacing))


@_built_once
def tissue_on_grid(grid: Grid = Grid()) -> dict:
    """Template white- and grey-matter probability maps on the grid (z,y,x float32, 0..1)."""
    import SimpleITK as sitk

    return {name: sitk.GetArrayFromImage(template_on_grid(grid, name)) for name in ("WM", "GM")}


# The core of the lateral ventricles: almost no parenchyma in the template and far from the brain's surface, so
# that after an affine registration most of it is still CSF on the scan (ventricle sizes differ between people).
VENTRICLE_CORE_MAX_PARENCHYMA = 0.15
VENTRICLE_CORE_MIN_DEPTH_MM = 20.0


@_built_once
def ventricles_on_grid(grid: Grid = Grid()) -> np.ndarray:
    """Template ventricle core on the grid (bool, z,y,x), the CSF region that survives skull-stripping and partial
    volume on every scan."""
    from scipy import ndimage

    brain = brain_mask_on_grid(grid)
    tissue = tissue_on_grid(grid)
    depth = ndimage.distance_transform_edt(brain, sampling=spacing_zyx(grid))
    return brain & (tissue["WM"] + tissue["GM"] < VENTRICLE_CORE_MAX_PARENCHYMA) & (
        depth > VENTRICLE_CORE_MIN_DEPTH_MM)


def warm_grid(grid: Grid = Grid()) -> None:
    """Build what the preprocessing of a scan onto `grid` reads of the template (the registration's fixed image and
    mask, the sanity check's and contrast estimate's tissue maps): about 0.4 s on a first scan of the 2-core
    machine, spent on a thread (core.background) while the scan is read and its brain found, not inside the
    registration. The same arrays as when built on first use."""
    template_on_grid(grid)
    brain_mask_on_grid(grid)
    tissue_on_grid(grid)
    ventricles_on_grid(grid)
