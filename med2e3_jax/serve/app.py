"""The page in Gradio: the layout, the events wired to `Viewer`'s handlers, and the launch.

    ┌ scan: embedded ▾ / upload ┐ ┌ axial view ─────────┐ ┌ slice scores, Q1 Q2 … ┐
    │ status / reader's error   │ │ axial slider        │ │ one row per slice     │
    │ window: lung | soft | … │ └─────────────────────┘ └───────────────────────┘
    │ questions (one per line)  │ ┌ coronal ┐ ┌ sagittal ┐
    │ [Ask]  ⤓ figure ⤓ answers │ └─────────┘ └──────────┘   answers side by side
    └───────────────────────────┘

Gradio because the field's demos (M3D-LaMed, CT-CHAT) use it, it streams a generator's outputs to the
page, queues events (`concurrency_limit=1` on the model's events: concurrent users wait their turn
while the planes stay responsive), bounds uploads (`max_file_size`) and serves only files under its
cache folder — here the server's private folder (`GRADIO_TEMP_DIR`, see uploads.py) — and
`allowed_paths`, which stays empty.
"""

from __future__ import annotations

import logging
import os

import gradio as gr

from med2e3_jax.serve import page
from med2e3_jax.serve.scans import MODEL_WINDOW, WINDOWS, plane_positions
from med2e3_jax.serve.viewer import Viewer

log = logging.getLogger(__name__)

UPLOAD_TYPES = [".nii", ".gz", ".npy", ".zip"]  # Gradio matches the last suffix: .nii.gz is checked server side
INTRO = ("### Med-2E3: ask about a CT, see where the model looked\n"
         "Pick an embedded scan or upload one, ask one question per line, and watch the answers arrive; the "
         "bars beside the axial view are the TG-IS slice scores of each question (click a row to show that "
         "slice).")


def build_app(viewer: Viewer):
    """The gr.Blocks of the page (not launched). Set GRADIO_TEMP_DIR before calling (`launch` does)."""

    def scan_outputs(loaded):
        """Outputs of a load: the scan, its status line, the sliders and planes; on error the status only."""
        status = page.status_html(loaded.message, error=loaded.error)
        if loaded.scan is None:
            return (gr.skip(), status) + (gr.skip(),) * 10 + (None,)
        scan = loaded.scan
        slices, rows, columns = plane_positions(scan)
        positions = slices // 2, rows // 2, columns // 2
        images = viewer.views(scan, MODEL_WINDOW, *positions)
        sliders = tuple(gr.update(maximum=n - 1, value=p) for n, p in zip((slices, rows, columns), positions))
        placeholder = "\n".join(scan.questions) or "Which organ shows a lesion?"
        return (scan, status, *sliders, *images, gr.update(value="", placeholder=placeholder), "", "", [], None)

    def on_embedded(name):
        return scan_outputs(viewer.load_embedded(name))

    def on_upload(path):
        return scan_outputs(viewer.load_upload(path))

    def on_views(scan, window, axial, coronal, sagittal, answers):
        images = viewer.views(scan, window, axial, coronal, sagittal)
        bars = page.bars_html(answers, scan.slices, int(axial)) if scan is not None else ""
        return (*images, bars)

    def on_ask(scan, text, axial):
        answers = []
        for answers in viewer.ask(scan, text):
            bars = page.bars_html(answers, scan.slices, int(axial)) if scan is not None else ""
            yield page.answers_html(answers), bars, answers, gr.skip(), gr.skip()
        figure, table = viewer.save_outputs(scan, answers)
        yield (gr.skip(), gr.skip(), answers, gr.update(value=figure, interactive=figure is not None),
               gr.update(value=table, interactive=table is not None))

    def on_bar_click(evt: gr.EventData):
        return int(evt.slice)

    image = dict(interactive=False, format="png", buttons=["download", "fullscreen"])
    with gr.Blocks(title="Med-2E3 viewer", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        scan_state = gr.State(None)
        answers_state = gr.State([])
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                embedded = gr.Dropdown(choices=list(viewer.embedded), value=None, label="Embedded scan",
                                       elem_id="embedded")
                upload = gr.File(label="or upload: .nii / .nii.gz, .npy, a DICOM series as .zip",
                                 file_types=UPLOAD_TYPES, type="filepath", elem_id="upload")
                status = gr.HTML(page.status_html("pick an embedded scan or upload one"), elem_id="scan-status",
                                 js_on_load=None)
                window = gr.Radio(list(WINDOWS), value=MODEL_WINDOW, label="Window", elem_id="window")
                questions = gr.Textbox(label="Questions (one per line)", lines=3, elem_id="questions",
                                       placeholder="Which organ shows a lesion?")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                figure_file = gr.DownloadButton("Download the figure", interactive=False, elem_id="download-figure")
                answers_file = gr.DownloadButton("Download the answers", interactive=False,
                                                 elem_id="download-answers")
            with gr.Column(scale=3):
                with gr.Row():
                    with gr.Column(scale=3):
                        axial_image = gr.Image(label="Axial", elem_id="axial", height=420, **image)
                        axial = gr.Slider(0, 31, value=0, step=1, label="Axial slice (superior → inferior)",
                                          elem_id="axial-slider")
                    with gr.Column(scale=2):
                        bars = gr.HTML("", js_on_load=page.BARS_JS, elem_id="bars")
                with gr.Row():
                    with gr.Column():
                        coronal_image = gr.Image(label="Coronal", elem_id="coronal", height=300, **image)
                        coronal = gr.Slider(0, 1, value=0, step=1, label="Coronal position (anterior → posterior)",
                                            elem_id="coronal-slider")
                    with gr.Column():
                        sagittal_image = gr.Image(label="Sagittal", elem_id="sagittal", height=300, **image)
                        sagittal = gr.Slider(0, 1, value=0, step=1, label="Sagittal position (right → left)",
                                             elem_id="sagittal-slider")
                answers_box = gr.HTML("", elem_id="answers", js_on_load=None)

        load_outputs = [scan_state, status, axial, coronal, sagittal, axial_image, coronal_image, sagittal_image,
                        questions, answers_box, bars, answers_state, upload]
        embedded.input(on_embedded, embedded, load_outputs, concurrency_id="load")
        upload.upload(on_upload, upload, load_outputs, concurrency_id="load")
        view_inputs = [scan_state, window, axial, coronal, sagittal, answers_state]
        for control in (window, axial, coronal, sagittal):
            control.change(on_views, view_inputs, [axial_image, coronal_image, sagittal_image, bars],
                           trigger_mode="always_last", concurrency_limit=None, show_progress="hidden")
        ask.click(on_ask, [scan_state, questions, axial], [answers_box, bars, answers_state, figure_file, answers_file],
                  concurrency_limit=1, concurrency_id="model", show_progress="minimal")
        bars.click(on_bar_click, None, axial, concurrency_limit=None, show_progress="hidden")
    return demo


def launch(viewer: Viewer, *, host: str = "127.0.0.1", port: int = 7860, max_file_size: int | None = None,
           block: bool = True, max_queue: int = 64):
    """Builds the page and serves it at http://HOST:PORT; returns the gr.Blocks (at once when not `block`,
    else when the server stops). Gradio's cache is the viewer's private upload folder."""
    os.environ["GRADIO_TEMP_DIR"] = str(viewer.uploads.root)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_app(viewer)
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    demo.launch(server_name=host, server_port=port, max_file_size=max_file_size, css=page.CSS, show_error=True,
                allowed_paths=[], ssr_mode=False, quiet=True, prevent_thread_lock=not block, inbrowser=False,
                share=False)
    return demo
