"""The viewer's handlers without a browser (med2e3_jax/serve): streamed answers equal `generate`'s, one
compilation for every question and scan, uploads read, refused and removed, the page's bars and
answers, the downloads. The page in a real browser: tests/test_serve_browser.py."""

import json
import os
import pathlib
import re
import sys
import zipfile

import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402
from data_pipelines import synthetic  # noqa: E402
from data_pipelines.assets import AssetError, asset_path  # noqa: E402
from med2e3_jax.generate import GenerationConfig, generate  # noqa: E402
from med2e3_jax.models.med2e3 import Med2E3  # noqa: E402
from med2e3_jax.serve import page, scans  # noqa: E402
from med2e3_jax.serve.engine import Answer, Engine  # noqa: E402
from med2e3_jax.serve.uploads import UploadFolder  # noqa: E402
from med2e3_jax.serve.viewer import Viewer, split_questions  # noqa: E402

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def engine():
    try:
        paths = asset_path("tokenizers/phi3"), asset_path("minilm")
    except AssetError as error:
        pytest.skip(f"tokenizer assets not fetched: {error}")
    model = Med2E3(tiny.tiny_model(), rngs=nnx.Rngs(0))
    engine = Engine.from_paths(model, *paths, question_max_length=32, max_new_tokens=MAX_NEW_TOKENS)
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    """Two phantoms, as .npy (model resolution) and NIfTI (HU)."""
    folder = tmp_path_factory.mktemp("phantoms")
    synthetic.generate(folder, num=2, seed=3, shape=(32, 64, 64), formats=("npy", "nifti"), contrast="enhanced")
    return sorted((folder / "npy").glob("*.npy")), sorted((folder / "nifti").glob("*.nii.gz"))


@pytest.fixture
def viewer(engine, tmp_path):
    uploads = UploadFolder(8 << 20, root=tmp_path / "private")
    viewer = Viewer(engine, scans.write_phantoms(uploads.folder("embedded"), engine.spec, num=1), uploads)
    yield viewer
    uploads.close()


def _upload(viewer, source: bytes | pathlib.Path, name: str) -> pathlib.Path:
    """A file placed as Gradio places an upload: in its own subfolder of the private folder."""
    folder = viewer.uploads.new_folder("gradio")
    path = folder / name
    path.write_bytes(source.read_bytes() if isinstance(source, pathlib.Path) else source)
    return path


def _empty_or_absent(folder: pathlib.Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def _last(iterator):
    last = None
    for last in iterator:
        pass
    return last


# ---------------------------------------------------------------------------------------------------
# The engine.


def test_streamed_answer_has_generates_greedy_tokens_and_slice_scores(engine, phantom_files):
    volume = scans.read_scan(phantom_files[1][0], engine.spec).model_volume
    for question in ("Which organ shows a lesion?", "Is there a lesion in the liver? Describe its size."):
        answer = _last(engine.answer(question, volume))
        inputs = engine.prompt_inputs(question, volume)
        config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, eos_ids=engine.eos_ids,
                                  pad_id=engine.tokenizer.pad_token_id)
        reference = generate(engine.model, inputs["volume"], inputs["input_ids"], inputs["attention_mask"],
                             inputs["question_ids"], inputs["question_mask"], config=config,
                             tokenizer=engine.tokenizer)
        assert answer.done and answer.error is None
        assert answer.tokens == reference.tokens[0, : reference.lengths[0]].tolist()
        assert answer.text == reference.texts[0]
        np.testing.assert_allclose(answer.slice_scores, reference.slice_scores[0], rtol=1e-6, atol=1e-7)


def test_scores_come_before_the_first_token_and_every_token_is_streamed(engine):
    volume = np.random.default_rng(0).random((1, 32, 64, 64), dtype=np.float32)
    states = [(a.slice_scores is not None, len(a.tokens), a.done) for a in engine.answer("Where is the heart?", volume)]
    assert states[0] == (True, 0, False)  # the slice scores, no token yet
    counts = [tokens for _, tokens, _ in states[1:]]
    assert counts == sorted(counts) and counts[0] == 1 and states[-1][2]
    assert len(set(counts[:-1])) == len(counts[:-1])  # one update per token


