"""What the BrainAnomaly panel shows and hands on, without Qt or slicer: the threshold sliders' scales (false
findings per healthy scan, or healthy voxel false-positive rate), the texts of the model, device, threshold and
progress displays, and the DetectionOptions a click on "Detect anomalies" starts. Kept here so that plain pytest
checks them; the widget only wires them up.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from BrainAnomalyLib.calibration.findings import DEFAULT_FALSE_FINDINGS, FALSE_FINDINGS_RANGE, FindingCalibration

# The voxel threshold slider runs over log10 of the healthy FPR in percent: -1 .. 1 is 0.1 % .. 10 %.
SLIDER_MIN, SLIDER_MAX = -1.0, 1.0
DEFAULT_FPR = 0.01
# The findings slider runs over log10 of the false findings per healthy scan, over the library's range.
FINDINGS_SLIDER_MIN, FINDINGS_SLIDER_MAX = (math.log10(v) for v in FALSE_FINDINGS_RANGE)
FINDINGS, VOXEL = "findings", "voxel"
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_LABELS = {"auto": "Auto (GPU if available)", "cpu": "CPU", "cuda": "GPU (CUDA)"}
MODALITIES = ("T1", "T1CE", "T2", "FLAIR", "PD")


# --- threshold slider ---------------------------------------------------------------------------------------

def slider_to_fpr(value: float) -> float:
    """Slider position (log10 of percent) -> healthy false-positive rate as a fraction (0.01 = 1 %)."""
    value = min(max(float(value), SLIDER_MIN), SLIDER_MAX)
    return 10.0 ** value / 100.0


def fpr_to_slider(fpr: Optional[float]) -> float:
    """Healthy FPR fraction -> slider position, clamped to the slider's range; the default for a missing FPR."""
    if fpr is None or not fpr > 0 or not math.isfinite(fpr):
        fpr = DEFAULT_FPR
    return min(max(math.log10(fpr * 100.0), SLIDER_MIN), SLIDER_MAX)


def slider_to_false_findings(value: float) -> float:
    """Findings slider position (log10) -> false findings per healthy scan, rounded to 2 significant digits (what
    the panel shows is what is applied)."""
    value = min(max(float(value), FINDINGS_SLIDER_MIN), FINDINGS_SLIDER_MAX)
    return float(f"{10.0 ** value:.2g}")


def false_findings_to_slider(false_findings: Optional[float]) -> float:
    """False findings per healthy scan -> findings slider position, clamped; the default for a missing value."""
    if false_findings is None or not false_findings > 0 or not math.isfinite(false_findings):
        false_findings = DEFAULT_FALSE_FINDINGS
    return min(max(math.log10(false_findings), FINDINGS_SLIDER_MIN), FINDINGS_SLIDER_MAX)


def threshold_unit(state: Optional[dict], voxel_threshold: bool) -> str:
    """The unit of the threshold in force for outputs with this calibration `state` (None: no outputs yet, then the
    next run's): false findings per healthy scan unless the user asked for the voxel threshold or the result has
    no finding calibration (an uncalibrated model, one calibrated before findings were, a run made with --fpr)."""
    if voxel_threshold:
        return VOXEL
    if state is None:
        return FINDINGS
    calibrated = state.get("curve") is not None and FindingCalibration.from_dict(state.get("findings")) is not None
    return FINDINGS if calibrated else VOXEL


def format_false_findings(false_findings: float) -> str:
    return f"{false_findings:g} false finding{'' if false_findings == 1 else 's'} per healthy scan"


def findings_text(false_findings: Optional[float], n_findings: Optional[int] = None,
                  finding_score: Optional[float] = None) -> str:
    """The label beside the findings slider, e.g. '0.5 false findings per healthy scan · 3 findings' (while dragging:
    the finding score a finding needs instead of the count)."""
    parts = [format_false_findings(false_findings if false_findings is not None else DEFAULT_FALSE_FINDINGS)]
    if n_findings is not None:
        parts.append(f"{n_findings} finding{'s' if n_findings != 1 else ''}")
    elif finding_score is not None:
        parts.append(f"finding score ≥ {finding_score:.3g}")
    return " · ".join(parts)


def format_percent(fpr: float) -> str:
    pct = fpr * 100.0
    return f"{pct:.2f} %" if pct < 10 else f"{pct:.1f} %"


def threshold_text(fpr: Optional[float], score: Optional[float], calibrated: bool = True) -> str:
    """The label beside the slider, e.g. '1.00 % healthy FPR · score ≥ 2.35'."""
    if not calibrated:
        base = "model has no calibration, the slider has no effect"
        return base if score is None else f"score ≥ {score:.2f} ({base})"
    parts = [f"{format_percent(fpr if fpr is not None else DEFAULT_FPR)} healthy FPR"]
    if score is not None:
        parts.append(f"score ≥ {score:.2f}")
    return " · ".join(parts)


