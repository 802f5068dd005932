#!/usr/bin/env python
"""Robustness of a cohort-free scorer to slice thickness and to scans delivered in MNI space: synthetic lesions in
resampled versions of the brats18_dev scans, each model against a plain intensity threshold.

    python scripts/robustness_flair.py --modality FLAIR --models tissue-flair,intensity-flair

`synth` first inserts one seeded lesion of `--kind` (default `ms`: MS-like white-matter lesions) into each dev
scan at 1 mm, on tissue maps registered to it; then versions of the lesioned scan are made: `native` (as is),
`thick-N` (slices N mm thick: blurred across slices with a Gaussian of FWHM N mm, then resampled to N mm slice
spacing, as a 2D acquisition averages its slab, so the lesions are partial-volumed as they would be) and `mni`
(resampled onto the template's 1 mm grid through the registration the lesion was placed with, and z-scored over
the whole field of view so the background is negative, as many MNI-space research pipelines deliver them).
Scored against the synthetic lesions only: the scan's own tumour (dilated by 3 mm) is left out of both lesion and
non-lesion voxels, and a finding that reaches into it is the tumour's, neither a lesion found nor a false finding.
Per version and model: pooled voxel AUPRC, Dice of the default threshold's label map, and synthetic lesions
found / false findings per scan at that threshold.

With `--work DIR` the versions (and their lesion and tumour labels) are written there and read back on the next
run instead of made again (in a subfolder named by the code that makes them: the synth package, CHAIN_VERSION and
the version makers here), and their preprocessing goes through the preprocessed-volume cache (store/cache.py;
BRAINANOMALY_CACHE), so comparing scorer settings on the same versions costs only the scoring. `--raw` adds rows
ranking each version's own voxel intensities over the same voxels: whether the lesions stand out of the scan at all.

`--registration-from T1` places the lesions and makes the `mni` version through the registration of the subject's
T1 in the manifest (BraTS gives a subject's contrasts in one space) instead of the scan's own: a scan whose own
registration fails (a FLAIR holding only part of the brain, README *Input checks*) then still gets lesions in the
tissue they were meant for and an MNI version that is a correctly registered brain. The versions go to their own
`--work` subfolder (`...-t1reg`).
"""

import argparse
import hashlib
import inspect
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.errors import BadInputError  # noqa: E402
from BrainAnomalyLib.core.io import read_volume  # noqa: E402
from BrainAnomalyLib.core.manifest import normalise_modality, read_manifest  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.core.template import template_1mm  # noqa: E402
from BrainAnomalyLib.detection.pipeline import Detector  # noqa: E402
from BrainAnomalyLib.detection.postprocess import findings  # noqa: E402
from BrainAnomalyLib.evaluation.metrics import average_precision, finding_match, intensity_ranking  # noqa: E402
from BrainAnomalyLib.core.template import Grid  # noqa: E402
from BrainAnomalyLib.preprocess.chain import PreprocessConfig, preprocess  # noqa: E402
from BrainAnomalyLib.preprocess.skullstrip import brain_mask  # noqa: E402
from BrainAnomalyLib.store.cache import cached_preprocessed  # noqa: E402
from BrainAnomalyLib.store.models import resolve_model  # noqa: E402
from BrainAnomalyLib.synth.cohort import maker_digest  # noqa: E402
from BrainAnomalyLib.synth.generate import synthesize  # noqa: E402
from BrainAnomalyLib.synth.tissue import TissueMaps  # noqa: E402

DEV = ROOT.parent / "shared" / "data" / "brats18_dev.csv"
TUMOUR_MARGIN_MM = 3.0
FWHM_TO_SIGMA = 1.0 / 2.3548


