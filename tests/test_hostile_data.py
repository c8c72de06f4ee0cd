"""Hostile and broken input on the data side: nothing read outside the data root, nothing allocated that a
header merely promises, nothing silently accepted, every failure a DataError naming its file or record —
and in training one counted skip, with the skip budget judged on every batch and at the end of a run.

Every input is built here, in the test; none is one of the examples the issue names verbatim.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import types
import zlib

import nibabel as nib
import numpy as np
import pytest

from data_pipelines import errors, model_inputs, pipeline
from data_pipelines.annotations import load_records
from data_pipelines.image_placeholder import IGNORE_INDEX
from data_pipelines.readers import VolumeLimits, read_volume
from data_pipelines.tiny_tokenizers import bert_like, llama_like, phi_like
from med2e3_jax.data_config import data_config

SHAPE = (8, 16, 16)  # the model's volume
NUM_VISION_TOKENS = 4
QUESTION = "Which organ shows the lesion?"
ANSWER = "The liver."


def unit_volume(shape=(10, 18, 20), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def hu_volume(shape=(10, 18, 20), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, shape).astype(np.int16)


def save_nifti(path, data, *, affine=None, **fields) -> pathlib.Path:
    image = nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else affine)
    for key, value in fields.items():
        image.header[key] = value
    nib.save(image, str(path))
    return pathlib.Path(path)


def record(record_id, path, asked=QUESTION, answer=ANSWER, **extra) -> dict:
    turns = [{"from": "human", "value": f"<image3d>\n{asked}"}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return dict(id=record_id, vision3d=[str(path)], conversations=turns, **extra)


def write_annotations(path, records) -> pathlib.Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def data_cfg(root=None, **overrides):
    cfg = data_config()
    cfg.update(volume_shape=SHAPE, modality="auto", max_length=96, num_vision_tokens=NUM_VISION_TOKENS,
               question_max_length=16, batch_size=1, shuffle=False, num_epochs=1, read_threads=1, augment=False,
               max_skip_fraction=1.0, image_root=str(root or ""))
    cfg.update(overrides)
    return cfg


def run_pipeline(records, cfg, tokenizer=None):
    """(record indices of the batches, the iterator's skip count)."""
    iterator = iter(pipeline.make_dataset(records, cfg, train=True, tokenizer=tokenizer or phi_like(),
                                          question_tokenizer=bert_like()))
    try:
        indices = [int(i) for batch in iterator for i in batch["record_index"]]
        return indices, iterator.get_state()["skipped"]
    finally:
        iterator.close()


def write_dicom_series(directory, stored, *, slope="1", intercept="-1024", rows=None, cols=None, pixel_bytes=None,
                       drop=()):
    """One single-slice CT file per slice of `stored` (slices, rows, cols) int16, 2.5 mm apart.

    rows / cols / pixel_bytes override what the headers claim and what PixelData holds; `drop` names
    attributes to leave out.
    """
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    for k, image in enumerate(stored):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID = "CT", series
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.Rows, ds.Columns = rows or image.shape[0], cols or image.shape[1]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = pixel_bytes if pixel_bytes is not None else image.astype("<i2").tobytes()
        for name in drop:
            delattr(ds, name)
        ds.save_as(directory / f"slice_{k:03d}.dcm", enforce_file_format=True)
    return directory


# ---------------------------------------------------------------------------------------------------
# Reads outside the data root.


@pytest.fixture
def layout(tmp_path):
    """root/ with a good volume and an alias symlink to it inside; outside/ with a readable volume."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "scans").mkdir(parents=True)
    outside.mkdir()
    np.save(root / "scans" / "good.npy", unit_volume(seed=1))
    np.save(outside / "secret.npy", unit_volume(seed=2))
    (root / "alias.npy").symlink_to(root / "scans" / "good.npy")
    return types.SimpleNamespace(root=root, outside=outside, tmp=tmp_path)


def escape(layout, kind: str) -> str:
    """A record's `vision3d` that leads outside the root, of the given kind."""
    if kind == "dotdot":
        return "../outside/secret.npy"
    if kind == "dotdot_inside_a_path":
        return "scans/../../outside/./secret.npy"
    if kind == "absolute":
        return str(layout.outside / "secret.npy")
    if kind == "symlinked_file":
        (layout.root / "scans" / "link.npy").symlink_to(layout.outside / "secret.npy")
        return "scans/link.npy"
    if kind == "symlinked_folder":
        (layout.root / "mounted").symlink_to(layout.outside, target_is_directory=True)
        return "mounted/secret.npy"
    if kind == "dicom_slice_symlinked_out":
        # Nine slices of one series: eight moved under the root, the ninth left outside and linked in.
        write_dicom_series(layout.outside / "series", hu_volume((9, 12, 12), seed=3))
        (layout.root / "series").mkdir()
        for k in range(8):
            os.replace(layout.outside / "series" / f"slice_{k:03d}.dcm", layout.root / "series" / f"slice_{k:03d}.dcm")
        (layout.root / "series" / "slice_008.dcm").symlink_to(layout.outside / "series" / "slice_008.dcm")
        return "series"
    raise AssertionError(kind)


ESCAPES = ["dotdot", "dotdot_inside_a_path", "absolute", "symlinked_file", "symlinked_folder",
           "dicom_slice_symlinked_out"]


@pytest.mark.parametrize("kind", ESCAPES)
def test_training_refuses_a_record_path_outside_the_data_root_by_record_and_path(layout, kind, caplog):
    bad = escape(layout, kind)
    annotations = write_annotations(layout.tmp / "train.json", [
        record("inside", "scans/good.npy"), record("alias", "alias.npy"), record("escapes", bad)])
    records = load_records(annotations, layout.root, validate=False)

    with caplog.at_level(logging.WARNING, logger="data_pipelines.pipeline"):
        indices, skipped = run_pipeline(records, data_cfg(layout.root))
    assert indices == [0, 1] and skipped == 1  # an inside symlink is fine; the escape is one counted skip
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "OutsideDataRootError" in warning and "'escapes'" in warning and str(layout.root) in warning

    with pytest.raises(errors.OutsideDataRootError, match="'escapes'") as caught:
        run_pipeline(records, data_cfg(layout.root, strict=True))
    assert caught.value.path.startswith(str(layout.root)) or caught.value.path == bad
    assert "allow_outside_root" in str(caught.value)

    # The switch lets a user read volumes kept elsewhere on purpose.
    indices, skipped = run_pipeline(records, data_cfg(layout.root, allow_outside_root=True))
    assert indices == [0, 1, 2] and skipped == 0


def test_evaluation_refuses_a_record_path_outside_the_data_root(layout):
    from batches_for_tests import small_model

    from med2e3_jax.cli.evaluate import Predictor, eval_config

    cfg = small_model()
    cfg.vision3d.img_size = SHAPE
    cfg.llm_max_length = 256
    config = eval_config()
    config.update(image_root=str(layout.root), template="phi", question_max_length=16)
    annotations = write_annotations(layout.tmp / "test.json", [
        record("inside", "scans/good.npy", answer=None), record("escapes", escape(layout, "dotdot"), answer=None),
        record("absolute", escape(layout, "absolute"), answer=None)])
    records = load_records(annotations, layout.root)
    predictor = Predictor(types.SimpleNamespace(cfg=cfg), config, phi_like(), bert_like())
    assert predictor.inputs(records[0])["volume"].shape == (1, *SHAPE)
    for bad in records[1:]:
        with pytest.raises(errors.OutsideDataRootError, match=repr(bad["id"])):
            predictor.inputs(bad)
    config.allow_outside_root = True
    allowed = Predictor(types.SimpleNamespace(cfg=cfg), config, phi_like(), bert_like())
    assert allowed.inputs(records[1])["volume"].shape == (1, *SHAPE)


def test_the_tfds_builder_refuses_a_record_path_outside_the_data_root(layout, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    from data_pipelines import tfds_builder

    annotations = write_annotations(layout.tmp / "train.json", [
        record("inside", "scans/good.npy"), record("escapes", escape(layout, "symlinked_folder"))])
    records = {"train": load_records(annotations)}  # relative: build_preprocessed joins them to its root
    with pytest.raises(errors.OutsideDataRootError, match="'escapes'"):
        tfds_builder.build_preprocessed(records, tmp_path / "strict", shape=SHAPE, image_root=layout.root)
    tfds_builder.build_preprocessed(records, tmp_path / "lenient", shape=SHAPE, image_root=layout.root, strict=False)
    kept = tfds_builder.open_preprocessed(tmp_path / "lenient", "train")
    assert [kept[i]["record"]["id"] for i in range(len(kept))] == ["inside"]
    tfds_builder.build_preprocessed(records, tmp_path / "allowed", shape=SHAPE, image_root=layout.root,
                                    allow_outside_root=True)
    assert len(tfds_builder.open_preprocessed(tmp_path / "allowed", "train")) == 2


# ---------------------------------------------------------------------------------------------------
# Allocations a file can force: refused from the header, under a memory limit.


def _nifti_header_bytes(shape, dtype) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.diag([0.8, 0.8, 2.0, 1.0]), code=1)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0\0\0\0"


def _zeros_bomb(prefix: bytes, inflated: int) -> bytes:
    """One gzip member: `prefix`, then `inflated` zero bytes, built without compressing them all: after a
    full flush deflate blocks reference no earlier data, so one compressed block of zeros repeats."""
    block = 16 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    zeros = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    # No trailer: a decoder that ran to the end would have inflated everything before finding that out.
    return head + zeros * (inflated // block)


def _bounded_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    voxels = np.arange(16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16) - 1000
    header = _nifti_header_bytes((16, 16, 16), np.float32)
    files = {}
    # Headers that promise far more than the limits, with nothing behind them.
    files["nii_gz_promises_8g_voxels"] = directory / "promise.nii.gz"
    files["nii_gz_promises_8g_voxels"].write_bytes(gzip.compress(_nifti_header_bytes((2048, 2048, 2048), np.int16)))
    files["nii_promises_6g_voxels"] = directory / "promise.nii"
    files["nii_promises_6g_voxels"].write_bytes(_nifti_header_bytes((3000, 2000, 1000), np.float32))
    # Small volumes whose gzip stream inflates to 4 GiB more: one member, and many members.
    files["nii_gz_bomb_one_member"] = directory / "bomb.nii.gz"
    files["nii_gz_bomb_one_member"].write_bytes(_zeros_bomb(header + voxels.tobytes(order="F"), 4 << 30))
    member = gzip.compress(bytes(16 << 20), compresslevel=9)
    files["nii_gz_bomb_members"] = directory / "members.nii.gz"
    files["nii_gz_bomb_members"].write_bytes(gzip.compress(header + voxels.tobytes(order="F")) + member * 256)
    # .npy headers: beyond the limits, and within them but with the data missing.
    for name, shape in (("npy_promises_64g_voxels", (1, 4096, 4096, 4096)), ("npy_truncated_3g", (768, 1024, 1024))):
        files[name] = directory / f"{name}.npy"
        with open(files[name], "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
            f.write(b"\0" * 64)
    return files


def test_no_header_or_gzip_stream_makes_a_reader_allocate_what_it_promises(tmp_path):
    files = _bounded_files(tmp_path)
    pytest.importorskip("pydicom")
    # DICOM: slices claiming 45000 x 45000 pixels; slices claiming 9000 x 9000 with 200 bytes of pixels.
    files["dicom_promises_4g_voxels"] = write_dicom_series(
        tmp_path / "huge", np.zeros((2, 4, 4), np.int16), rows=45000, cols=45000, pixel_bytes=bytes(200))
    files["dicom_truncated_650m"] = write_dicom_series(
        tmp_path / "short", np.zeros((8, 4, 4), np.int16), rows=9000, cols=9000, pixel_bytes=bytes(200))
    script = textwrap.dedent(
        """
        import json, resource, sys
        import numpy as np, nibabel, pydicom
        from data_pipelines import errors
        from data_pipelines.readers import VolumeLimits, read_volume
        size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
        # Room for a few small volumes and the decoders, none for what the headers promise (>= 2.6 GB).
        resource.setrlimit(resource.RLIMIT_AS, (size + (768 << 20),) * 2)
        out = {}
        try:  # the control: the limit bites on an allocation of the size the headers promise
            np.ones(2600 << 20, np.uint8)
            out["control"] = ["allocated"]
        except MemoryError:
            out["control"] = ["MemoryError"]
        for name, path in json.loads(sys.argv[1]).items():
            try:
                volume = read_volume(path)
                out[name] = ["read", list(volume.array.shape), float(volume.array.min())]
            except errors.DataError as error:
                out[name] = [type(error).__name__, str(error)]
            except MemoryError as error:
                out[name] = ["MemoryError", str(error)]
        try:  # the limits are configuration: a small max_voxels refuses the small bomb too
            read_volume(sys.argv[2], limits=VolumeLimits(max_voxels=4000))
        except errors.VolumeTooLargeError as error:
            out["configured"] = ["VolumeTooLargeError", str(error)]
        print(json.dumps(out))
        """
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps({k: str(v) for k, v in files.items()}),
         str(files["nii_gz_bomb_one_member"])], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    expected = {
        "nii_gz_promises_8g_voxels": "VolumeTooLargeError", "nii_promises_6g_voxels": "VolumeTooLargeError",
        "npy_promises_64g_voxels": "VolumeTooLargeError", "dicom_promises_4g_voxels": "VolumeTooLargeError",
        "npy_truncated_3g": "CorruptFileError", "dicom_truncated_650m": "CorruptFileError",
        "nii_gz_bomb_one_member": "read", "nii_gz_bomb_members": "read", "configured": "VolumeTooLargeError",
        "control": "MemoryError",
    }
    assert {name: got[0] for name, got in out.items()} == expected, out
    for name, got in out.items():
        if name == "control":
            continue
        if got[0] == "read":
            assert got[1:] == [[16, 16, 16], -1000.0], (name, got)  # the voxels the header promised, no more
        else:
            assert pathlib.Path(files.get(name, files["nii_gz_bomb_one_member"])).name in got[1], (name, got)
    assert "max_voxels" in out["nii_promises_6g_voxels"][1] and "truncated" in out["npy_truncated_3g"][1]


def test_a_file_beyond_the_limits_is_one_counted_skip_in_training(tmp_path, caplog):
    np.save(tmp_path / "good.npy", unit_volume())
    (tmp_path / "huge.nii.gz").write_bytes(gzip.compress(_nifti_header_bytes((1500, 1500, 1500), np.int16)))
    save_nifti(tmp_path / "big_for_config.nii.gz", hu_volume((40, 40, 40)))
    records = [record("good", tmp_path / "good.npy"), record("huge", tmp_path / "huge.nii.gz"),
               record("big", tmp_path / "big_for_config.nii.gz")]
    with caplog.at_level(logging.WARNING, logger="data_pipelines.pipeline"):
        indices, skipped = run_pipeline(records, data_cfg(max_voxels=50_000))
    assert indices == [0] and skipped == 2
    assert caplog.text.count("VolumeTooLargeError") == 2 and "huge.nii.gz" in caplog.text
    assert run_pipeline(records[2:], data_cfg())[0] == [0]  # 64,000 voxels is within the default


# ---------------------------------------------------------------------------------------------------
# Silent acceptance: what is no volume, no image, no question, or no room for the answer.


@pytest.mark.parametrize("fmt, shape, hint", [
    ("nifti", (1, 40, 30), "one slice"),
    ("nifti", (40, 30, 2), "along axis 2"),
    ("nifti", (50, 3, 60), "RGB"),
    ("npy", (1, 1, 30, 40), "one slice"),
    ("npy", (120, 100, 3), "RGB"),
    ("npy", (90, 80, 4), "RGBA"),
])
def test_too_few_voxels_along_an_axis_is_no_volume(tmp_path, fmt, shape, hint):
    if fmt == "nifti":
        path = save_nifti(tmp_path / "thin.nii.gz", hu_volume(shape))
    else:
        path = tmp_path / "thin.npy"
        np.save(path, unit_volume(shape))
    with pytest.raises(errors.VolumeShapeError, match=hint) as caught:
        read_volume(path)
    assert caught.value.path == str(path) and "min_extent=8" in str(caught.value)
    # The minimum is configuration; one slice stays refused at any minimum above one.
    if min(shape[-3:]) > 1:
        assert read_volume(path, limits=VolumeLimits(min_extent=min(shape[-3:]))).array.ndim == 3


def test_a_dicom_series_of_few_slices_is_no_volume(tmp_path):
    directory = write_dicom_series(tmp_path / "three", hu_volume((3, 20, 20)))
    with pytest.raises(errors.VolumeShapeError, match="axis 0"):
        read_volume(directory)


def _mask_file(tmp_path, kind) -> pathlib.Path:
    rng = np.random.default_rng(7)
    blob = rng.random((12, 14, 16)) > 0.6
    if kind == "bool_npy":
        np.save(tmp_path / "mask.npy", blob)
        return tmp_path / "mask.npy"
    if kind == "uint8_npy":
        np.save(tmp_path / "mask.npy", blob.astype(np.uint8))
        return tmp_path / "mask.npy"
    if kind == "uint8_nifti":
        return save_nifti(tmp_path / "mask.nii.gz", blob.astype(np.uint8))
    if kind == "float_nifti_0_255":
        return save_nifti(tmp_path / "mask.nii.gz", blob.astype(np.float32) * 255)
    if kind == "label_map_nifti":
        return save_nifti(tmp_path / "labels.nii.gz", rng.integers(0, 6, (12, 14, 16)).astype(np.int16))
    if kind == "label_intent_nifti":
        return save_nifti(tmp_path / "labels.nii.gz", hu_volume((12, 14, 16)), intent_code=1002)
    if kind == "dicom_two_values":
        return write_dicom_series(tmp_path / "mask", (blob * 1000 - 1000).astype(np.int16), intercept="0")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["bool_npy", "uint8_npy", "uint8_nifti", "float_nifti_0_255", "label_map_nifti",
                                  "label_intent_nifti", "dicom_two_values"])
def test_a_mask_or_label_map_is_not_read_as_an_image(tmp_path, kind):
    path = _mask_file(tmp_path, kind)
    with pytest.raises(errors.NotAnImageError) as caught:
        read_volume(path)
    assert caught.value.path == str(path) and str(path) in str(caught.value)


def test_images_with_few_values_in_hu_or_many_in_unit_range_still_read(tmp_path):
    # A coarse CT (negative HU) and a normalised volume are images, whatever their number of values.
    coarse = np.random.default_rng(1).choice([-1000, -80, 30, 60, 400], (12, 14, 16)).astype(np.int16)
    assert read_volume(save_nifti(tmp_path / "coarse.nii.gz", coarse)).array.min() == -1000
    np.save(tmp_path / "unit.npy", unit_volume())
    assert read_volume(tmp_path / "unit.npy").array.max() <= 1


@pytest.mark.parametrize("slope, intercept", [(1.0, np.nan), (np.inf, 0.0), (2.0, np.inf), (-np.inf, -1024.0)])
def test_a_non_finite_rescale_in_a_nifti_header_is_refused_by_name(tmp_path, slope, intercept):
    path = save_nifti(tmp_path / "rescale.nii.gz", hu_volume(), scl_slope=slope, scl_inter=intercept)
    with pytest.raises(errors.CorruptFileError, match="scl_slope") as caught:
        read_volume(path)
    assert caught.value.path == str(path) and str(path) in str(caught.value)


@pytest.mark.parametrize("huge", [1e39, -3e300])
def test_float64_voxels_beyond_float32s_range_are_refused_not_read_as_infinity(tmp_path, huge):
    data = hu_volume().astype(np.float64)
    data[3, 4, 5] = huge
    path = save_nifti(tmp_path / "wide.nii.gz", data)
    with pytest.raises(errors.NonFiniteVolumeError, match="1 of 3600 .*float32") as caught:
        read_volume(path)
    assert caught.value.path == str(path)


def _broken_file(directory: pathlib.Path, kind: str) -> pathlib.Path:
    if kind == "nifti_unknown_datatype":
        path = save_nifti(directory / "dtype.nii.gz", hu_volume())
        header = bytearray(gzip.decompress(path.read_bytes()))
        header[70:72] = (9999).to_bytes(2, "little")  # the datatype code, which nibabel does not know
        path.write_bytes(gzip.compress(bytes(header)))
        return path
    if kind == "npy_of_pickled_objects":
        np.save(directory / "objects.npy", np.full((8, 10, 10), {"a": 1}, dtype=object), allow_pickle=True)
        return directory / "objects.npy"
    if kind == "npz_named_npy":
        np.savez(directory / "archive.npz", volume=unit_volume())
        return pathlib.Path(os.replace(directory / "archive.npz", directory / "archive.npy") or
                            directory / "archive.npy")
    if kind == "nifti_shorter_than_its_header":
        (directory / "short.nii").write_bytes(b"\x5c\x01" + bytes(200))
        return directory / "short.nii"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, expected", [
    ("nifti_unknown_datatype", "not a valid NIfTI header"), ("npy_of_pickled_objects", "dtype object"),
    ("npz_named_npy", ".npz"), ("nifti_shorter_than_its_header", "shorter than a NIfTI header")])