# --- models ---------------------------------------------------------------------------------------------------

def format_size(n_bytes: Optional[float]) -> str:
    if n_bytes is None:
        return "size unknown"
    n = float(n_bytes)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def guess_modality(entry: Optional[dict]) -> str:
    """The modality a model expects: its own, else its first input."""
    if not entry:
        return ""
    inputs = entry.get("inputs") or []
    return str(entry.get("modality") or (inputs[0] if inputs else "") or "")


def other_contrasts(entry: Optional[dict]) -> List[str]:
    """A fusion model's contrasts besides the input volume's (its first, the one the results go with): one volume
    selector each; [] for a model of one contrast."""
    if not entry or entry.get("kind") != "fusion":
        return []
    return [str(m) for m in (entry.get("inputs") or [])[1:]]


def model_item_text(entry: dict, default_id: Optional[str] = None) -> str:
    """Text of a model in the selector: 'normative-t1-ixi (T1, default)'."""
    tags = [t for t in (guess_modality(entry), "default" if entry.get("id") == default_id else "",
                        "yours" if entry.get("source") == "user" else "") if t]
    return f"{entry.get('id', '?')} ({', '.join(tags)})" if tags else str(entry.get("id", "?"))


def model_details(entry: Optional[dict]) -> str:
    """Description, modality and size of a model, for the label under the selector."""
    if not entry:
        return "No model found. Import one with 'Import model…'."
    inputs = entry.get("inputs") or []
    facts = [f"contrasts {' + '.join(inputs)}" if len(inputs) > 1 else f"modality {guess_modality(entry) or '?'}"]
    if entry.get("kind"):
        facts.append(f"{entry['kind']} scorer")
    facts.append(format_size(entry.get("size_bytes")))
    facts.append("shipped" if entry.get("source") == "shipped" else "imported")
    description = (entry.get("description") or "").strip()
    return (description + "\n" if description else "") + " · ".join(facts)


def model_index(entries: List[dict], model_id: Optional[str], default_id: Optional[str] = None) -> int:
    """Index of `model_id` in the list, else of the default model, else 0 (-1 for an empty list)."""
    if not entries:
        return -1
    ids = [e.get("id") for e in entries]
    for wanted in (model_id, default_id):
        if wanted and wanted in ids:
            return ids.index(wanted)
    return 0


def modality_choices(entries: Iterable[dict]) -> List[str]:
    """Known modalities first, then any the installed models add."""
    out = list(MODALITIES)
    for e in entries:
        m = guess_modality(e)
        if m and m not in out:
            out.append(m)
    return out


def model_source(path) -> Path:
    """What the user picked in the import dialog -> what import_model takes: a model.json stands for its folder."""
    p = Path(path)
    return p.parent if p.name == "model.json" else p


def is_already_installed(exc: BaseException) -> bool:
    """import_model's refusal to replace an installed model (the one ModelError the user can answer with yes)."""
    from BrainAnomalyLib.store.model_store import ModelExistsError

    return isinstance(exc, ModelExistsError)


# --- device ---------------------------------------------------------------------------------------------------

def describe_devices(answer: Optional[dict]) -> str:
    """The label beside the device selector, from the worker's `--list-devices` answer (None: still asking)."""
    if answer is None:
        return "Looking for GPUs…"
    if "torch" not in answer:
        return f"Cannot tell which devices exist ({answer.get('error', 'no answer')}); detection may still run"
    if answer["torch"] is None:
        return "PyTorch is not installed yet (it is installed on the first detection)"
    if answer.get("error"):
        return f"No usable GPU ({answer['error']}); detection runs on the CPU"
    cuda = answer.get("cuda") or []
    if not cuda:
        return "No CUDA GPU found; detection runs on the CPU"
    more = f" (+{len(cuda) - 1} more)" if len(cuda) > 1 else ""
    return f"GPU found: {cuda[0]['name']}, {float(cuda[0]['memory_gb']):.0f} GB{more}"


class GuiBinding:
    """The panel's two-way binding to one parameter node, made and dropped exactly once per node.

    Slicer 5.8's `connectGui` returns no tag (5.10 fixed that), so `disconnectGui` could never be called and every
    module entry added another set of connectors. `connectParametersToGui` returns its tag on every release, so
    the binding is made through it, from the widgets' "SlicerParameterName" properties."""

    def __init__(self) -> None:
        self.node = None
        self.tag = None

    def bind(self, node, widgets: Iterable) -> None:
        self.unbind()
        mapping = {}
        for widget in widgets:
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if name:
                mapping[str(name)] = widget
        self.node, self.tag = node, node.connectParametersToGui(mapping)

    def unbind(self) -> None:
        if self.node is not None and self.tag is not None:
            self.node.disconnectGui(self.tag)
        self.node = self.tag = None