def thick_slices(image: sitk.Image, thickness_mm: float, labels: bool = False) -> sitk.Image:
    """The volume as a 2D acquisition with `thickness_mm` axial slices would give it (labels: nearest voxel)."""
    spacing = list(image.GetSpacing())
    size = list(image.GetSize())
    if not labels:
        sigma = thickness_mm * FWHM_TO_SIGMA
        image = sitk.SmoothingRecursiveGaussian(image, [1e-3, 1e-3, sigma]) if sigma > spacing[2] else image
    new_size = [size[0], size[1], max(1, int(round(size[2] * spacing[2] / thickness_mm)))]
    ref = sitk.Image(new_size, image.GetPixelID())
    ref.SetSpacing([spacing[0], spacing[1], thickness_mm])
    ref.SetOrigin(image.GetOrigin())
    ref.SetDirection(image.GetDirection())
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, 0.0)


def resample_to_mni(image: sitk.Image, template_to_scan: sitk.Transform, labels: bool = False) -> sitk.Image:
    """The volume on the template's 1 mm grid (labels: nearest voxel); intensities z-scored over the whole field
    of view, so the background is negative."""
    out = sitk.Resample(image, template_1mm("T1"), template_to_scan,
                        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, 0.0,
                        sitk.sitkUInt8 if labels else sitk.sitkFloat32)
    if labels:
        return out
    arr = sitk.GetArrayFromImage(out)
    z = sitk.GetImageFromArray(((arr - arr.mean()) / max(float(arr.std()), 1e-6)).astype(np.float32))
    z.CopyInformation(out)
    return z


def versions(image: sitk.Image, labels: dict, names, template_to_scan: sitk.Transform):
    """(name, image, {label name: labels}) for each requested version of one scan."""
    for name in names:
        if name == "native":
            yield name, image, labels
        elif name.startswith("thick-"):
            mm = float(name.split("-", 1)[1])
            yield name, thick_slices(image, mm), {k: thick_slices(v, mm, labels=True) for k, v in labels.items()}
        elif name == "mni":
            yield name, resample_to_mni(image, template_to_scan), {k: resample_to_mni(v, template_to_scan, True)
                                                                  for k, v in labels.items()}
        else:
            raise SystemExit(f"unknown version {name!r}: use native, thick-<mm> or mni")


def versions_key() -> str:
    """Names the --work subfolder by what makes the versions (the synth code, the preprocessing chain that places the
    lesions and makes the `mni` version, and the version makers here), so a change to any of them makes them anew
    instead of reading back versions an older code made."""
    makers = "".join(inspect.getsource(f) for f in (thick_slices, resample_to_mni, versions))
    return hashlib.sha256((maker_digest() + makers).encode()).hexdigest()[:12]


def kept_versions(work: Path, subject: str, names, make):
    """`versions` through the folder `work`: each version's image and labels are read from there when written by
    an earlier run, else made by `make()` (a zero-argument callable returning versions' iterator) and written.
    Yields (name, image path, image, labels)."""
    folder = work / subject
    files = {n: (folder / f"{n}.nii.gz", folder / f"{n}.lesion.nii.gz", folder / f"{n}.tumour.nii.gz")
             for n in names}
    if not all(p.is_file() for paths in files.values() for p in paths):
        folder.mkdir(parents=True, exist_ok=True)
        for name, image, labels in make():
            for path, volume in zip(files[name], (image, labels["lesion"], labels["tumour"])):
                sitk.WriteImage(volume, str(path), True)
    for name in names:
        image_path, lesion_path, tumour_path = files[name]
        yield name, image_path, sitk.ReadImage(str(image_path)), {"lesion": sitk.ReadImage(str(lesion_path)),
                                                                   "tumour": sitk.ReadImage(str(tumour_path))}