def test_library_errors_become_data_errors_naming_the_file(tmp_path, kind, expected):
    path = _broken_file(tmp_path, kind)
    with pytest.raises(errors.CorruptFileError, match=expected) as caught:
        read_volume(path)
    assert caught.value.path == str(path) and str(path) in str(caught.value)


@pytest.mark.parametrize("damage, expected", [
    ("slope_not_a_number", "RescaleSlope"), ("no_rows", "Rows"), ("pixels_cut", "truncated")])
def test_dicom_library_errors_become_data_errors_naming_the_file(tmp_path, damage, expected):
    options = {"no_rows": dict(drop=("Rows",)), "pixels_cut": dict(pixel_bytes=bytes(32))}.get(damage, {})
    directory = write_dicom_series(tmp_path / "series", hu_volume((8, 12, 12)), slope="9.75", **options)
    if damage == "slope_not_a_number":
        # pydicom refuses to write a DS that is no number; a damaged file holds one all the same.
        victim = directory / "slice_004.dcm"
        victim.write_bytes(victim.read_bytes().replace(b"9.75", b"ab.c"))
    with pytest.raises(errors.DataError, match=expected) as caught:
        read_volume(directory)
    assert caught.value.path.startswith(str(directory)) and caught.value.path in str(caught.value)


