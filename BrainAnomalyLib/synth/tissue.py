"""Where the tissues of a scan are: brain mask, WM/GM probabilities and CSF, on the scan's own grid.

Maps come from the bundled MNI template, warped onto the scan through the same affine registration that
detection uses, so synthetic lesions land in anatomically plausible places on any healthy scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..core.box import mask_box
from ..core.progress import Reporter
from ..core.template import Grid, template_1mm, template_on_grid

# Inside the brain, voxels with little GM and WM probability are CSF (ventricles, sulci).
CSF_MAX_PARENCHYMA = 0.3
# CSF this deep inside the brain is ventricular rather than sulcal.
VENTRICLE_MIN_DEPTH_MM = 15.0
VENTRICLE_MIN_SHARE = 0.2


@dataclass(frozen=True)
class Geometry:
    """A scan's voxel grid; converts numpy (z,y,x) indices to physical LPS mm."""

    size: Tuple[int, int, int]  # x, y, z as SimpleITK orders it
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(reversed(self.size))

    @property
    def spacing_zyx(self) -> Tuple[float, float, float]:
        return tuple(reversed(self.spacing))

    @property
    def matrix(self) -> np.ndarray:
        """3x3 map from a (x,y,z) index step to an LPS displacement in mm."""
        return np.array(self.direction).reshape(3, 3) * np.array(self.spacing)[None, :]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def points(self, zyx: np.ndarray) -> np.ndarray:
        """Physical LPS points (n,3) of (n,3) numpy indices in z,y,x order (fractional allowed)."""
        return np.asarray(zyx, np.float64)[:, ::-1] @ self.matrix.T + np.array(self.origin)

    def indices(self, lps: np.ndarray) -> np.ndarray:
        """Fractional numpy indices (n,3, z,y,x order) of physical LPS points (n,3)."""
        xyz = (np.asarray(lps, np.float64) - np.array(self.origin)) @ np.linalg.inv(self.matrix).T
        return xyz[:, ::-1]

    def box_points(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Physical points of every voxel in the index box [lo, hi) as an array (z,y,x,3)."""
        axes = [np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi)]
        zz, yy, xx = np.meshgrid(*axes, indexing="ij")
        m = self.matrix
        return (xx[..., None] * m[:, 0] + yy[..., None] * m[:, 1] + zz[..., None] * m[:, 2]
                + np.array(self.origin))

    def box_around(self, centre_zyx: np.ndarray, radius_mm: float) -> Tuple[np.ndarray, np.ndarray]:
        """Index box [lo, hi) holding the ball of `radius_mm` around a voxel, clipped to the grid.

        Direction cosines are orthonormal, so a ball of radius R spans R / spacing voxels along each index axis.
        """
        half = np.ceil(radius_mm / np.array(self.spacing_zyx)).astype(int) + 1
        c = np.round(np.asarray(centre_zyx)).astype(int)
        lo = np.maximum(c - half, 0)
        hi = np.minimum(c + half + 1, np.array(self.shape))
        return lo, hi


def lps_to_ras(p) -> list:
    return [round(float(-p[0]), 2), round(float(-p[1]), 2), round(float(p[2]), 2)]


def _fill_brain(t1: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(t1 > 0.1)


@dataclass
class TissueMaps:
    """Tissue maps on one scan's grid (numpy z,y,x) and the transform from template to scan points."""

    brain: np.ndarray  # bool
    wm: np.ndarray  # float32 probability 0..1
    gm: np.ndarray  # float32 probability 0..1
    csf: np.ndarray  # bool: inside the brain, little parenchyma
    geometry: Geometry
    # Maps template (MNI, LPS mm) points to scan points; identity for scans already in template space.
    template_to_scan: sitk.Transform = field(default_factory=lambda: sitk.AffineTransform(3))

    @classmethod
    def _build(cls, brain: np.ndarray, wm: np.ndarray, gm: np.ndarray, reference: sitk.Image,
               transform: Optional[sitk.Transform] = None) -> "TissueMaps":
        brain = np.asarray(brain, bool)
        wm = np.where(brain, np.clip(wm, 0, 1), 0).astype(np.float32)
        gm = np.where(brain, np.clip(gm, 0, 1), 0).astype(np.float32)
        csf = brain & (wm + gm < CSF_MAX_PARENCHYMA)
        return cls(brain, wm, gm, csf, Geometry.of(reference), transform or sitk.AffineTransform(3))

    @classmethod
    def from_template(cls, grid: Optional[Grid] = None) -> "TissueMaps":
        """Maps for a scan that IS the template: the 1 mm template itself, or the template on `grid`."""
        if grid is None:
            images = {w: template_1mm(w) for w in ("T1", "WM", "GM")}
        else:
            images = {w: template_on_grid(grid, w) for w in ("T1", "WM", "GM")}
        arr = {w: sitk.GetArrayFromImage(im) for w, im in images.items()}
        return cls._build(_fill_brain(arr["T1"]), arr["WM"], arr["GM"], images["T1"])

    @classmethod
    def aligned(cls, image: sitk.Image) -> "TissueMaps":
        """Maps for a scan on any grid whose head is already in template (MNI) position: no registration."""
        maps = {w: sitk.GetArrayFromImage(sitk.Resample(template_1mm(w), image, sitk.Transform(), sitk.sitkLinear,
                                                        0.0, sitk.sitkFloat32)) for w in ("T1", "WM", "GM")}
        return cls._build(_fill_brain(maps["T1"]), maps["WM"], maps["GM"], image)

    @classmethod
    def for_scan(cls, image: sitk.Image, modality: str, reporter: Optional[Reporter] = None) -> "TissueMaps":
        """Register the scan to the template (as detection does) and pull the template maps onto its grid.

        `modality` is accepted for symmetry with the rest of the API; the registration (mutual information)
        works across contrasts, so it does not change anything today.
        """
        from ..preprocess.chain import PreprocessConfig, preprocess

        reporter = reporter or Reporter()
        pre = preprocess(image, PreprocessConfig(bias_correction=False), Grid(), False, reporter.sub(0.0, 0.9))
        maps = cls.through(image, pre.transform, pre.native_mask)
        reporter("tissue maps", 1.0)
        return maps

    @classmethod
    def through(cls, image: sitk.Image, template_to_scan: sitk.Transform, brain: np.ndarray) -> "TissueMaps":
        """The template maps pulled onto `image`'s grid through a known registration (template points -> scan
        points; e.g. that of another contrast of the same session, which shares its physical space), with `brain`
        (z, y, x on the image's grid) as the brain mask."""
        # Resample reads the input at transform(p) for each output point p; output points are scan points and
        # the input is the template, so it needs scan -> template: the inverse of the registration.
        scan_to_template = template_to_scan.GetInverse()
        maps = {w: sitk.GetArrayFromImage(sitk.Resample(template_1mm(w), image, scan_to_template, sitk.sitkLinear,
                                                        0.0, sitk.sitkFloat32)) for w in ("WM", "GM")}
        return cls._build(brain, maps["WM"], maps["GM"], image, template_to_scan)

    def check_matches(self, image: sitk.Image) -> None:
        other = Geometry.of(image)
        g = self.geometry
        if (other.size != g.size or not np.allclose(other.spacing, g.spacing, atol=1e-5)
                or not np.allclose(other.origin, g.origin, atol=1e-4)
                or not np.allclose(other.direction, g.direction, atol=1e-5)):
            raise ValueError(f"tissue maps are for another grid (size {g.size}, spacing {g.spacing}) than the "
                             f"image (size {other.size}, spacing {other.spacing})")

    @cached_property
    def _brain_box(self) -> Tuple[slice, ...]:
        """The brain's bounding box grown by one voxel (clipped to the grid): distance maps need no more."""
        return mask_box(self.brain, 1)

    def _edt(self, inside: np.ndarray, outside_value: float) -> np.ndarray:
        # Inside the padded brain box the nearest background (or target) voxel always lies in the box too,
        # so cropping changes no distance and halves the cost on whole-head grids.
        out = np.full(self.brain.shape, outside_value, np.float32)
        box = self._brain_box
        out[box] = ndimage.distance_transform_edt(inside[box], sampling=self.geometry.spacing_zyx)
        return out

    @cached_property
    def depth_mm(self) -> np.ndarray:
        """Distance (mm) from each brain voxel to the outside of the brain; 0 outside."""
        return self._edt(self.brain, 0.0)

    @cached_property
    def ventricle_distance_mm(self) -> np.ndarray:
        """Distance (mm) to the nearest deep (ventricular) CSF voxel; inf where there is none."""
        deep = self.csf & (self.depth_mm > VENTRICLE_MIN_DEPTH_MM)
        labels, n = ndimage.label(deep)
        ventricles = deep
        if n > 1:
            # The lateral ventricles are the big deep CSF pieces; small ones are the depths of sulci.
            sizes = np.bincount(labels.ravel())[1:]
            ventricles = np.isin(labels, 1 + np.flatnonzero(sizes >= VENTRICLE_MIN_SHARE * sizes.max()))
        if not ventricles.any():
            return np.full(self.brain.shape, np.inf, np.float32)
        return self._edt(~ventricles, np.inf)