def score_case(det: Detector, scan: sitk.Image, pre, lesion: np.ndarray, tumour_zone: np.ndarray,
               modality: str) -> dict:
    analysis = det.analyse(scan, pre=pre)
    result = det.to_result(scan, analysis, det.for_scan(det.threshold(), analysis), modality,
                           with_reconstruction=False)
    keep = pre.native_mask & ~tumour_zone
    heat = sitk.GetArrayFromImage(result.anomaly_map)
    pred = (sitk.GetArrayFromImage(result.pred_mask) > 0) & pre.native_mask
    voxel_ml = float(np.prod(scan.GetSpacing())) / 1000.0
    truth_labels, _ = ndimage.label(lesion, structure=np.ones((3, 3, 3)))
    # A finding that reaches into the scan's own tumour is that tumour's (the median filter and the back-projection
    # carry its score a few mm beyond the margin): neither a synthetic lesion found nor a false finding.
    found = findings(pred, voxel_ml, result.min_lesion_ml)
    found[np.isin(found, np.unique(found[tumour_zone]))] = 0
    match = finding_match(found, truth_labels)
    pred &= keep
    return {"scores": heat[keep], "labels": lesion[keep], "inter": int((pred & lesion).sum()),
            "pred": int(pred.sum()), "truth": int(lesion.sum()), "true_lesions": match["true_lesions"],
            "found": match["found"], "false_findings": match["false_findings"]}


RAW = "raw intensity (no model)"
RAW_DEPTH_MM = 3.0
RAW_DEEP = f"raw intensity, > {RAW_DEPTH_MM:g} mm deep"


def raw_ranking(scan: sitk.Image, brain: np.ndarray, lesion: np.ndarray, tumour_zone: np.ndarray, modality: str,
                depth_mm: float) -> dict:
    """The version's own intensities as the score (lesions' side up: T1 and T1CE lesions here are dark), over the
    voxels the models are scored on, or those of them more than `depth_mm` inside the brain mask: whether the
    lesions stand out of the scan at all."""
    keep = brain & ~tumour_zone
    if depth_mm > 0:
        keep &= ndimage.distance_transform_edt(brain, sampling=list(reversed(scan.GetSpacing()))) > depth_mm
    sign = -1.0 if modality in ("T1", "T1CE") else 1.0
    scores = intensity_ranking(sitk.GetArrayFromImage(scan), brain, sign)
    return {"scores": scores[keep], "labels": lesion[keep]}


