"""Render what the BrainAnomaly module shows, from the same MRML nodes, without the Slicer application.

    python scripts/render_slicer_views.py -o Resources/Screenshots/slicer_overlay.png

Builds the demo case (bundled template, inserted lesion, oblique grid), runs the module's logic end to end (the
inference worker process, then the output nodes in an MRML scene), and renders axial, coronal and sagittal slice
views through MRML's slice logic: the scan, the heatmap as the foreground layer over it, the label map outlined,
with the lesion table below. Where Slicer itself can run, its own screenshot shows the same nodes.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "BrainAnomaly"):
    sys.path.insert(0, str(folder))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-o", "--output", default="Resources/Screenshots/slicer_overlay.png")
    p.add_argument("--model", help="model id or folder (default: the shipped default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--false-findings", type=float, help="operating point (default: the model's, 0.5 false findings "
                                                         "per healthy scan for a model calibrated for it)")
    g.add_argument("--fpr", type=float, help="a voxel threshold at this healthy FPR instead")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import slicer

    from BrainAnomalyLib.synth.demo import make_demo_case
    from BrainAnomalySlicer import nodes
    from BrainAnomalySlicer.logic import DetectionLogic, DetectionOptions
    from BrainAnomalySlicer.render import render_views

    scene = slicer.vtkMRMLScene()
    colours = slicer.vtkMRMLColorLogic()
    colours.SetMRMLScene(scene)
    scan, _ = make_demo_case()
    scan_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "demo T1")
    nodes.update_node_from_image(scan_node, scan)
    scan_node.CreateDefaultDisplayNodes()
    logic = DetectionLogic(scene)
    started = time.perf_counter()
    out = logic.detect(scan_node, DetectionOptions(model=args.model, device=args.device, fpr=args.fpr,
                                                   false_findings=args.false_findings))
    seconds = time.perf_counter() - started
    state = logic.state(out)
    lesions = logic.apply_threshold(out)["lesions"]
    views = render_views(scene, scan_node, out.heatmap, out.labelmap, 0.8, lesions[0]["centroid_ras"], size=360,
                         field_of_view_mm=190.0)

    fig = plt.figure(figsize=(12, 6.2), facecolor="black")
    for k, (view, title) in enumerate(zip(views, ("Axial", "Coronal", "Sagittal"))):
        ax = fig.add_axes([k / 3 + 0.005, 0.32, 1 / 3 - 0.01, 0.56])
        ax.imshow(view)
        ax.set_title(title, color="white", fontsize=11)
        ax.axis("off")
    model = state["model"]["name"]
    point = (f"{state['false_findings']:g} false findings per healthy scan" if state.get("false_findings")
             else f"threshold {state['threshold']:.2f} (healthy FPR {state['fpr']:.1%})")
    fig.text(0.01, 0.985, f"{scan_node.GetName()}  ·  model {model}  ·  {point}  ·  {len(lesions)} finding(s)  ·  "
             f"{seconds:.0f} s on {args.device}", color="white", fontsize=11, va="top")
    header = f"{'#':>3} {'volume mL':>10} {'peak':>7} {'healthy rate':>13} {'R':>8} {'A':>8} {'S':>8}"
    rows = [f"{les['label']:>3} {les['volume_ml']:>10.2f} {les['max_score']:>7.2f} "
            f"{les['healthy_rate'] if les.get('healthy_rate') is not None else '':>13} "
            f"{les['centroid_ras'][0]:>8.1f} {les['centroid_ras'][1]:>8.1f} {les['centroid_ras'][2]:>8.1f}"
            for les in lesions[:6]]
    fig.text(0.02, 0.29, "Lesion table (click a row in Slicer to jump there)\n" + header + "\n" + "\n".join(rows),
             color="white", family="monospace", fontsize=10, va="top")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=80, facecolor="black")
    print(f"wrote {args.output} ({len(lesions)} findings, {seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