@pytest.mark.parametrize("question, extra", [("", {}), ("   \n ", {}), (QUESTION, {"question": ""}),
                                             (QUESTION, {"question": "  \t"})])
def test_an_empty_question_is_refused_in_training_generation_and_evaluation(tmp_path, question, extra):
    np.save(tmp_path / "v.npy", unit_volume())
    empty = record("empty", tmp_path / "v.npy", asked=question, **extra)
    spec = model_inputs.InputSpec(volume_shape=SHAPE, num_vision_tokens=NUM_VISION_TOKENS, max_length=96)
    for generation in (False, True):
        with pytest.raises(errors.RecordError, match="'empty'.*(question|besides)"):
            model_inputs.record_inputs(empty, spec, phi_like(), bert_like(), generation=generation)
    indices, skipped = run_pipeline([record("fine", tmp_path / "v.npy"), empty], data_cfg())
    assert indices == [0] and skipped == 1
    if not extra:
        with pytest.raises(errors.RecordError):
            model_inputs.record_inputs(model_inputs.question_record(tmp_path / "v.npy", question), spec, phi_like(),
                                       bert_like(), generation=True)


def _counts(message: str) -> list[int]:
    return [int(word) for word in message.replace("(", " ").replace(",", " ").split() if word.isdigit()]