def _ap_text(value: float) -> str:
    """Three decimals, four under 0.01: small lesions' AUPRC sits near their prevalence (0.0001-0.0004), where
    three decimals would print models and plain rankings alike as 0.000 or 0.001."""
    return f"{value:.4f}" if value < 0.01 else f"{value:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modality", default="FLAIR")
    ap.add_argument("--models", default="tissue-flair,intensity-flair",
                    help="comma-separated model names or folders; the first is compared with each other one")
    ap.add_argument("--manifest", type=Path, default=DEV)
    ap.add_argument("--versions", default="native,thick-3,thick-5,thick-8,mni")
    ap.add_argument("--kind", default="ms")
    ap.add_argument("--cases", type=int, default=0, help="use only the first N cases (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="keep the versions in this folder and reuse them on the next run")
    ap.add_argument("--registration-from", choices=["own", "T1"], default="own",
                    help="place the lesions and make the MNI version through the scan's own registration (default) "
                         "or its subject's T1's")
    ap.add_argument("--raw", action="store_true",
                    help="add a row for the version's own voxel intensities, signed for the contrast's lesions, over "
                         "the same voxels and over those deeper than 3 mm in the brain: what any voxel-wise "
                         "intensity ranking could reach, with nothing cleaned")
    args = ap.parse_args()
    modality = normalise_modality(args.modality)
    detectors = {name: Detector(resolve_model(name), device="cpu") for name in args.models.split(",")}
    first = next(iter(detectors.values()))
    for name, det in detectors.items():
        if det.preprocess_config != first.preprocess_config or det.grid != first.grid:
            raise SystemExit(f"{name}: the models compared must share preprocessing and grid")
    every = read_manifest(args.manifest)
    t1_of = {c.subject: c.image for c in every if c.modality == "T1"}
    cases = [c for c in every if c.modality == modality and c.mask is not None]
    if args.registration_from == "T1":
        cases = [c for c in cases if c.subject in t1_of]
    cases = cases[:args.cases] if args.cases else cases
    if not cases:
        raise SystemExit(f"no {modality} lesion scans in {args.manifest}")
    names = args.versions.split(",")
    suffix = "-t1reg" if args.registration_from == "T1" else ""
    rows_of = list(detectors) + ([RAW, RAW_DEEP] if args.raw else [])
    tallies = {(v, m): [] for v in names for m in rows_of}
    skipped = []
    work = None if args.work is None else args.work / f"{modality}-{args.kind}-{args.seed}{suffix}-{versions_key()}"
    for i, case in enumerate(cases):
        def make(case=case, seed=args.seed + 1000 * i):
            image = read_volume(case.image)
            tumour = sitk.Cast(sitk.ReadImage(str(case.mask)) > 0, sitk.sitkUInt8)
            tumour.CopyInformation(image)
            if args.registration_from == "T1":
                t1 = preprocess(read_volume(t1_of[case.subject]), PreprocessConfig(bias_correction=False), Grid(),
                                False, Reporter())
                tissue = TissueMaps.through(image, t1.transform, brain_mask(image, "auto", False, Reporter())[0])
            else:
                tissue = TissueMaps.for_scan(image, modality)
            synth = synthesize(image, modality, args.kind, seed, tissue)
            lesion_img = sitk.Cast(synth.mask > 0, sitk.sitkUInt8)
            return versions(synth.image, {"lesion": lesion_img, "tumour": tumour}, names, tissue.template_to_scan)

        try:
            made = list((n, None, v, lab) for n, v, lab in make()) if args.work is None else \
                list(kept_versions(work, case.subject, names, make))
        except (BadInputError, ValueError) as exc:  # a scan the pipeline cannot register or place a lesion in
            skipped.append(f"{case.subject}: {exc}")
            continue
        for name, path, version, labels in made:
            lesion = sitk.GetArrayFromImage(labels["lesion"]) > 0
            spacing_zyx = list(reversed(version.GetSpacing()))
            tumour_zone = ndimage.distance_transform_edt(sitk.GetArrayFromImage(labels["tumour"]) == 0,
                                                         sampling=spacing_zyx) <= TUMOUR_MARGIN_MM
            lesion &= ~tumour_zone
            try:
                pre = preprocess(version, first.preprocess_config, first.grid, False, Reporter()) if path is None \
                    else cached_preprocessed(path, version, first.preprocess_config, first.grid)
            except BadInputError as exc:  # a version the pipeline cannot take: listed, not scored
                skipped.append(f"{case.subject} {name}: {exc}")
                continue
            for m, det in detectors.items():
                tallies[(name, m)].append(score_case(det, version, pre, lesion & pre.native_mask, tumour_zone,
                                                     modality))
            if args.raw:
                for m, depth in ((RAW, 0.0), (RAW_DEEP, RAW_DEPTH_MM)):
                    tallies[(name, m)].append(raw_ranking(version, pre.native_mask, lesion & pre.native_mask,
                                                          tumour_zone, modality, depth))
            print(f"{case.subject} {name}: {int(lesion.sum())} synthetic lesion voxels", flush=True)
    print(f"\n{modality}, synthetic '{args.kind}' lesions in {len(cases)} brats18_dev scans (tumour left out)\n")
    print("| version | model | AUPRC | Dice at default | lesions found | false findings / scan |")
    print("|---|---|---|---|---|---|")
    for v in names:
        for m in rows_of:
            rows = tallies[(v, m)]
            if not rows:
                continue
            auprc = _ap_text(average_precision(np.concatenate([r["scores"] for r in rows]),
                                               np.concatenate([r["labels"] for r in rows])))
            if m in (RAW, RAW_DEEP):
                print(f"| {v} ({len(rows)} scans) | {m} | {auprc} | – | – | – |")
                continue
            dice = 2 * sum(r["inter"] for r in rows) / max(sum(r["pred"] + r["truth"] for r in rows), 1)
            found = f"{sum(r['found'] for r in rows)}/{sum(r['true_lesions'] for r in rows)}"
            ff = np.mean([r["false_findings"] for r in rows])
            print(f"| {v} ({len(rows)} scans) | {m} | {auprc} | {dice:.3f} | {found} | {ff:.1f} |")
    for line in skipped:
        print(f"not scored: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
