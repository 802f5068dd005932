"""The viewer's page: trame-slicer's three slice views and 3D view of one MRML scene beside a panel (load, model,
detect with progress and cancel, threshold in the lesion-level operating point's units, opacity, minimum size,
lesion table, save, export to DICOM, load a DICOM SEG). The panel only calls ViewerSession; the views render the
scene server-side and stream images.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Optional

from trame.app import get_server
from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_server.utils.asynchronous import create_task
from trame_slicer import module as trame_slicer_module
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories

from BrainAnomalyLib.core.errors import BrainAnomalyError
from BrainAnomalySlicer import panel
from BrainAnomalySlicer.logic import DetectionError

from .session import ViewerSession

LAYOUT = "Quad View"  # trame-slicer's: coronal and sagittal | 3D and axial
POLL_SECONDS = 0.2
# Columns of the page's lesion table: (column of the module's table node, heading, decimals).
TABLE_COLUMNS = (("label", "#", 0), ("volume_ml", "mL", 2), ("max_score", "peak", 2),
                 ("healthy_rate", "healthy rate", 3), ("centroid_r", "R", 1), ("centroid_a", "A", 1),
                 ("centroid_s", "S", 1))


class Viewer:
    """The trame server, its Slicer scene and views, and the panel bound to a ViewerSession."""

    def __init__(self, server_name: str = "brainanomaly-view", python: Optional[str] = None,
                 model: Optional[str] = None) -> None:
        self.server = get_server(server_name, client_type="vue3")
        # The viewer's options are brainanomaly's; trame must not read its own from the command line it was run
        # from (pytest's or brainanomaly's arguments would be taken for trame's --port and others).
        cli = self.server.cli
        cli.parse_known_args = functools.partial(type(cli).parse_known_args, cli, [])
        self.server.enable_module(trame_slicer_module)
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout(LAYOUT)
        self.session = ViewerSession(self.slicer.scene, python)
        self._init_state(model)
        self._build_ui()
        self.state.change("threshold_position")(self._on_threshold)
        self.state.change("opacity")(self._on_opacity)
        self.state.change("min_lesion_ml")(self._on_min_size)

    @property
    def state(self):
        return self.server.state

    # -- state --
    def _init_state(self, model: Optional[str]) -> None:
        models = self.session.models()
        default = next((m["id"] for m in models if m["default"]), models[0]["id"] if models else None)
        chosen = model if any(m["id"] == model for m in models) else default
        self.state.update({
            "trame__title": "BrainAnomaly viewer",
            "input_path": "", "input_name": "", "models": models, "model": chosen,
            "bias_correction": True, "skull_strip": True, "registration": True,
            "running": False, "progress": 0, "step": "",
            "has_outputs": False, "threshold_position": panel.false_findings_to_slider(None),
            "threshold_min": panel.FINDINGS_SLIDER_MIN, "threshold_max": panel.FINDINGS_SLIDER_MAX,
            "threshold_text": "", "opacity": self.session.opacity, "min_lesion_ml": 0.05,
            "lesions": [], "table_columns": [{"key": k, "title": t, "digits": d} for k, t, d in TABLE_COLUMNS],
            "selected_lesion": -1, "output_path": "", "dicom_path": "", "seg_path": "", "message": "",
            "error": False,
        })

    def _say(self, message: str, error: bool = False) -> None:
        self.state.message, self.state.error = message, error

    def _fail(self, exc: BaseException) -> None:
        self._say(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, error=True)

    def _show_outputs(self) -> None:
        """Push the outputs' threshold, text and table to the page."""
        s = self.session
        self.state.has_outputs = s.outputs is not None
        if s.outputs is None:
            self.state.update({"lesions": [], "threshold_text": "", "selected_lesion": -1})
            return
        if s.threshold_unit() == panel.FINDINGS:
            lo, hi = panel.FINDINGS_SLIDER_MIN, panel.FINDINGS_SLIDER_MAX
        else:
            lo, hi = panel.SLIDER_MIN, panel.SLIDER_MAX
        self.state.update({"threshold_min": lo, "threshold_max": hi, "threshold_text": s.threshold_text(),
                           "lesions": self._rows(), "selected_lesion": -1})

    def _rows(self):
        rows = []
        for row in self.session.lesion_rows():
            rows.append({key: (None if row[key] != row[key] else round(row[key], digits))
                         for key, _, digits in TABLE_COLUMNS})
        return rows

    # -- actions --
    def open_scan(self, path) -> None:
        """Load a scan and show it in every view (raises the reader's one-line errors)."""
        node = self.session.load(path)
        self.slicer.display_manager.show_volume(node, do_reset_views=True)
        self.state.update({"input_name": node.GetName(), "input_path": str(path)})
        self._show_outputs()
        self._say(f"Loaded {node.GetName()}")

    def load(self) -> None:
        try:
            self.open_scan(self.state.input_path)
        except (BrainAnomalyError, DetectionError) as exc:
            self._fail(exc)

    def detect(self) -> None:
        if self.session.input_node is None:
            self._say("load a volume first", error=True)
            return
        try:
            self.session.start(self.state.model, self._on_event, bias_correction=self.state.bias_correction,
                               skull_strip=self.state.skull_strip, registration=self.state.registration,
                               min_lesion_ml=float(self.state.min_lesion_ml))
        except (BrainAnomalyError, DetectionError) as exc:
            self._fail(exc)
            return
        self.state.update({"running": True, "progress": 0, "step": "starting"})
        self._say("Detecting…")
        create_task(self._watch())

    def cancel(self) -> None:
        self.session.cancel()
        self._say("Cancelling…")

    async def _watch(self) -> None:
        """Drive the run from the server's event loop, so the page stays live while the worker works."""
        while True:
            with self.state:
                try:
                    ended = self.session.poll()
                except DetectionError as exc:
                    self.state.running = False
                    self._fail(exc)
                    return
                if ended is not None:
                    self.state.running = False
                    if ended == "done":
                        self.state.threshold_position = self.session.slider_position()
                        self._show_outputs()
                        self._say("Done: " + self.state.threshold_text)
                        self.slicer.display_manager.set_node_visible_in_group(self.session.outputs.segmentation)
                        self._show_3d()
                    else:
                        self._say("Cancelled; nothing was added to the scene")
                    return
            await asyncio.sleep(POLL_SECONDS)

    def _show_3d(self) -> None:
        """The findings as surfaces in the 3D view, among the three slice planes (overlay included) in place of the
        scan's volume rendering, which would hide them."""
        outputs = self.session.outputs
        if outputs is None:
            return
        vr = self.slicer.volume_rendering.get_vr_display_node(self.session.input_node)
        if vr is not None:
            vr.SetVisibility(False)
        scene = self.slicer.scene
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").SetSliceVisible(True)
        seg = outputs.segmentation
        if seg is not None and seg.GetSegmentation().GetNumberOfSegments():
            seg.CreateClosedSurfaceRepresentation()

    def _on_event(self, event: dict) -> None:
        progress = panel.progress_state(event)
        if progress is not None:
            self.state.progress, self.state.step = progress[0], str(event.get("step") or "")

    def _rethreshold(self, action) -> None:
        if self.session.outputs is None or self.session.running:
            return
        try:
            action()
        except (BrainAnomalyError, DetectionError) as exc:
            self._fail(exc)
            return
        self._show_outputs()
        self._show_3d()

    def _on_threshold(self, threshold_position, **_) -> None:
        self._rethreshold(lambda: self.session.set_threshold(float(threshold_position)))

    def _on_min_size(self, min_lesion_ml, **_) -> None:
        try:
            value = float(min_lesion_ml)
        except (TypeError, ValueError):
            return
        self._rethreshold(lambda: self.session.set_min_size(max(value, 0.0)))

    def _on_opacity(self, opacity, **_) -> None:
        self.session.set_opacity(float(opacity))

    def jump(self, row: int) -> None:
        ras = self.session.jump_to_lesion(int(row))
        if ras is not None:
            self.state.selected_lesion = int(row)
            self._say("Lesion {} at R {:.1f}, A {:.1f}, S {:.1f}".format(int(row) + 1, *ras))

    def save(self) -> None:
        try:
            folder = self.session.save(self.state.output_path)
        except (BrainAnomalyError, DetectionError, OSError) as exc:
            self._fail(exc)
            return
        self._say(f"Saved to {folder}")

    def export_dicom(self) -> None:
        try:
            paths = self.session.export_dicom(self.state.dicom_path)
        except (BrainAnomalyError, DetectionError, OSError) as exc:
            self._fail(exc)
            return
        self._say(f"Exported {', '.join(p.name for p in paths)} to {paths[0].parent}")

    def load_segmentation(self) -> None:
        try:
            node = self.session.load_segmentation(self.state.seg_path)
        except (BrainAnomalyError, DetectionError, OSError) as exc:
            self._fail(exc)
            return
        self._say(f"DICOM SEG {node.GetName()} shown as a label map")

    # -- page --
    def _build_ui(self) -> None:
        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            layout.title.set_text("BrainAnomaly viewer")
            with layout.drawer as drawer:
                drawer.width = 470
                self._panel()
            with layout.content:
                with html.Div(style="height: calc(100vh - 64px); width: 100%; display: flex;"):
                    self.layout_manager.initialize_layout_grid(layout)
        self.ui = layout

    def _panel(self) -> None:
        with v3.VContainer(classes="pa-3", fluid=True):
            v3.VTextField(v_model=("input_path",), label="Volume file or DICOM folder (on this computer)",
                          density="compact", hide_details=True, id="input-path")
            v3.VBtn("Load", click=self.load, block=True, classes="my-2", id="load", disabled=("running",))
            v3.VTextField(v_model=("seg_path",), label="DICOM SEG file of the open series", density="compact",
                          hide_details=True, id="seg-path")
            v3.VBtn("Load DICOM SEG", click=self.load_segmentation, block=True, classes="my-2", id="load-seg",
                    disabled=("running || !input_name",))
            v3.VSelect(v_model=("model",), items=("models",), item_title="title", item_value="id", label="Model",
                       density="compact", hide_details=True, classes="model-select", disabled=("running",))
            html.Div("{{ (models.find(m => m.id === model) || {}).details }}", classes="text-caption my-1",
                     style="white-space: pre-line", id="model-details")
            with html.Div(classes="d-flex flex-wrap"):
                for key, text in (("skull_strip", "Skull-strip"), ("bias_correction", "Bias correction"),
                                  ("registration", "Registration")):
                    v3.VCheckbox(v_model=(key,), label=text, density="compact", hide_details=True,
                                 disabled=("running",), id=key.replace("_", "-"))
            v3.VBtn("Detect anomalies", v_if="!running", click=self.detect, block=True, color="primary",
                    disabled=("!input_name",), id="detect")
            v3.VBtn("Cancel", v_else=True, click=self.cancel, block=True, color="error", id="cancel")
            v3.VProgressLinear(model_value=("progress",), v_show="running", height=18, classes="my-2",
                               children=["{{ step }} {{ progress }} %"], id="progress")
            with html.Div(v_show="has_outputs", id="outputs"):
                html.Div("Threshold: {{ threshold_text }}", classes="text-body-2 mt-3", id="threshold-text")
                v3.VSlider(v_model=("threshold_position",), min=("threshold_min",), max=("threshold_max",),
                           step=0.01, density="compact", hide_details=True, classes="threshold-slider")
                v3.VSlider(v_model=("opacity",), min=0, max=1, step=0.05, label="Opacity", density="compact",
                           hide_details=True, id="opacity")
                v3.VTextField(v_model=("min_lesion_ml",), type="number", step=0.05, min=0,
                              label="Minimum lesion size (mL)", density="compact", hide_details=True,
                              id="min-size")
                with v3.VTable(density="compact", hover=True, id="lesions", classes="my-2"):
                    with html.Thead():
                        with html.Tr():
                            html.Th("{{ c.title }}", v_for="c in table_columns", key="c.key")
                    with html.Tbody():
                        with html.Tr(v_for="(row, i) in lesions", key="i", click=(self.jump, "[i]"),
                                     style="cursor: pointer",
                                     classes=("{'bg-amber-lighten-4': i === selected_lesion}",)):
                            html.Td("{{ row[c.key] === null ? '' : row[c.key].toFixed(c.digits) }}",
                                    v_for="c in table_columns", key="c.key")
                v3.VTextField(v_model=("output_path",), label="Save into (new or empty folder)",
                              density="compact", hide_details=True, id="output-path")
                v3.VBtn("Save outputs", click=self.save, block=True, classes="my-2", id="save",
                        disabled=("running",))
                v3.VTextField(v_model=("dicom_path",), label="Export DICOM SEG and map into (new or empty folder)",
                              density="compact", hide_details=True, id="dicom-path")
                v3.VBtn("Export to DICOM", click=self.export_dicom, block=True, classes="my-2", id="export-dicom",
                        disabled=("running",))
            html.Div("{{ message }}", classes=("error ? 'text-error mt-2' : 'text-medium-emphasis mt-2'",),
                     id="message")

    def start(self, host: str, port: int, open_browser: bool = False, thread: bool = False):
        """Serve the page; blocking unless `thread` (tests)."""
        return self.server.start(host=host, port=port, open_browser=open_browser, thread=thread,
                                 show_connection_info=not thread)


def serve(host: str = "127.0.0.1", port: int = 8080, input_path: Optional[str] = None, model: Optional[str] = None,
          open_browser: bool = False) -> None:
    """Build the viewer (loading `input_path` first, if given) and serve it until Ctrl-C; the port was checked by
    the caller (`brainanomaly view`), before anything was built."""
    viewer = Viewer(model=model)
    if input_path:
        viewer.open_scan(input_path)
    print(f"BrainAnomaly viewer on http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        viewer.start(host, port, open_browser=open_browser)
    finally:
        viewer.session.close()