def test_encode_prefill_and_step_compile_once_for_all_questions_and_scans(engine, phantom_files):
    before = dict(engine.traces)
    assert before == {"encode": 1, "prefill": 1, "step": 1}  # warm_up compiled each once
    for path in (phantom_files[0][0], phantom_files[1][1]):
        volume = scans.read_scan(path, engine.spec).model_volume
        for question in ("Organ?", "Which part of the scan does the lesion in the right kidney span?"):
            _last(engine.answer(question, volume))
    assert dict(engine.traces) == before


def test_a_question_the_prompt_cannot_hold_ends_with_the_message(engine):
    volume = np.zeros((1, 32, 64, 64), np.float32)
    answer = _last(engine.answer("lesion " * 200, volume))
    assert answer.done and answer.tokens == [] and "max_length" in answer.error


# ---------------------------------------------------------------------------------------------------
# Scans and views.


def test_axial_slice_k_of_the_page_is_the_models_slice_k(engine, phantom_files):
    scan = scans.read_scan(phantom_files[1][0], engine.spec)
    assert scan.calibrated and scan.display.shape[0] == scan.model_volume.shape[1] == 32
    # The display copy under the model's window, min-max scaled, against the model's input slice by slice.
    low, high = engine.spec.hu_window
    shown = np.clip((scan.display - low) / (high - low), 0, 1)
    shown = (shown - shown.min()) / (shown.max() - shown.min())
    model = scan.model_volume[0]
    from data_pipelines.preprocess import resize

    shown = resize(shown, model.shape)
    errors = np.abs(shown[:, None] - model[None]).mean(axis=(2, 3))  # (display slice, model slice)
    assert (np.argmin(errors, axis=1) == np.arange(32)).all()
    assert np.abs(shown - model).mean() < 0.02


def test_window_presets_map_their_bounds_to_black_and_white():
    hu = np.array([[-2000.0, -1350.0, -600.0, 150.0, 3000.0]])
    np.testing.assert_array_equal(scans.window_image(hu, scans.WINDOWS["lung"]), [[0, 0, 128, 255, 255]])
    np.testing.assert_array_equal(scans.window_image(np.array([[-160.0, 40.0, 240.0]]), scans.WINDOWS["soft tissue"]),
                                  [[0, 128, 255]])


def test_views_are_the_three_planes_at_the_given_positions(engine, phantom_files):
    scan = scans.read_scan(phantom_files[1][0], engine.spec)
    slices, rows, columns = scan.display.shape
    axial, coronal, sagittal = scans.render_views(scan, "bone", 7, 3, 5)
    factor = scans.VIEW_PIXELS // max(rows, columns)
    assert axial.shape == (rows * factor, columns * factor, 3) and axial.dtype == np.uint8
    assert coronal.shape[1] == columns * factor and sagittal.shape[1] == rows * factor
    # Away from the crosshair (row 3, column 5), a pixel is the window of its voxel.
    expected = scans.window_image(scan.display[7], scans.WINDOWS["bone"])
    r, c = rows - 1, columns - 1
    assert (axial[r * factor, c * factor] == expected[r, c]).all()
    assert (axial[3 * factor, c * factor] != expected[3, c]).any()  # on the crosshair: marked
    # The axial position is marked on the coronal view: its rows differ from the unmarked grey.
    plain = scans.render_views(scan, "bone", 20, 3, 5)[1]
    assert (coronal != plain).any()


def test_a_npy_volume_is_shown_on_the_models_window(engine, phantom_files):
    scan = scans.read_scan(phantom_files[0][0], engine.spec)
    assert not scan.calibrated and scan.display.min() >= -1000 and scan.display.max() <= 1000
    assert "[0, 1]" in scan.summary()


# ---------------------------------------------------------------------------------------------------
# Uploads.


