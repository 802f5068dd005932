"""Shared fixtures. Core tests make their own data from the nilearn template; tests that need ../shared/data skip
cleanly when it is absent."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path


def _share_cores_between_xdist_workers() -> int:
    """Under pytest-xdist each worker gets its share of the cores, for the thread pools of torch, ITK and BLAS in
    the worker and in the processes its tests start (worker, CLI, torchrun): left alone, every pool of every worker
    takes all cores and they contend. Runs before numpy and SimpleITK are imported; returns the threads per worker
    (0 without xdist)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // int(workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[name] = str(threads)
    return threads


_WORKER_THREADS = _share_cores_between_xdist_workers()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

if _WORKER_THREADS:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_WORKER_THREADS)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_WORKER_THREADS)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
# The Slicer module's GUI-free package (BrainAnomalySlicer) lives beside the module file.
if str(ROOT / "BrainAnomaly") not in sys.path:
    sys.path.insert(0, str(ROOT / "BrainAnomaly"))


def needs_shared_data(manifest: str):
    """Skips the test unless ../shared/data holds `manifest` (each test reads its own part of the data)."""
    return pytest.mark.skipif(not (SHARED_DATA / manifest).is_file(),
                              reason=f"../shared/data/{manifest} is not present")


@pytest.fixture(scope="session", autouse=True)
def private_preprocessing_cache(tmp_path_factory):
    """Tests preprocess into a cache of their own: a user's ~/.cache/brainanomaly is neither written nor read, so a
    test never passes on scans an earlier run left there (and CI on a fresh host takes the time measured here)."""
    import os

    before = os.environ.get("BRAINANOMALY_CACHE")
    os.environ["BRAINANOMALY_CACHE"] = str(tmp_path_factory.mktemp("preprocessing-cache"))
    yield
    if before is None:
        os.environ.pop("BRAINANOMALY_CACHE", None)
    else:
        os.environ["BRAINANOMALY_CACHE"] = before


@pytest.fixture
def one_torch_thread():
    """For tests of tiny nets: one thread is faster than two contending ones (and far faster on a busy machine).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def template_cohort(n: int = 6, seed: int = 0):
    """Healthy-looking grid volumes: the template with per-scan blur, smooth intensity fields, contrast and noise
    (the variation a normative model meets between registered scans). Each seed's scans are made once per test
    process (the cubic intensity field takes about a second a scan) and handed out as copies."""
    scans, made = _TEMPLATE_SCANS.setdefault(seed, (_template_scans(seed), []))
    while len(made) < n:
        made.append(next(scans))
    for image, mask in made[:n]:
        yield image.copy(), mask.copy()


# seed -> (the seed's endless scan generator, the scans it has made so far); template_cohort(n, seed) is always
# the generator's first n scans.
_TEMPLATE_SCANS: dict = {}


def _template_scans(seed: int):
    from scipy import ndimage

    from BrainAnomalyLib.preprocess.normalise import normalise
    from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid, template_on_grid

    grid = Grid()
    base = sitk.GetArrayFromImage(template_on_grid(grid)) * 1000.0
    mask = brain_mask_on_grid(grid)
    rng = np.random.default_rng(seed)
    z = np.linspace(-1, 1, base.shape[0])[:, None, None]
    while True:
        field = _cubic_zoom(rng.normal(1.0, 0.06, (4, 5, 4)), base.shape)
        vol = ndimage.gaussian_filter(base, rng.uniform(0.3, 1.2)) * field * rng.uniform(0.8, 1.2)
        vol = vol * (1 + 0.03 * rng.standard_normal() * z) + 15.0 * rng.standard_normal(base.shape)
        image, _ = normalise(vol.astype(np.float32), mask)
        yield image, mask


def _cubic_zoom(coarse: np.ndarray, shape) -> np.ndarray:
    """ndimage.zoom(coarse, shape / coarse.shape, order=3) as three small matrix products: the cubic spline zoom is
    separable (prefilter, interpolation and edge handling act along each axis alone), so it is one matrix per axis,
    the zoom of each unit vector. Equal to within 1e-14 (the scans' float32 voxels came out bit for bit the same),
    in milliseconds where scipy's 3-D zoom takes a second and more (most of a template scan's making)."""
    out = coarse
    for axis, (n_in, n_out) in enumerate(zip(coarse.shape, shape)):
        out = np.moveaxis(np.tensordot(_cubic_weights(n_in, n_out), out, axes=([1], [axis])), 0, axis)
    return out


@functools.lru_cache(maxsize=None)
def _cubic_weights(n_in: int, n_out: int) -> np.ndarray:
    from scipy import ndimage

    return np.stack([ndimage.zoom(e, n_out / n_in, order=3) for e in np.eye(n_in)], axis=1)


def write_template_cases(folder: Path, n: int, seed: int, prefix: str = "h") -> list:
    """`template_cohort` scans written as T1 NIfTI files on the grid (healthy manifest rows, no mask)."""
    from BrainAnomalyLib.core.manifest import Case
    from BrainAnomalyLib.core.template import Grid

    ref = Grid().reference()
    cases = []
    for i, (image, _) in enumerate(template_cohort(n, seed=seed)):
        img = sitk.GetImageFromArray(image * 100 + 400)
        img.CopyInformation(ref)
        sitk.WriteImage(img, str(folder / f"{prefix}{i}.nii.gz"))
        cases.append(Case(f"{prefix}{i}", "T1", folder / f"{prefix}{i}.nii.gz", None))
    return cases


@functools.lru_cache(maxsize=None)
def _small_volumes(n: int, seed: int):
    return tuple((np.ascontiguousarray(image[::2, ::2, ::2]), np.ascontiguousarray(mask[::2, ::2, ::2]))
                 for image, mask in template_cohort(n, seed=seed))


def small_template_cohort(n: int = 6, seed: int = 0):
    """template_cohort volumes at half resolution, (40, 56, 48) on SMALL_GRID (made once per session): enough for the
    learned scorers' fit/save/load/score paths at an eighth of the voxels."""
    for image, mask in _small_volumes(n, seed):
        yield image.copy(), mask.copy()


