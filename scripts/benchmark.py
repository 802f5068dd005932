#!/usr/bin/env python
"""Benchmark every available scorer, through the detect path, on
  (a) a synthetic benchmark: seeded lesions and artefacts inserted into held-out healthy IXI T1 scans (the test
      split that no shipped model trained or calibrated on), one row per lesion kind;
  (b) brats18_dev, per modality (shipped models of that modality, plus the intensity scorer for every modality:
      uncalibrated where no healthy cohort of that contrast exists, so its thresholded columns use a default);
      for T1 together with the held-out healthy IXI scans, which give the scan-level AUROC and the voxel
      false-positive rate on healthy scans at the calibrated 1 % threshold.
Prints one table (scorer x dataset x metrics x seconds per volume x scoring peak memory) and writes it, with the
full metrics as JSON, to --out (default docs/benchmark/latest.md and .json) so runs can be compared across
commits. Fusion models are benchmarked on brats18_dev alone, the one set with every contrast of each subject. The
cases run on worker processes (--workers, default one per core), preprocessed scans come from the cache
(store/cache.py, a fusion model's other contrasts included, so a run after the first preprocesses nothing; the
synthetic scans are made once per --synth-subjects; --no-cache preprocesses again): neither changes a number.
Diffusion models (minutes per scan on a CPU) are left out unless named with --models or asked for with
--with-diffusion: they have tables of their own. The last line printed is the run's total wall time.

    python scripts/benchmark.py [--data ../shared/data] [--synth-subjects 4] [--out docs/benchmark/latest]
    python scripts/benchmark.py --modalities T1 --models ldm-t1-ixi --out docs/benchmark/ldm-t1-ixi   # one model only
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.store.cache import default_cache_dir  # noqa: E402
from BrainAnomalyLib.core.workers import default_workers  # noqa: E402
from BrainAnomalyLib.evaluation.evaluate import evaluate_groups  # noqa: E402
from BrainAnomalyLib.evaluation.report import COLUMNS, _fmt, _get, public  # noqa: E402
from BrainAnomalyLib.core.manifest import read_manifest  # noqa: E402
from BrainAnomalyLib.core.errors import ModelError  # noqa: E402
from BrainAnomalyLib.store.models import Model, list_models, resolve_model  # noqa: E402
from BrainAnomalyLib.detection.pipeline import Detector  # noqa: E402
from BrainAnomalyLib.detection.postprocess import PostprocessConfig  # noqa: E402
from BrainAnomalyLib.preprocess.chain import PreprocessConfig  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.scorers import direction_for, scorer_class  # noqa: E402
from BrainAnomalyLib.synth import KINDS, kept_cohort  # noqa: E402
from BrainAnomalyLib.core.template import Grid  # noqa: E402
from BrainAnomalyLib.training.run import base_meta, split_subjects  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def progress(step: str, fraction: float, _last=[None]) -> None:
    if step != _last[0]:
        log(f"  {fraction:4.0%} {step}")
        _last[0] = step


def scorers_for(modality: str, only=None, fusion: bool = False, diffusion: bool = False) -> dict:
    """Shipped and user models of this modality, plus an intensity scorer when none is shipped for it; with `only`
    (model ids, names or folders) just those of them that are of this modality. `fusion`: the fusion models of
    this reference contrast instead (they need the subject's other contrasts, which only brats18_dev has).
    Diffusion models only with `diffusion` or when named in `only`."""
    models = {}
    if only:
        for name in only:
            m = resolve_model(name)
            if m.modality == modality and (m.kind == "fusion") == fusion:
                models[m.name] = m
        return {name: Detector.for_model(m, device="cpu") for name, m in models.items()}
    for entry in list_models():
        if entry.get("modality") == modality:
            m = resolve_model(entry["id"])
            if (m.kind == "fusion") == fusion and (diffusion or not scorer_class(m.kind).diffusion):
                models[m.name] = m
    if not fusion and not any(m.kind == "intensity" for m in models.values()):
        meta = base_meta("intensity", f"intensity-{modality.lower()} (uncalibrated)", modality,
                         "benchmark-only intensity scorer", Grid(), PreprocessConfig(), PostprocessConfig(),
                         {"direction": direction_for(modality)})
        meta["default_threshold"] = 2.0
        models[meta["name"]] = Model(Path("."), meta, {})
    return {name: Detector.for_model(m, device="cpu") for name, m in models.items()}


@dataclass
class Task:
    """One evaluate_groups run: its cases, each case's group (None: counted in every group), and what scores them."""

    label: str
    modality: str
    cases: list
    groups: Dict[str, Optional[str]]  # case key -> group
    only: Optional[list] = None
    cache: bool = True
    fusion: bool = False
    companions: Optional[dict] = None  # subject -> modality -> image, for fusion models
    diffusion: bool = False


def run_task(task: Task, workers: int, refused: Optional[List[str]] = None) -> dict:
    """{scorer: {group: metrics}} of one task, its cases on `workers` processes (evaluate_groups: same numbers)."""
    detectors = scorers_for(task.modality, task.only, task.fusion, task.diffusion)
    if not detectors:
        log(f"{task.label}: none of the chosen models is for {task.modality}; skipped")
        return {}
    log(f"{task.label}: {len(task.cases)} scans x {len(detectors)} scorers ({', '.join(detectors)})")
    skipped = []
    t = time.perf_counter()
    out = evaluate_groups(task.cases, detectors, lambda c: task.groups[c.key], Reporter(progress), skipped,
                          companions=task.companions, cache=task.cache, workers=workers)
    for s in skipped:
        log(f"  skipped {s}")
        if refused is not None:
            refused.append(f"{task.label}: {s}")
    log(f"{task.label}: done in {time.perf_counter() - t:.0f} s")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--synth-subjects", type=int, default=4, help="held-out IXI scans to insert anomalies into")
    ap.add_argument("--healthy-subjects", type=int, default=23, help="held-out IXI scans for the healthy FPR")
    ap.add_argument("--modalities", default="T1,T1CE,T2,FLAIR")
    ap.add_argument("--skip-synth", action="store_true")
    ap.add_argument("--models", help="comma-separated model ids, names or folders to run instead of every shipped "
                    "and user model (e.g. a newly trained one beside an earlier run's table)")
    ap.add_argument("--with-diffusion", action="store_true", help="also the diffusion models (minutes per scan on "
                    "a CPU, where the others take seconds: they have tables of their own, e.g. --models ldm-t1-ixi "
                    "--out docs/benchmark/ldm-t1-ixi)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmark" / "latest"))
    ap.add_argument("--workers", type=int, help="worker processes scoring whole cases (default: one per core, as "
                    "many as the free memory holds); the numbers do not depend on it")
    ap.add_argument("--no-cache", action="store_true", help="preprocess every scan again (the timings then include "
                    "preprocessing; with the cache, a scan preprocessed in an earlier run is read back)")
    args = ap.parse_args()
    only = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if only:
        try:
            for name in only:
                resolve_model(name)  # an unknown model fails now, not after the first half hour
        except ModelError as e:
            print(f"benchmark: {e}", file=sys.stderr)
            return 2
    data = Path(args.data)
    started = time.perf_counter()
    # Recorded now: the code that runs is the code at start-up, whatever is committed meanwhile.
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    rows = []  # (scorer, dataset, metrics)

    ixi = read_manifest(data / "ixi_t1_2mm.csv", "T1")
    held_out = split_subjects(ixi)["test"]
    healthy = held_out[:args.healthy_subjects]

    # (b) brats18_dev per modality; T1 with the held-out healthy scans (scan AUROC, healthy FPR).
    brats = read_manifest(data / "brats18_dev.csv")
    companions = {}
    for c in brats:
        companions.setdefault(c.subject, {})[c.modality] = c.image
    tasks, labels = [], []
    for modality in args.modalities.split(","):
        lesion_cases = [c for c in brats if c.modality == modality]
        cases = lesion_cases + (healthy if modality == "T1" else [])
        groups = {c.key: "brats18_dev" if c.mask is not None else None for c in cases}
        tasks.append(Task(f"brats18_dev {modality}", modality, cases, groups, only, not args.no_cache,
                          diffusion=args.with_diffusion))
        labels.append(f"brats18_dev {modality}" + (f" + {len(healthy)} held-out healthy IXI"
                                                   if modality == "T1" else ""))
        # fusion models of this reference contrast: on brats18_dev alone, the only set with every contrast
        tasks.append(Task(f"brats18_dev {modality} (fusion)", modality, lesion_cases,
                          {c.key: "brats18_dev" for c in lesion_cases}, only, not args.no_cache, True, companions))
        labels.append(f"brats18_dev {modality}")

    # (a) synthetic anomalies in held-out IXI scans (kept between runs in a folder named by what makes them)
    if not args.skip_synth:
        subjects = held_out[:args.synth_subjects]
        synth_dir = kept_cohort(subjects, default_cache_dir().parent / "benchmark-synth", "T1", KINDS, seed=0,
                                reporter=Reporter(progress))
        log(f"synthetic scans: {synth_dir}")
        synth = read_manifest(synth_dir / "synth.csv")
        artefacts = [c for c in read_manifest(synth_dir / "artefacts.csv")]
        # the untouched scans (group None) are the healthy references for every kind
        groups = {c.key: "synth " + c.subject.rsplit("_", 1)[-1] for c in synth}
        groups.update({c.key: "synth artefacts" for c in artefacts})
        groups.update({c.key: None for c in subjects})
        tasks.append(Task("synthetic", "T1", synth + artefacts + subjects, groups, only, not args.no_cache,
                          diffusion=args.with_diffusion))
        labels.append(None)

    workers = args.workers or default_workers(max(len(t.cases) for t in tasks))
    log(f"{len(tasks)} evaluation runs, each on {workers} worker process(es)")
    refused: List[str] = []
    for label, task in zip(labels, tasks):
        res = run_task(task, workers, refused)
        for name, by_group in res.items():
            for g, metrics in sorted(by_group.items()):
                rows.append((name, label or g, metrics))

    header = ["scorer", "dataset"] + [c for c, _, _ in COLUMNS] + ["scoring peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, dataset, m in rows:
        lines.append("| " + " | ".join([name, dataset] + [_fmt(_get(m, p), k) for _, p, k in COLUMNS]
                                       + [_fmt(m.get("scoring_peak_mb"), "n")]) + " |")
    total = time.perf_counter() - started
    # the largest process: this one, or the largest worker
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
    text = (f"# Benchmark (commit {commit}, {time.strftime('%Y-%m-%d')})\n\n"
            f"CPU, {total / 60:.1f} min in all ({workers} worker processes), process peak memory {peak:.0f} MB. "
            f"Synthetic: {args.synth_subjects} held-out IXI T1 scans; healthy FPR: {len(healthy)} held-out IXI T1 "
            "scans. "
            "Voxel metrics pool brain voxels of the lesion scans on each scan's own grid; FPRs and Dice at the "
            "calibrated 1 % threshold (uncalibrated scorers: their default threshold); s / volume includes "
            "preprocessing; scoring peak MB is traced Python/numpy memory of the scoring and post-processing. "
            "Patient detection: share of lesion scans whose ground truth (all of it, or its largest connected "
            "component) shares a voxel with a finding (a lesion-table row); false findings touch no ground truth.\n\n"
            + "\n".join(lines) + "\n"
            + "".join(f"\nnot scored (refused, as detection refuses it): {r}\n" for r in refused))
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(
        [{"scorer": n, "dataset": d, **{k: v for k, v in public(m).items() if k not in ("per_case", "pr_curve")}}
         for n, d, m in rows], indent=2, default=float) + "\n")
    log(f"written {out.with_suffix('.md')} and .json; total wall time {total / 60:.1f} min ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