def test_a_corrupt_nifti_upload_shows_the_readers_message_and_is_removed(viewer):
    path = _upload(viewer, b"\x1f\x8b\x08\x00" + os.urandom(2000), "broken.nii.gz")
    loaded = viewer.load_upload(str(path))
    assert loaded.error and loaded.scan is None
    assert "broken.nii.gz" in loaded.message and str(viewer.uploads.root) not in loaded.message
    assert not path.exists() and not path.parent.exists()


def test_a_good_upload_after_a_bad_one_loads_and_is_removed(viewer, phantom_files):
    viewer.load_upload(str(_upload(viewer, b"not a volume", "notes.npy")))
    path = _upload(viewer, phantom_files[1][0], "phantom.nii.gz")
    loaded = viewer.load_upload(str(path))
    assert not loaded.error, loaded.message
    assert loaded.scan.model_volume.shape == (1, 32, 64, 64) and loaded.scan.name == "phantom.nii.gz"
    assert not path.exists()


def test_uploads_outside_the_private_folder_are_refused_and_left_alone(viewer, tmp_path):
    outside = tmp_path / "secret.npy"
    np.save(outside, np.zeros((8, 8, 8), np.float32))
    loaded = viewer.load_upload(str(outside))
    assert loaded.error and "OutsideDataRootError" in loaded.message
    assert outside.exists()
    escaping = viewer.uploads.root / "gradio" / ".." / ".." / "secret.npy"
    assert viewer.load_upload(str(escaping)).error and outside.exists()


def test_an_upload_over_the_size_bound_is_refused(engine, tmp_path):
    uploads = UploadFolder(1000, root=tmp_path / "small")
    viewer = Viewer(engine, {}, uploads)
    path = uploads.new_folder("gradio") / "big.npy"
    np.save(path, np.zeros((16, 16, 16), np.float32))
    loaded = viewer.load_upload(str(path))
    assert loaded.error and "1,000 bytes" in loaded.message and not path.exists()


def test_an_unknown_suffix_is_refused_by_name(viewer):
    loaded = viewer.load_upload(str(_upload(viewer, b"hello", "scan.png")))
    assert loaded.error and "scan.png" in loaded.message and ".zip" in loaded.message


def test_a_dicom_series_zip_loads_flat_and_its_extraction_is_removed(viewer):
    pytest.importorskip("pydicom")
    try:
        series = pathlib.Path(asset_path("totalsegmentator/example_ct_dicom"))
    except AssetError as error:
        pytest.skip(f"CT assets not fetched: {error}")
    archive = viewer.uploads.new_folder("gradio") / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, file in enumerate(sorted(series.iterdir())):
            # Paths that would leave the folder if used: the extraction numbers the files instead.
            zf.write(file, f"../../{i}/{file.name}" if i % 2 else f"study/{file.name}")
        zf.writestr("__MACOSX/._junk", b"resource fork")
    loaded = viewer.load_upload(str(archive))
    assert not loaded.error, loaded.message
    assert loaded.scan.calibrated and loaded.scan.display.shape[0] == 32
    assert not archive.exists()
    assert _empty_or_absent(viewer.uploads.root / "unzipped")
    assert not (viewer.uploads.root.parent / "0").exists()


def test_a_zip_promising_more_than_the_bound_is_refused_before_extraction(engine, tmp_path):
    uploads = UploadFolder(1 << 20, root=tmp_path / "zips")
    viewer = Viewer(engine, {}, uploads)
    archive = uploads.new_folder("gradio") / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("slice.dcm", b"\0" * (2 << 20))  # 2 MiB of zeros deflate to a few KiB
    assert archive.stat().st_size < 1 << 20
    loaded = viewer.load_upload(str(archive))
    assert loaded.error and "unzips to" in loaded.message
    assert _empty_or_absent(uploads.root / "unzipped")


def test_the_private_folder_is_owner_only_and_removed_on_close():
    uploads = UploadFolder(1 << 20)
    root = uploads.root
    assert root.is_dir() and (root.stat().st_mode & 0o777) == 0o700
    uploads.folder("embedded")
    uploads.close()
    assert not root.exists()