@pytest.mark.parametrize("tokenizer, template", [(phi_like, "phi"), (llama_like, "llama")])
def test_a_question_that_pushes_the_answer_past_max_length_is_a_counted_skip_in_training(tmp_path, tokenizer,
                                                                                         template):
    np.save(tmp_path / "v.npy", unit_volume())
    tok = tokenizer()
    long_question = " ".join(["lesion liver organ"] * 40)
    question_tokens = len(tok(long_question).input_ids)
    spec = model_inputs.InputSpec(volume_shape=SHAPE, num_vision_tokens=NUM_VISION_TOKENS, max_length=96,
                                  template=template)
    assert question_tokens > spec.max_length  # the question alone is longer than the prompt may be
    too_long = record("long", tmp_path / "v.npy", asked=long_question)
    with pytest.raises(errors.PromptTooLongError, match="'long'.*max_length.*96") as caught:
        model_inputs.record_inputs(too_long, spec, tok, bert_like())
    before = _counts(str(caught.value))[0]
    assert before >= question_tokens + NUM_VISION_TOKENS - 1  # positions before the answer, as reported
    # An answer that starts inside max_length and is cut is still trained on, as the authors truncate.
    long_answer = record("cut", tmp_path / "v.npy", answer=" ".join(["the liver"] * 80))
    cut = model_inputs.record_inputs(long_answer, spec, tok, bert_like())
    assert (cut["labels"] != IGNORE_INDEX).any() and cut["attention_mask"].all()

    indices, skipped = run_pipeline([record("fine", tmp_path / "v.npy"), too_long, long_answer],
                                    data_cfg(template=template), tokenizer=tok)
    assert indices == [0, 2] and skipped == 1


