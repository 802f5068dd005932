"""A benchmark cohort: every healthy scan of one contrast, each kind of synthetic anomaly, written as volumes,
manifests (synth.csv for lesions, artefacts.csv for lesion-free artefact scans) and synth.json records."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..core.errors import BadInputError
from ..core.files import sha256_file
from ..core.io import read_volume, write_volume
from ..core.manifest import Case, normalise_modality, write_manifest
from ..core.progress import Reporter
from ..core.template import Grid, template_1mm, template_on_grid
from ..preprocess.chain import CHAIN_VERSION
from .generate import KINDS, SynthCase, displacement_image, synthesize
from .tissue import TissueMaps

# The bundled template is a 0..1 T1 image; scanner-like units keep intensities comparable to real scans.
TEMPLATE_SCALE = 1000.0
TEMPLATE_SUBJECT = "template"


def check_kinds(kinds: Sequence[str]) -> List[str]:
    kinds = [k.strip() for k in kinds if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise BadInputError(f"unknown synthetic kind(s) {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(KINDS)}")
    return kinds


def case_seed(seed: int, scan_index: int, repeat: int) -> int:
    """The seed of one synthetic case; recorded, so `synthesize` with it reproduces the case alone."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, scan_index, repeat]).generate_state(1)[0])


def _scans(cases: Optional[List[Case]], modality: str) -> List[Tuple[str, Optional[Case]]]:
    if cases is None:
        if modality != "T1":
            raise BadInputError(f"the bundled template is a T1 image; it cannot stand for a {modality} scan")
        return [(TEMPLATE_SUBJECT, None)]
    healthy = [c for c in cases if c.modality == modality and c.mask is None]
    if not healthy:
        raise BadInputError(f"the manifest has no healthy (mask-less) {modality} scans")
    return [(c.subject, c) for c in healthy]


def _load(source: Optional[Case], template_grid: Optional[Grid], modality: str, reporter: Reporter):
    if source is None:
        base = template_1mm("T1") if template_grid is None else template_on_grid(template_grid, "T1")
        image = sitk.Cast(base * TEMPLATE_SCALE, sitk.sitkFloat32)
        return image, TissueMaps.from_template(template_grid), "MNI152 2009a T1 template"
    image = read_volume(source.image)
    return image, TissueMaps.for_scan(image, modality, reporter), str(source.image)


def cohort_key(cases: Optional[List[Case]], modality: str, kinds: Sequence[str], per_scan: int = 1,
               seed: int = 0) -> str:
    """A digest of what make_cohort's output depends on, for a folder of it kept between runs: the scans' contents,
    the settings, the preprocessing chain (CHAIN_VERSION: the lesions are placed through the scan's registration to
    the template's tissue maps) and this package's code. A folder keyed by the subject count alone was reused after
    CHAIN_VERSION 10 and 11 had moved every lesion of a fresh build (benchmark AUPRC up to 0.02 apart)."""
    h = hashlib.sha256(json.dumps({"modality": normalise_modality(modality), "kinds": list(kinds),
                                   "per_scan": per_scan, "seed": seed, "maker": maker_digest()}).encode())
    for _, source in _scans(cases, normalise_modality(modality)):
        h.update(sha256_file(source.image).encode() if source is not None else TEMPLATE_SUBJECT.encode())
    return h.hexdigest()[:16]


def maker_digest() -> str:
    """What synthetic cases depend on besides their inputs and seeds: this package's code and the preprocessing
    chain (CHAIN_VERSION) whose registration places the lesions in the scan's tissue. For anything that keeps
    synthetic scans between runs (cohort_key; scripts/robustness_flair.py's --work)."""
    h = hashlib.sha256(f"chain {CHAIN_VERSION}".encode())
    for code in sorted(Path(__file__).parent.glob("*.py")):
        h.update(code.read_bytes())
    return h.hexdigest()