# ---------------------------------------------------------------------------------------------------
# Handlers and page fragments.


def test_embedded_scans_load_by_name_only(viewer):
    (name,) = list(viewer.embedded)
    loaded = viewer.load_embedded(name)
    assert not loaded.error and "findings" in loaded.message and loaded.scan.slices == 32
    assert viewer.load_embedded(name).scan is loaded.scan  # read once
    refused = viewer.load_embedded("/etc/passwd")
    assert refused.error and refused.scan is None


def test_ask_streams_each_question_in_turn_and_says_why_it_cannot(viewer):
    scan = viewer.load_embedded(next(iter(viewer.embedded))).scan
    updates = [[(a.question, a.done, len(a.tokens)) for a in answers]
               for answers in viewer.ask(scan, "Which organ?\n\n  Is the liver normal?  \n")]
    assert [q for q, _, _ in updates[-1]] == ["Which organ?", "Is the liver normal?"]
    assert all(done for _, done, _ in updates[-1])
    first_done = next(i for i, u in enumerate(updates) if u[0][1])
    assert all(u[1][2] == 0 for u in updates[: first_done + 1])  # the second waits for the first
    assert "load a scan" in _last(viewer.ask(None, "Which organ?"))[0].error
    assert "type a question" in _last(viewer.ask(scan, " \n "))[0].error
    assert "at most" in _last(viewer.ask(scan, "\n".join(["Why?"] * 7)))[0].error
    assert split_questions("a\n\n b \n") == ["a", "b"]


def test_bars_are_one_per_slice_and_question_with_the_current_slice_marked():
    scores = np.full(32, 1 / 32, np.float32)
    scores[4] = 0.2
    answers = [Answer("Which <organ>?", slice_scores=scores), Answer("Size?", slice_scores=scores[::-1].copy()),
               Answer("pending")]
    html = page.bars_html(answers, 32, current=9)
    assert len(re.findall(rf'class="{page.BAR_CLASS}( above)?"', html)) == 64
    assert html.count('data-slice="') == 32
    assert html.count("bars-row current") == 1 and 'current" data-slice="9"' in html
    assert "Which &lt;organ&gt;?" in html and "<organ>" not in html
    assert 'width: 100.00%" title="slice 4, Q1' in html  # the largest score fills its cell
    assert page.bars_html([Answer("x")], 32, 0) == ""
    with pytest.raises(ValueError, match="16 slice scores for a scan of 32"):
        page.bars_html([Answer("x", slice_scores=np.ones(16))], 32, 0)


def test_answers_are_side_by_side_escaped_with_their_latencies():
    answers = [Answer("<script>alert(1)</script>", text="The liver & spleen.", tokens=[1, 2, 3],
                      slice_scores=np.eye(32)[3], first_token_s=0.012, total_s=0.05, done=True),
               Answer("Next?", error="record 'prompt': too long")]
    html = page.answers_html(answers)
    assert "<script>" not in html and "&lt;script&gt;" in html and "The liver &amp; spleen." in html
    assert html.count('class="answer ') == 2
    assert "most weight on slice 3" in html and "first token 0.012 s" in html and "3 tokens" in html
    assert "too long" in html


def test_downloads_are_the_figure_and_the_answers(viewer):
    scan = viewer.load_embedded(next(iter(viewer.embedded))).scan
    answers = _last(viewer.ask(scan, "Which organ?\nIs the liver normal?"))
    figure, table = viewer.save_outputs(scan, answers)
    assert pathlib.Path(figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pathlib.Path(figure).is_relative_to(viewer.uploads.root)
    saved = json.loads(pathlib.Path(table).read_text())
    assert [a["question"] for a in saved["answers"]] == ["Which organ?", "Is the liver normal?"]
    assert saved["answers"][1]["answer"] == answers[1].text
    np.testing.assert_allclose(saved["answers"][0]["slice_scores"], answers[0].slice_scores, rtol=1e-6)
    assert viewer.save_outputs(scan, [Answer("x", error="no")]) == (None, None)