def test_a_prompt_cut_before_the_generation_prompt_is_an_error_with_its_token_counts(tmp_path):
    np.save(tmp_path / "v.npy", unit_volume())
    tok = phi_like()
    spec = model_inputs.InputSpec(volume_shape=SHAPE, num_vision_tokens=8, max_length=64)
    history = [{"from": "human", "value": "Is there a lesion in the liver?"},
               {"from": "gpt", "value": " ".join(["yes"] * 30)}]
    asked = model_inputs.question_record(tmp_path / "v.npy", "Where exactly?", history=history)
    with pytest.raises(errors.PromptTooLongError, match="ASSISTANT:") as caught:
        model_inputs.record_inputs(asked, spec, tok, bert_like(), generation=True)
    assert _counts(str(caught.value))[0] > 64 and "8 of them the volume's" in str(caught.value)
    # Without the long history the same question fits and is encoded.
    fits = model_inputs.record_inputs(model_inputs.question_record(tmp_path / "v.npy", "Where exactly?"), spec,
                                      tok, bert_like(), generation=True)
    assert 8 < fits["attention_mask"].sum() < 64


def test_evaluation_raises_on_a_prompt_past_llm_max_length(tmp_path):
    from batches_for_tests import small_model

    from med2e3_jax.cli.evaluate import Predictor, eval_config

    np.save(tmp_path / "v.npy", unit_volume())
    cfg = small_model()
    cfg.vision3d.img_size = SHAPE
    cfg.llm_max_length = 48
    config = eval_config()
    config.update(template="phi", question_max_length=16)
    predictor = Predictor(types.SimpleNamespace(cfg=cfg), config, phi_like(), bert_like())
    wordy = record("wordy", tmp_path / "v.npy", asked=" ".join(["where is the lesion"] * 12), answer=None)
    with pytest.raises(errors.PromptTooLongError, match="'wordy'.*llm_max_length.*48"):
        predictor.inputs(wordy)