def small_grid():
    """The grid of small_template_cohort's volumes."""
    from BrainAnomalyLib.core.template import Grid

    return Grid(size=(48, 56, 40), spacing=(4.0, 4.0, 4.0))


def build_template_normative_model(folder: Path):
    """A real normative model fitted on template-derived healthy volumes, calibrated on others (voxel thresholds
    only: a model calibrated before the lesion-level calibration existed)."""
    from BrainAnomalyLib.calibration import AdaptiveReference, thresholds_for_fpr
    from BrainAnomalyLib.store.models import load_model, save_model
    from BrainAnomalyLib.detection.postprocess import (PostprocessConfig, clip_to_mask, erode_mask, filter_map,
                                                       robust_stats)
    from BrainAnomalyLib.preprocess.chain import PreprocessConfig
    from BrainAnomalyLib.core.progress import Reporter
    from BrainAnomalyLib.scorers.normative import NormativeScorer
    from BrainAnomalyLib.core.template import Grid
    from BrainAnomalyLib.training.run import base_meta

    params, tensors = NormativeScorer.fit(template_cohort(6, seed=1), {"direction": "hypo"}, Reporter())
    post = PostprocessConfig()
    meta = base_meta("normative", "template-normative", "T1", "test model", Grid(), PreprocessConfig(), post, params)
    scorer = NormativeScorer(params, tensors)
    values, stats = [], []
    for image, mask in template_cohort(3, seed=2):
        raw = scorer.score(image, mask, Reporter()).anomaly_map
        filtered, eroded = filter_map(raw, post), erode_mask(mask, post)
        values.append(clip_to_mask(filtered, eroded)[mask])
        stats.append(robust_stats(filtered[eroded]))
    meta["calibration"] = {"method": "test", "thresholds": thresholds_for_fpr(values), "n_scans": 3,
                           "adaptive": AdaptiveReference.from_stats(stats).to_dict()}
    return load_model(save_model(folder, meta, tensors))


@pytest.fixture(scope="session")
def template_normative_model(tmp_path_factory):
    return build_template_normative_model(tmp_path_factory.mktemp("models") / "template-normative")