def kept_cohort(cases: Optional[List[Case]], root, modality: str, kinds: Sequence[str], seed: int = 0,
                reporter: Optional[Reporter] = None, build: bool = True) -> Path:
    """make_cohort's folder for these scans and settings under `root`, named by cohort_key and built when absent
    (aside, then renamed into place, so an interrupted build is never taken for a made one). With `build` False an
    absent folder is a BadInputError instead."""
    n_scans = 1 if cases is None else len(cases)  # None: the bundled template
    key = cohort_key(cases, modality, kinds, seed=seed)
    folder = Path(root) / f"synth-{normalise_modality(modality)}-{n_scans}-{key}"
    if (folder / "synth.csv").is_file():
        return folder
    if not build:
        raise BadInputError(f"no synthetic set made by this code for these scans at {folder}")
    aside = folder.with_name(folder.name + ".partial")
    shutil.rmtree(aside, ignore_errors=True)
    reporter = reporter or Reporter()
    reporter(f"building the synthetic set in {folder}", 0.0)
    make_cohort(cases, aside, modality, kinds, seed=seed, reporter=reporter)
    shutil.rmtree(folder, ignore_errors=True)
    aside.rename(folder)
    return folder


def make_cohort(cases: Optional[List[Case]], out_dir, modality: str, kinds: Sequence[str], per_scan: int = 1,
                seed: int = 0, reporter: Optional[Reporter] = None, template_grid: Optional[Grid] = None) -> Path:
    """Write synthetic cases for every healthy `modality` scan in `cases` (or the bundled template when None).

    Files are `<subject>_<kind>.nii.gz` and `<subject>_<kind>_mask.nii.gz` (with `_<i>` before the suffix when
    per_scan > 1; tumours also get `_displacement.nii.gz`). Returns the path of synth.csv. A scan that cannot be
    read or registered, or a case that does not fit a scan, is listed under "failures" in synth.json and the
    rest go on; if nothing at all could be made, BadInputError. `template_grid` puts the template on a model
    grid instead of its 1 mm grid (quick runs).
    """
    reporter = reporter or Reporter()
    modality = normalise_modality(modality)
    kinds = check_kinds(kinds)
    if per_scan < 1:
        raise BadInputError("--per-scan must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scans = _scans(cases, modality)
    rows: Dict[bool, List[Case]] = {False: [], True: []}  # keyed by "is an artefact"
    entries: List[dict] = []
    failures: List[dict] = []
    for i, (subject, source) in enumerate(scans):
        rep = reporter.sub(i / len(scans), (i + 1) / len(scans))
        reporter.check()
        try:
            image, tissue, origin = _load(source, template_grid, modality, rep.sub(0.0, 0.4))
        except BadInputError as exc:
            failures.append({"subject": subject, "error": str(exc)})
            continue
        jobs = [(kind, r) for kind in kinds for r in range(per_scan)]
        for j, (kind, r) in enumerate(jobs):
            rep.sub(0.4, 1.0)(f"synth {subject} {kind}", j / len(jobs))
            name = f"{subject}_{kind}" + (f"_{r}" if per_scan > 1 else "")
            case_seed_value = case_seed(seed, i, r)
            try:
                case = synthesize(image, modality, kind, case_seed_value, tissue)
            except ValueError as exc:  # e.g. a brain mask too small to hold this lesion
                failures.append({"subject": name, "kind": kind, "seed": case_seed_value, "error": str(exc)})
                continue
            entry = _write_case(case, out, name)
            entry.update({"subject": name, "source_subject": subject, "source_image": origin,
                          "records": case.records})
            entries.append(entry)
            rows[case.is_artefact].append(
                Case(name, modality, out / entry["image"], None if case.is_artefact else out / entry["mask"]))
        rep("synth done", 1.0)
    write_manifest(out / "synth.csv", rows[False])
    write_manifest(out / "artefacts.csv", rows[True])
    (out / "synth.json").write_text(json.dumps({"modality": modality, "kinds": kinds, "per_scan": per_scan,
                                                "seed": seed, "cases": entries, "failures": failures}, indent=1))
    if not entries:
        raise BadInputError("no synthetic case could be made: " + "; ".join(
            f"{f['subject']}: {f['error']}" for f in failures))
    return out / "synth.csv"


def _write_case(case: SynthCase, out: Path, name: str) -> dict:
    files = {"image": f"{name}.nii.gz", "mask": f"{name}_mask.nii.gz"}
    write_volume(case.image, out / files["image"])
    # Artefact scans get an all-zero mask file too (evaluators may want one), but no mask in artefacts.csv,
    # which marks them as lesion-free scans.
    write_volume(case.mask, out / files["mask"])
    field = displacement_image(case)
    if field is not None:
        files["displacement"] = f"{name}_displacement.nii.gz"
        write_volume(sitk.Cast(field, sitk.sitkVectorFloat32), out / files["displacement"])
    return files

