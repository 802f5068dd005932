"""The browser viewer end to end: the real trame server with its real MRML scene and worker process, driven through
the page in a real headless Chromium (the OS package, /usr/bin/chromium; `make install` apt-installs it where it
is missing): load the demo case, pick a model, detect, move the threshold slider, click a lesion, save, cancel a
run. Set BRAINANOMALY_VIEWER_SCREENSHOTS to a folder to keep the screenshots (docs/ has the README's)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

CHROMIUM = os.environ.get("BRAINANOMALY_CHROMIUM", "/usr/bin/chromium")
# The shipped default: it finds the demo's lesion, and one false finding that a stricter operating point drops
# (normative-t1-ixi alone, faster, finds only the lesion, so its slider would change nothing on this case).
MODEL = "ensemble-t1-ixi"
DETECT_SECONDS = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def viewer():
    from BrainAnomalyViewer.app import Viewer

    port, built = _free_port(), []

    def serve():
        # Built in the thread that serves it: the views' OpenGL contexts belong to the thread that made them.
        built.append(Viewer(server_name=f"viewer-test-{os.getpid()}"))
        built[0].start("127.0.0.1", port, thread=True)

    threading.Thread(target=serve, daemon=True).start()
    deadline = time.monotonic() + 180
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the viewer did not start listening"
            time.sleep(0.2)
    yield built[0], f"http://127.0.0.1:{port}/"
    built[0].session.cancel()


@pytest.fixture(scope="module")
def page(viewer):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: `make install` apt-installs chromium (as root)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1280, "height": 760})
        pg.set_default_timeout(60_000)
        pg.goto(viewer[1])
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory, demo_case):
    path = tmp_path_factory.mktemp("viewer") / "demo.nrrd"
    sitk.WriteImage(demo_case[0], str(path))
    return path


def _screenshot(pg, tmp_path: Path, name: str) -> None:
    from PIL import Image

    keep = os.environ.get("BRAINANOMALY_VIEWER_SCREENSHOTS")
    if keep:
        time.sleep(3)  # the overlay's frames reach the page: only a kept picture needs them, nothing checks pixels
    path = tmp_path / name
    pg.screenshot(path=str(path))
    if keep:
        image = Image.open(path).convert("RGB")
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
        image.quantize(colors=192).save(Path(keep) / name, optimize=True)


def _rows(pg):
    return pg.locator("#lesions tbody tr")


def _wait_for_views(pg) -> None:
    """Until every view streams a picture (the views render on the server; the first frames take a while)."""
    pg.wait_for_function("Array.from(document.querySelectorAll('img')).filter(i => i.naturalWidth > 0).length >= 4",
                         timeout=240_000)


def _load(pg, path) -> None:
    pg.locator("#input-path").fill(str(path))
    pg.locator("#load").click()
    pg.locator("#message").filter(has_text="Loaded").wait_for()


def _labels(v):
    from BrainAnomalySlicer import nodes

    return nodes.node_array(v.session.outputs.labelmap).copy()


def _slide(pg, v, fraction: float):
    """Click the threshold slider's track at `fraction` of its length; (false findings, table rows, label map) once
    the page and the nodes have followed."""
    from playwright.sync_api import expect

    before = pg.locator("#threshold-text").inner_text()
    track = pg.locator(".threshold-slider .v-slider-track").bounding_box()
    pg.mouse.click(track["x"] + track["width"] * fraction, track["y"] + track["height"] / 2)
    expect(pg.locator("#threshold-text")).not_to_have_text(before)
    state = v.session.state()
    n = v.session.outputs.table.GetTable().GetNumberOfRows()
    assert state["n_lesions"] == n
    expect(_rows(pg)).to_have_count(n)
    return state["false_findings"], n, _labels(v)


def test_viewer_end_to_end(viewer, page, demo_file, tmp_path):
    from playwright.sync_api import expect

    from BrainAnomalySlicer import nodes

    v, _ = viewer
    pg = page
    expect.set_options(timeout=60_000)  # a loaded CI machine: the worker's start and the re-thresholds take seconds
    _load(pg, demo_file)
    assert v.session.input_node is not None and v.session.input_node.GetName() == "demo"
    _wait_for_views(pg)

    # The model from the registry, with its description.
    pg.locator(".model-select").click()
    pg.get_by_role("option", name=f"{MODEL} (T1, default)").click()
    expect(pg.locator("#model-details")).to_contain_text("ensemble of dpa-t1-ixi, cae-t1-ixi, normative-t1-ixi")
    pg.locator("#bias-correction").uncheck()  # the slowest step, and the demo case has no bias field

    pg.locator("#detect").click()
    expect(pg.locator("#cancel")).to_be_visible()
    expect(pg.locator("#progress")).to_be_visible()
    expect(pg.locator("#message")).to_contain_text("Done", timeout=DETECT_SECONDS * 1000)
    expect(pg.locator("#cancel")).to_be_hidden()
    out = v.session.outputs
    assert set(out.nodes()) >= {"heatmap", "labelmap", "segmentation", "table"}
    assert out.heatmap.GetAttribute(nodes.ROLE_ATTRIBUTE) == "heatmap"
    state = v.session.state()
    assert state["model"]["name"] == MODEL and state["false_findings"] is not None
    n = out.table.GetTable().GetNumberOfRows()
    assert n >= 1 and _rows(pg).count() == n
    expect(pg.locator("#threshold-text")).to_contain_text("false finding")
    labels_before = _labels(v)
    _screenshot(pg, tmp_path, "viewer_detect.png")

    # The slider, in false findings per healthy scan: at its bottom fewer findings are reported, at its top more.
    strict_ff, strict_rows, strict_labels = _slide(pg, v, 0.01)
    loose_ff, n_loose, labels_loose = _slide(pg, v, 0.99)
    assert strict_ff < state["false_findings"] < loose_ff
    assert strict_rows <= n <= n_loose and strict_rows < n_loose, (strict_rows, n, n_loose)
    assert strict_labels.sum() < labels_loose.sum()
    assert not strict_labels[labels_before == 0].any() and labels_loose[labels_before > 0].all()

    # A click on a row centres every slice view on that lesion.
    row = 0  # the rarest finding in healthy scans
    _rows(pg).nth(row).click()
    expect(pg.locator("#message")).to_contain_text(f"Lesion {row + 1} at")
    ras = nodes.lesion_position(out.table, row)
    scene = v.session.scene
    slices = [scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
              for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))]
    assert len(slices) >= 3
    for node in slices:
        m = node.GetSliceToRAS()
        assert np.allclose([m.GetElement(r, 3) for r in range(3)], ras, atol=0.5), node.GetName()
    _screenshot(pg, tmp_path, "viewer_lesion.png")

    # Save: the nodes as they stand, into a new folder.
    target = tmp_path / "saved"
    pg.locator("#output-path").fill(str(target))
    pg.locator("#save").click()
    expect(pg.locator("#message")).to_contain_text("Saved to")
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(target / "pred_mask.nrrd")))
    assert np.array_equal(saved > 0, labels_loose > 0)
    assert len((target / "lesions.csv").read_text(encoding="utf-8").strip().splitlines()) == n_loose + 1
    pg.locator("#save").click()  # the folder is no longer empty: refused in one line, nothing changed
    expect(pg.locator("#message")).to_contain_text("not a new or empty folder")
    # DICOM export needs the scan from its DICOM folder (the export itself: test_viewer_session.py).
    pg.locator("#dicom-path").fill(str(tmp_path / "dicom"))
    pg.locator("#export-dicom").click()
    expect(pg.locator("#message")).to_contain_text("not a DICOM series folder")
    assert not (tmp_path / "dicom").exists()

    # Minimum size: only findings at least that large stay, without a model run.
    pg.locator("#min-size").fill("1")
    deadline = time.monotonic() + 30
    while v.session.state()["min_lesion_ml"] != 1.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    big = v.session.lesion_rows()
    assert all(r["volume_ml"] >= 1.0 for r in big) and len(big) < n_loose
    expect(_rows(pg)).to_have_count(len(big))

    # Cancel: a fresh scan, a run stopped midway, and the scene as it was before the run.
    _load(pg, demo_file)
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    assert v.session.output_node_names() == []
    pg.locator("#detect").click()
    expect(pg.locator("#cancel")).to_be_visible()
    expect(pg.locator("#progress")).to_be_visible()
    run = v.session.run
    assert run is not None and run.state == "running"
    pg.locator("#cancel").click()
    expect(pg.locator("#message")).to_contain_text("Cancelled", timeout=60_000)
    assert v.session.run is None and run.state == "cancelled" and not run.process.running
    assert not run.workdir.exists()
    assert v.session.output_node_names() == []
    assert {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())} == before
    assert _rows(pg).count() == 0


def test_taken_port_is_one_line_and_exit_2(capsys):
    """`brainanomaly view` on a port in use: one line, exit code 2, before anything heavy is built."""
    from BrainAnomalyLib.cli.main import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["view", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"port {port} on 127.0.0.1 is taken" in err


def test_parser_does_not_import_trame():
    import subprocess
    import sys

    code = ("import sys; from BrainAnomalyLib.cli.main import build_parser; build_parser(); "
            "sys.exit(any(m == 'trame' or m.startswith(('trame.', 'trame_', 'BrainAnomalyViewer')) "
            "for m in sys.modules))")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    assert subprocess.run([sys.executable, "-c", code], cwd=root, env=env).returncode == 0


def test_screenshots_in_readme_exist():
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    for name in ("viewer_detect.png", "viewer_lesion.png"):
        assert f"docs/{name}" in readme and (root / "docs" / name).is_file()

