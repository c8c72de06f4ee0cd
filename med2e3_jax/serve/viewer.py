"""What each event of the page does, as plain Python: load a scan, draw its planes, answer questions,
write the downloads. `app.py` wires these to Gradio; the tests call them directly.

Every reader error — whatever the library raises for a damaged file — comes back as a `Loaded` with
the message (server paths replaced by the upload's name) instead of an exception, so one bad file
never takes the server down; the upload itself is removed once read, good or bad.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from med2e3_jax import viz
from med2e3_jax.serve import scans as scans_lib
from med2e3_jax.serve.engine import Answer, Engine
from med2e3_jax.serve.scans import Scan
from med2e3_jax.serve.uploads import UploadFolder

log = logging.getLogger(__name__)

MAX_QUESTIONS = 6


@dataclasses.dataclass(frozen=True)
class Loaded:
    """The outcome of loading a scan: the scan (None on error) and the line the page shows."""

    scan: Scan | None
    message: str
    error: bool = False


def split_questions(text: str | None) -> list[str]:
    """One question per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


class Viewer:
    """The page's handlers over one engine, the embedded scans and the upload folder.

    Args:
      engine: the model.
      embedded: page name -> loader of each embedded scan (`scans.embedded_scans`); loaded once each.
      uploads: the private upload folder.
      max_questions: questions per request at most.
    """

    def __init__(self, engine: Engine, embedded: Mapping[str, Callable[[], Scan]], uploads: UploadFolder, *,
                 max_questions: int = MAX_QUESTIONS):
        self.engine = engine
        self.embedded = dict(embedded)
        self.uploads = uploads
        self.max_questions = max_questions
        self._loaded: dict[str, Scan] = {}

    @property
    def spec(self):
        return self.engine.spec

    # -----------------------------------------------------------------------------------------------
    # Loading.

    def load_embedded(self, name: str | None) -> Loaded:
        """An embedded scan by its page name (nothing else: the page cannot name a path)."""
        if not name:
            return Loaded(None, "pick an embedded scan or upload one")
        if name not in self.embedded:
            return Loaded(None, f"{name!r} is not one of the embedded scans: {', '.join(self.embedded)}", True)
        if name not in self._loaded:
            try:
                self._loaded[name] = self.embedded[name]()
            except Exception as error:  # the assets on disk can be damaged too
                log.exception("embedded scan %s", name)
                return Loaded(None, f"{name}: {type(error).__name__}: {error}", True)
        return _loaded(self._loaded[name])

    def load_upload(self, path: str | None) -> Loaded:
        """An uploaded `.nii` / `.nii.gz`, `.npy` or DICOM `.zip`, read and then removed."""
        if not path:
            return Loaded(None, "no file uploaded", True)
        name = pathlib.Path(path).name
        accepted = unzipped = None
        try:
            accepted = self.uploads.accept(path)
            source = accepted
            if name.lower().endswith(".zip"):
                unzipped = source = self.uploads.unzip_series(accepted)
            return _loaded(scans_lib.read_scan(source, self.spec, name=name))
        except Exception as error:  # any reader error is the file's, shown on the page
            log.info("upload %s refused: %s: %s", name, type(error).__name__, error)
            # The server's folders are none of the page's business: the upload's name stands for them.
            message = str(error)
            for inner in filter(None, (unzipped, accepted, path, self.uploads.root)):
                message = message.replace(str(inner), name)
            prefix = "" if message.startswith(name) else f"{name}: "
            return Loaded(None, f"{prefix}{message} ({type(error).__name__})", True)
        finally:
            if unzipped is not None:
                self.uploads.discard(unzipped)
            self.uploads.discard(path)

    # -----------------------------------------------------------------------------------------------
    # Showing.

    @staticmethod
    def views(scan: Scan | None, window: str, axial: int, coronal: int, sagittal: int):
        """The three planes (uint8 (height, width, 3) each), or three Nones without a scan."""
        if scan is None:
            return None, None, None
        return scans_lib.render_views(scan, window or scans_lib.MODEL_WINDOW, int(axial), int(coronal), int(sagittal))

    # -----------------------------------------------------------------------------------------------
    # Asking.

    def ask(self, scan: Scan | None, text: str | None) -> Iterator[list[Answer]]:
        """The answers to the questions in `text` (one per line), in order, each streamed as it grows;
        yields the whole list after every change."""
        questions = split_questions(text)
        if scan is None:
            yield [Answer("(no scan)", error="load a scan first: pick an embedded one or upload a file", done=True)]
            return
        if not questions:
            yield [Answer("(no question)", error="type a question (one per line for several)", done=True)]
            return
        if len(questions) > self.max_questions:
            yield [Answer(f"({len(questions)} questions)", done=True,
                          error=f"{len(questions)} questions; at most {self.max_questions} per request")]
            return
        answers = [Answer(q) for q in questions]
        for index, question in enumerate(questions):
            for answers[index] in self.engine.answer(question, scan.model_volume, name=scan.name):
                yield answers

    def save_outputs(self, scan: Scan | None, answers: list[Answer]) -> tuple[str | None, str | None]:
        """The figure (the paper's figure 4: one question, or the questions compared) and the answers
        as JSON, written to a new private folder; (None, None) without answered questions."""
        answered = [a for a in answers if a.slice_scores is not None and a.error is None]
        if scan is None or not answered:
            return None, None
        folder = self.uploads.new_folder("outputs")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", scan.name).strip("_") or "scan"
        if len(answered) == 1:
            figure = viz.slice_attention_figure(scan.model_volume, answered[0].slice_scores, answered[0].question,
                                                answer=answered[0].text)
        else:
            figure = viz.question_grid_figure(scan.model_volume, np.stack([a.slice_scores for a in answered]),
                                              [a.question for a in answered], answers=[a.text for a in answered])
        figure_path = viz.save_figure(figure, folder / f"{stem}_slices.png")
        records = [dict(question=a.question, answer=a.text, slice_scores=[float(s) for s in a.slice_scores],
                        tokens=len(a.tokens), first_token_s=a.first_token_s, total_s=a.total_s) for a in answered]
        answers_path = folder / f"{stem}_answers.json"
        answers_path.write_text(json.dumps(dict(scan=scan.name, answers=records), indent=1), encoding="utf-8")
        return figure_path, str(answers_path)


def _loaded(scan: Scan) -> Loaded:
    lines = [scan.summary()]
    if scan.note:
        lines.append(scan.note)
    if scan.questions:
        lines.append("try: " + " | ".join(scan.questions))
    return Loaded(scan, "\n".join(lines))