# --- run ------------------------------------------------------------------------------------------------------

def detection_options(*, model: Optional[str], modality: Optional[str], device: str = "auto",
                      skull_strip: bool = True, bias_correction: bool = True, registration: bool = True,
                      fpr: float = DEFAULT_FPR, false_findings: float = DEFAULT_FALSE_FINDINGS,
                      voxel_threshold: bool = False, finding_calibrated: bool = True, min_lesion_ml: float = 0.05,
                      per_lesion: bool = False, create_new: bool = False):
    """The panel's choices as the logic's DetectionOptions: the run asks for `false_findings` per healthy scan
    unless the user ticked the voxel threshold or the model has no finding calibration (`finding_calibrated`,
    see model_has_finding_calibration), then for the healthy voxel `fpr`."""
    from .logic import DetectionOptions

    if device not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {device!r}")
    findings = not voxel_threshold and finding_calibrated
    return DetectionOptions(model=model or None, modality=(modality or "").strip() or None, device=device,
                            skull_strip="auto" if skull_strip else "none", bias_correction=bool(bias_correction),
                            registration=bool(registration), fpr=None if findings else float(fpr),
                            false_findings=float(false_findings) if findings else None,
                            min_lesion_ml=float(min_lesion_ml), per_lesion_segments=bool(per_lesion),
                            reuse_outputs=not create_new)


def model_has_finding_calibration(entry: Optional[dict]) -> bool:
    """Whether a model (a registry entry, with its `location`) is calibrated for findings, read from its model.json
    (meta only, no tensors): a run may then ask for a number of false findings per healthy scan."""
    import json

    if not entry or not entry.get("location"):
        return False
    try:
        meta = json.loads((Path(entry["location"]) / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return FindingCalibration.from_meta(meta) is not None


def progress_state(event: dict) -> Optional[Tuple[int, str]]:
    """(percent, progress bar text) for a worker 'progress' event; None for other events."""
    if event.get("event") != "progress":
        return None
    fraction = min(max(float(event.get("fraction") or 0.0), 0.0), 1.0)
    step = str(event.get("step") or "working").replace("%", "%%")
    return int(round(fraction * 100)), f"{step}: %p%"


def event_log_line(event: dict, last_step: Optional[str] = None) -> Optional[str]:
    """The log box line for a worker event (a progress event only when its step changes); None for nothing."""
    kind = event.get("event")
    if kind == "log":
        return str(event.get("message", ""))
    if kind == "progress":
        step = event.get("step")
        return f"{step}…" if step and step != last_step else None
    if kind == "started":
        return f"Inference process started (device {event.get('device', 'auto')})"
    if kind == "error":
        return f"Error ({event.get('kind', 'error')}): {event.get('message', '')}"
    if kind == "done":
        return "Inference finished; loading the results"
    return None


def result_summary(result: dict) -> str:
    """One line for the log and the status label after (re-)thresholding."""
    lesions = result.get("lesions") or []
    volume = sum(float(les.get("volume_ml", 0.0)) for les in lesions)
    text = f"{len(lesions)} lesion{'s' if len(lesions) != 1 else ''}, {volume:.2f} mL"
    if result.get("false_findings") is not None:
        return text + f" at {format_false_findings(result['false_findings'])}"
    if result.get("threshold") is not None:
        text += f" at score ≥ {result['threshold']:.2f}"
    if result.get("fpr") is not None:
        text += f" ({format_percent(result['fpr'])} healthy FPR)"
    return text


def state_summary(state: dict) -> str:
    """The Lesions line for outputs already in the scene, from the calibration state stored with their heatmap
    (with the device the worker really used)."""
    n = state.get("n_lesions")
    text = "lesions not counted yet" if n is None else f"{n} lesion{'s' if n != 1 else ''}"
    if state.get("false_findings") is not None:
        text += f" at {format_false_findings(state['false_findings'])}"
    else:
        if state.get("threshold") is not None:
            text += f" at score ≥ {state['threshold']:.2f}"
        if state.get("fpr") is not None:
            text += f" ({format_percent(state['fpr'])} healthy FPR)"
    if state.get("device"):
        text += f"; ran on {state['device']}"
    return text


def run_notes(state: dict) -> List[str]:
    """The worker's notes on a run (e.g. an out-of-memory retry with a smaller batch), one log line each."""
    return [f"Note: {note}" for note in state.get("notes") or []]