@pytest.fixture(scope="session")
def calibrated_template_model(tmp_path_factory):
    """The template normative model calibrated as `calibrate` does it (training.run.calibrate_volumes) on five
    template-made healthy volumes: voxel thresholds, the scan-adaptive reference and the finding calibration, the
    records the shipped default carries, for tests of what the front ends do with a calibrated result (a detection
    in seconds where the default's takes most of a minute)."""
    from BrainAnomalyLib.core.progress import Reporter
    from BrainAnomalyLib.store.models import load_model, save_model
    from BrainAnomalyLib.training.run import calibrate_volumes

    folder = tmp_path_factory.mktemp("models")
    fitted = build_template_normative_model(folder / "uncalibrated")
    meta = dict(fitted.meta, name="calibrated-normative")
    meta["calibration"] = calibrate_volumes(fitted, ((f"h{i}", image, mask) for i, (image, mask) in
                                                     enumerate(template_cohort(5, seed=2))), Reporter())
    return load_model(save_model(folder / "calibrated-normative", meta, fitted.tensors))


@pytest.fixture(scope="session")
def intensity_model(tmp_path_factory):
    from BrainAnomalyLib.store.models import load_model, save_model
    from BrainAnomalyLib.detection.postprocess import PostprocessConfig
    from BrainAnomalyLib.preprocess.chain import PreprocessConfig
    from BrainAnomalyLib.core.template import Grid
    from BrainAnomalyLib.training.run import base_meta

    meta = base_meta("intensity", "test-intensity", "T1", "test model", Grid(), PreprocessConfig(),
                     PostprocessConfig(), {"direction": "hypo"})
    meta["default_threshold"] = 2.0
    return load_model(save_model(tmp_path_factory.mktemp("models") / "test-intensity", meta))


@pytest.fixture(scope="session")
def demo_case():
    from BrainAnomalyLib.synth.demo import make_demo_case

    return make_demo_case()


@pytest.fixture(scope="session")
def coarse_demo_case():
    """The oblique, moved demo case with coarse, anisotropic voxels (2.5 x 3 x 3.5 mm), for tests of what detection
    writes and refuses (the same at any resolution): registering it takes a fraction of the time of the 1-1.5 mm
    demo scan's."""
    from BrainAnomalyLib.synth.demo import make_demo_case

    return make_demo_case(spacing=(2.5, 3.0, 3.5))


def _detect_without_n4(scan, model):
    """`model`'s detection on `scan`, registered back to the template, N4 off (the template-made demo scans have no
    bias field; test_cli runs N4 in a detection)."""
    from dataclasses import replace

    from BrainAnomalyLib.detection.pipeline import Detector
    from BrainAnomalyLib.preprocess.chain import PreprocessConfig

    pre = replace(PreprocessConfig.from_dict(model.meta["preprocessing"]), bias_correction=False)
    return Detector(model, device="cpu", preprocess_config=pre).run(scan, modality="T1")


@pytest.fixture(scope="session")
def demo_result(demo_case, template_normative_model):
    """The template normative model's detection on the demo scan (test_geometry: where its voxels land)."""
    return _detect_without_n4(demo_case[0], template_normative_model)


@pytest.fixture(scope="session")
def coarse_demo_result(coarse_demo_case, template_normative_model):
    """The same detection on the coarse demo scan, for tests of what is written with a result (the same at any
    resolution), in a fraction of the time."""
    return _detect_without_n4(coarse_demo_case[0], template_normative_model)


def new_scene():
    """A real MRML scene (slicer-core) with Slicer's built-in colour tables, as the application has them."""
    import slicer

    scene = slicer.vtkMRMLScene()
    colours = slicer.vtkMRMLColorLogic()
    colours.SetMRMLScene(scene)
    scene._colour_logic = colours  # the logic must outlive the call
    return scene


@pytest.fixture
def mrml_scene():
    return new_scene()


@pytest.fixture(scope="session")
def worker_output(tmp_path_factory, coarse_demo_case, calibrated_template_model):
    """The inference worker run once, as the module runs it, on the oblique, anisotropic coarse demo scan
    (registered back to the template; N4 off, the module's option, as the outputs are what is tested) with the
    calibrated template model; tests load copies of its output folder. The shipped default's own run is the demo
    test's."""
    folder = tmp_path_factory.mktemp("worker")
    scan, truth = coarse_demo_case
    sitk.WriteImage(scan, str(folder / "scan.nrrd"))
    sitk.WriteImage(truth, str(folder / "truth.nrrd"))
    _run_worker(folder, "--model", str(calibrated_template_model.path), "--no-bias-correction")
    return folder


def _run_worker(folder: Path, *args: str) -> None:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "BrainAnomalyLib.worker", "--input", str(folder / "scan.nrrd"),
                           "--output-dir", str(folder / "out"), "--device", "cpu", *args], capture_output=True,
                          text=True, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
