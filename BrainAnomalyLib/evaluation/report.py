"""Writing evaluation results: metrics.json, a markdown table with a FROC table per scorer, PR and FROC curves,
and best/worst case montages."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict

from ..core.files import write_atomic
from ..detection.overlay import overlay_montage

# (header, path into the metrics, format): "%" for rates, "n" for counts and seconds, "f" for scores in [0, 1].
COLUMNS = [("AUPRC", ("voxel", "auprc"), "f"), ("AUROC", ("voxel", "auroc"), "f"),
           ("best Dice (upper bound)", ("voxel", "best_dice_upper_bound"), "f"),
           ("Dice @ calibrated thr", ("voxel", "dice_at_threshold"), "f"), ("MOOD AP", ("voxel", "mood_ap"), "f"),
           ("patient detection", ("patient", "patient_rate"), "f"),
           ("patient detection (largest component)", ("patient", "largest_rate"), "f"),
           ("false findings / healthy scan", ("false_findings", "per_healthy_scan"), "n"),
           ("false findings / lesion scan", ("false_findings", "per_lesion_scan"), "n"),
           ("lesion sensitivity", ("lesion", "sensitivity"), "f"), ("FP lesions / scan", ("fp_lesions_per_scan",), "n"),
           ("scan AUROC", ("scan", "auroc"), "f"), ("healthy FPR", ("healthy_fpr",), "%"),
           ("non-lesion FPR", ("nonlesion_fpr",), "%"), ("s / volume", ("seconds_per_volume",), "n")]


def _get(d: dict, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v, kind: str = "f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if kind == "%":
        return f"{v:.2%}"
    if kind == "n":
        return f"{v:.1f}"
    return f"{v:.3f}"


def markdown_table(results: Dict[str, dict], label_column: str = "scorer") -> str:
    head = [label_column] + [c for c, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        lines.append("| " + " | ".join([name] + [_fmt(_get(r, path), kind) for _, path, kind in COLUMNS]) + " |")
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def public(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


def write_report(results: Dict[str, dict], outdir, title: str = "") -> Path:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    write_atomic(outdir / "metrics.json", json.dumps({k: public(v) for k, v in results.items()}, indent=2,
                                                     default=float) + "\n")
    table = markdown_table(results)
    write_atomic(outdir / "metrics.md", (f"# {title}\n\n" if title else "") + table + "\n\n"
                                       "Voxel metrics pool brain voxels of all lesion scans on each scan's own grid; "
                                       "best Dice is an upper bound over thresholds; FPRs at the calibrated "
                                       "threshold; MOOD AP maps scores to [0, 1] as 1 - healthy FPR.\n\n"
                                       + DETECTION_NOTE + "\n" + froc_tables(results))
    _pr_plot(results, outdir / "pr_curves.png", title)
    _froc_plot(results, outdir / "froc.png", title)
    for name, r in results.items():
        for which, shown in (r.get("_shown") or {}).items():
            if shown is None:
                continue
            overlay_montage(shown.scan, shown.heat, shown.pred, r["threshold"]["value"],
                            outdir / f"{_safe(name)}_{which}.png", shown.brain, truth=shown.truth,
                            title=f"{name}: {which} case {shown.key} (AP {shown.ap:.3f}); green = truth, "
                                  "cyan = prediction")
    return outdir


DETECTION_NOTE = (
    "A finding is one row of detect's lesion table (a connected component of its label map). A finding hits a "
    "ground-truth object when they share at least one voxel. Patient detection: the share of lesion scans whose "
    "lesion is hit, the lesion taken as all of its ground truth at once, or as its largest connected component. "
    "False findings touch no ground-truth voxel; counted per healthy scan (--healthy) and per lesion scan. "
    "Lesion sensitivity counts each connected ground-truth component, so a tumour in fragments weighs as several. "
    "Columns of the first table are at the threshold evaluate used (scan-adaptive unless told otherwise); the "
    "FROC tables sweep one threshold for every scan (no scan-adaptive move), * marks the cohort threshold. "
    "Sensitivities only rise as the threshold falls; false findings need not, since findings merge.\n")


def froc_tables(results: Dict[str, dict]) -> str:
    """One markdown table per scorer with a FROC curve: sensitivities and false findings per threshold."""
    parts = []
    for name, r in results.items():
        curve = r.get("froc")
        if not curve:
            continue
        lines = [f"### FROC: {name}", "",
                 "| threshold | brain voxels above | patient detection | largest component | lesion sensitivity "
                 "| false findings / scan | / healthy scan | / lesion scan |", "|" + "---|" * 8]
        for k, t in enumerate(curve["threshold"]):
            mark = "*" if t == curve["cohort_threshold"] else ""
            lines.append(f"| {t:.4g}{mark} | {_fmt(curve['brain_fraction_above'][k], '%')} | "
                         f"{_fmt(curve['patient_rate'][k])} | {_fmt(curve['largest_rate'][k])} | "
                         f"{_fmt(curve['lesion_sensitivity'][k])} | {_fmt(curve['false_findings_per_scan'][k], 'n')} | "
                         f"{_fmt(curve['false_findings_per_healthy_scan'][k], 'n')} | "
                         f"{_fmt(curve['false_findings_per_lesion_scan'][k], 'n')} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _new_plot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display where reports are made
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5.5, 4.5))


def _finish_plot(fig, ax, path: Path, legend: bool) -> None:
    import matplotlib.pyplot as plt

    if legend:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _froc_plot(results: Dict[str, dict], path: Path, title: str) -> None:
    """Patient detection (solid) and lesion sensitivity (dashed) against false findings per scan, one colour per
    scorer; the marker is the threshold evaluate used."""
    fig, ax = _new_plot()
    drawn = False
    for name, r in results.items():
        curve = r.get("froc")
        if not curve or curve["patient_rate"][0] is None:
            continue
        x = curve["false_findings_per_scan"]
        line, = ax.plot(x, curve["patient_rate"], marker=".", label=f"{name}: patient detection")
        ax.plot(x, curve["lesion_sensitivity"], ls="--", color=line.get_color(), label=f"{name}: lesion sensitivity")
        patient, ff = r.get("patient") or {}, r.get("false_findings") or {}
        if patient.get("patient_rate") is not None:
            ax.plot([ff["per_scan"]], [patient["patient_rate"]], marker="o", ms=7, mfc="none", ls="none",
                    color=line.get_color(), label=f"{name}: patient detection at evaluate's threshold")
        drawn = True
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("false findings / scan (all scans)")
    ax.set_ylabel("sensitivity")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "FROC", fontsize=9)
    _finish_plot(fig, ax, path, drawn)


def _pr_plot(results: Dict[str, dict], path: Path, title: str) -> None:
    fig, ax = _new_plot()
    drawn = False
    for name, r in results.items():
        curve = r.get("pr_curve")
        if curve:
            ax.plot(curve["recall"], curve["precision"], label=f"{name} (AP {r['voxel']['auprc']:.3f})")
            drawn = True
    prevalence = next((r["voxel"]["prevalence"] for r in results.values() if "voxel" in r), None)
    if prevalence is not None:
        ax.axhline(prevalence, color="grey", ls=":", lw=1, label=f"chance ({prevalence:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or "voxel precision-recall", fontsize=9)
    _finish_plot(fig, ax, path, drawn)