# ---------------------------------------------------------------------------------------------------
# The skip budget: every batch, and the end of the run.


def _budget_records(tmp_path, count, bad):
    np.save(tmp_path / "v.npy", unit_volume())
    return [record(f"r{i}", tmp_path / ("missing.npy" if i in bad else "v.npy")) for i in range(count)]


def test_a_run_that_stops_early_after_bad_first_records_fails_its_budget_at_the_end(tmp_path):
    records = _budget_records(tmp_path, 40, bad={0, 1, 2, 3})
    iterator = iter(pipeline.make_dataset(records, data_cfg(max_skip_fraction=0.1), train=True, tokenizer=phi_like(),
                                          question_tokenizer=bert_like()))
    batches = [next(iterator) for _ in range(6)]  # a run of 6 steps: 10 visits, within the grace of the first 20
    assert [int(b["record_index"][0]) for b in batches] == [4, 5, 6, 7, 8, 9]
    with pytest.raises(pipeline.TooManySkipsError, match="skipped 4 of 10 .*missing.npy"):
        iterator.check_skip_budget()
    iterator.close()


def test_the_budget_is_judged_on_every_batch_not_only_at_a_new_skip(tmp_path):
    records = _budget_records(tmp_path, 60, bad={1, 2, 3})  # 3 of 60 is 5%: within 10% at the end
    iterator = iter(pipeline.make_dataset(records, data_cfg(max_skip_fraction=0.1), train=True, tokenizer=phi_like(),
                                          question_tokenizer=bert_like()))
    taken = 0
    with pytest.raises(pipeline.TooManySkipsError, match="skipped 3 of 20"):
        while True:
            next(iterator)
            taken += 1
    assert taken == 16  # 3 of the first 20 visits is 15%: the batch that completes them fails, skip or none
    iterator.close()


def test_the_training_loop_checks_the_budget_when_its_steps_are_done(tmp_path):
    from training_runs import SyntheticBatches, loop_config

    from med2e3_jax.train import loop

    class OverBudget(SyntheticBatches):
        checked = 0

        def check_skip_budget(self):
            type(self).checked += 1
            raise pipeline.TooManySkipsError("skipped 3 of 4 examples")

    config = loop_config(steps=1, checkpoint_every=1, export_model=True)
    with pytest.raises(pipeline.TooManySkipsError, match="3 of 4"):
        loop.train(config, tmp_path, make_iterator=lambda c, i, n: OverBudget(c, i, n))
    assert OverBudget.checked == 1 and not (tmp_path / loop.MODEL_DIR).exists()
