"""Preprocessed volumes and their records as TFDS ArrayRecord datasets, written and read without TensorFlow.

Decoding a CT-RATE `.nii.gz` (gzip, then reorientation, windowing, cropping, resizing) costs far more
than training needs per example; this does it once. Two TFDS datasets go under one folder:

    <out>/med2e3_volumes/1.0.0/   one example per distinct volume of a split: `volume`, the preprocessed
                                  (1, slices, height, width) array quantised to `dtype` and zlib-compressed;
                                  `vision3d`, the source path; `index`, its position in the split
    <out>/med2e3_records/1.0.0/   one example per annotation record, in the given order: `record`, the
                                  record as JSON; `id`, `question`, `question_type`; `volume_index`, the
                                  position of its volume in `med2e3_volumes`; `index`, its position

so a volume asked about in ten VQA records is stored once. Both are ordinary TFDS datasets
(`file_format="array_record"`, shuffling disabled so positions are generation order): TFDS 4.9 writes
and reads them with numpy alone — `GeneratorBasedBuilder.download_and_prepare` and
`tfds.builder_from_directory(...).as_data_source(split)` never import TensorFlow.

`open_preprocessed(out, split)` returns the random-access source the Grain pipeline reads:
`source[i] == {"volume": float32 (1, slices, height, width), "record": dict}`, record i of the split.

Quantisation (`dtype`): "uint8" stores round(255 x) of the [0, 1] volume, so values come back within
1/510 of the preprocessed ones; "float16" within 2**-12 (half a float16 ulp below 1); "float32" exactly.

Command line: `med2e3-build-tfds` (med2e3_jax/cli/build_tfds.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from data_pipelines.data_root import confine
from data_pipelines.errors import DataError

log = logging.getLogger(__name__)

VOLUMES_NAME, RECORDS_NAME = "med2e3_volumes", "med2e3_records"
VERSION = "1.0.0"
DTYPES = {"uint8": np.uint8, "float16": np.float16, "float32": np.float32}
QUANTISATION_ERROR = {"uint8": 1 / 510, "float16": 2.0**-12, "float32": 0.0}  # max |stored - preprocessed|

Loader = Callable[[str], np.ndarray]


def preprocessing_loader(*, shape: Sequence[int], modality: str, window: Sequence[float] = (-1000.0, 1000.0),
                         limits=None) -> Loader:
    """Read any supported volume file (within `limits`, a `readers.VolumeLimits`) and preprocess it for
    evaluation, as the pipeline does."""
    from data_pipelines.preprocess import preprocess_volume
    from data_pipelines.readers import read_volume

    def load(path: str) -> np.ndarray:
        return preprocess_volume(read_volume(path, limits=limits), shape=tuple(shape), modality=modality,
                                 window=tuple(window))

    return load


# ---------------------------------------------------------------------------------------------------
# Writing.


@dataclasses.dataclass(frozen=True)
class _Split:
    volumes: tuple[str, ...]  # distinct volume paths in order of first use
    records: tuple[tuple[dict, int, int], ...]  # (record, volume_index, position in the input)
    first_records: tuple[str, ...]  # per volume, the id of the first record that asks for it


def _plan(records: Sequence[Mapping], image_root) -> _Split:
    volumes: dict[str, int] = {}
    first_records: list[str] = []
    planned = []
    for position, record in enumerate(records):
        paths = record.get("vision3d") if isinstance(record, Mapping) else None
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or len(paths) != 1 or not isinstance(paths[0], str):
            record_id = record.get("id", f"#{position}") if isinstance(record, Mapping) else f"#{position}"
            raise DataError(f"record {record_id!r}: 'vision3d' must list exactly one volume path, found {paths!r}",
                            path=str(record_id))
        # os.path.join, as the authors: an absolute path in the record wins over the root.
        path = os.path.join(os.fspath(image_root), paths[0]) if image_root else paths[0]
        if path not in volumes:
            first_records.append(str(record.get("id", f"#{position}")))
        planned.append((dict(record), volumes.setdefault(path, len(volumes)), position))
    return _Split(tuple(volumes), tuple(planned), tuple(first_records))


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def _make_builders():
    """The two builder classes, defined on first use so that importing this module stays cheap."""
    tfds = _tfds()

    # skip_registration: these are built from code, never looked up by name in the TFDS registry.
    class Quiet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """TFDS prints its start and end lines to stdout; here they go to the log."""

        def _log_download_bytes(self):
            log.info("preparing %s in %s", self.name, self.data_dir)

        def _log_download_done(self):
            log.info("prepared %s in %s", self.name, self.data_dir)

    class Med2e3Volumes(Quiet, skip_registration=True):
        name = VOLUMES_NAME
        VERSION = tfds.core.Version(VERSION)

        def __init__(self, *, plan, shape, dtype, load, threads, strict, metadata, root, allow_outside, **kwargs):
            self._plan, self._shape, self._dtype, self._load = plan, tuple(shape), dtype, load
            self._threads, self._strict, self._metadata = threads, strict, metadata
            self._root, self._allow_outside = root, allow_outside
            self.skipped: dict[str, list[str]] = {}
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Preprocessed volumes (see data_pipelines.tfds_builder).",
                features=tfds.features.FeaturesDict(
                    {
                        "volume": tfds.features.Tensor(
                            shape=(1, *self._shape), dtype=DTYPES[self._dtype], encoding=tfds.features.Encoding.ZLIB
                        ),
                        "vision3d": tfds.features.Text(),
                        "index": np.int64,
                    }
                ),
                disable_shuffling=True,
                metadata=tfds.core.MetadataDict(self._metadata),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in self._plan}

        def _generate_examples(self, split):
            paths = self._plan[split].volumes
            asked = list(zip(paths, self._plan[split].first_records))
            self.skipped[split] = []
            workers = max(1, self._threads)
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                results = _bounded_map(pool, workers, self._load_or_error, asked)
                for index, (path, result) in enumerate(zip(paths, results)):
                    if isinstance(result, DataError):
                        if self._strict:
                            raise result
                        log.warning("skipping volume %s (split %s): %s", path, split, result)
                        self.skipped[split].append(path)
                        result = np.zeros((1, *self._shape), DTYPES[self._dtype])  # keeps positions; its records go
                    yield index, {"volume": result, "vision3d": path, "index": index}

        def _load_or_error(self, asked):
            path, record_id = asked
            try:
                confine(path, self._root, allow_outside=self._allow_outside, record_id=record_id)
                volume = np.asarray(self._load(path))
                if volume.shape != (1, *self._shape):
                    raise DataError(f"{path}: preprocessed to {volume.shape}, expected {(1, *self._shape)}", path=path)
                return quantise(volume, self._dtype, path)
            except DataError as error:
                return error

    class Med2e3Records(Quiet, skip_registration=True):
        name = RECORDS_NAME
        VERSION = tfds.core.Version(VERSION)

        def __init__(self, *, plan, skipped, metadata, **kwargs):
            self._plan, self._skipped, self._metadata = plan, skipped, metadata
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Annotation records of med2e3_volumes (see data_pipelines.tfds_builder).",
                features=tfds.features.FeaturesDict(
                    {
                        "record": tfds.features.Text(),
                        "id": tfds.features.Text(),
                        "question": tfds.features.Text(),
                        "question_type": np.int64,
                        "volume_index": np.int64,
                        "index": np.int64,
                    }
                ),
                disable_shuffling=True,
                metadata=tfds.core.MetadataDict(self._metadata),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in self._plan}

        def _generate_examples(self, split):
            skipped = set(self._skipped.get(split, ()))
            volumes = self._plan[split].volumes
            for record, volume_index, position in self._plan[split].records:
                if volumes[volume_index] in skipped:
                    continue
                question_type = record.get("question_type", -1)
                yield position, {
                    "record": json.dumps(record, ensure_ascii=False),
                    "id": str(record.get("id", position)),
                    "question": record.get("question") or "",
                    "question_type": int(question_type) if isinstance(question_type, (int, np.integer)) else -1,
                    "volume_index": volume_index,
                    "index": position,
                }

    return Med2e3Volumes, Med2e3Records


def _bounded_map(pool, workers: int, function, items):
    """`pool.map`, in order, but with at most a few results per worker waiting: a split's preprocessed
    volumes would not fit in memory all at once."""
    pending = collections.deque()
    limit = 2 * workers
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= limit:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


_BUILDERS = None


def _builders():
    global _BUILDERS
    if _BUILDERS is None:
        _BUILDERS = _make_builders()
    return _BUILDERS


def quantise(volume: np.ndarray, dtype: str, path: str = "") -> np.ndarray:
    """A [0, 1] float volume in the stored `dtype` (see the module docstring for the error)."""
    volume = np.asarray(volume, np.float32)
    if dtype == "uint8":
        lo, hi = float(volume.min()), float(volume.max())
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise DataError(f"{path}: uint8 storage needs values in [0, 1], found [{lo}, {hi}]", path=path)
        return np.rint(volume * 255.0).astype(np.uint8)
    return volume.astype(DTYPES[dtype])


def dequantise(stored: np.ndarray) -> np.ndarray:
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / np.float32(255.0)
    return stored.astype(np.float32)


def build_preprocessed(
    records: Mapping[str, Sequence[Mapping]],
    out: str | os.PathLike,
    *,
    shape: Sequence[int] = (32, 256, 256),
    modality: str = "auto",
    window: Sequence[float] = (-1000.0, 1000.0),
    dtype: str = "uint8",
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    limits=None,
    load: Loader | None = None,
    threads: int = 1,
    strict: bool = True,
    overwrite: bool = False,
) -> pathlib.Path:
    """Preprocess every volume of `records` ({split: records}) once and write both datasets under `out`.

    `load(path) -> (1, *shape)` float32 array in [0, 1]; by default `preprocessing_loader(shape=shape,
    modality=modality, window=window)`: the pipeline's own preprocessing, so pass the data config's
    `volume_shape`, `modality` and `hu_window` to get the examples it would make from the files, and
    `limits` (a `readers.VolumeLimits`) for what one file may ask for. Relative `vision3d` paths are joined
    to `image_root`, and with a root every volume must resolve inside it (`data_root.confine`) unless
    `allow_outside_root`. A volume that raises DataError stops the build when `strict`; otherwise it is
    logged and left out with its records. Returns `out`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (slices, height, width), got {shape}")
    plan = {split: _plan(split_records, image_root) for split, split_records in records.items() if split_records}
    if not plan:
        raise ValueError("no records to write: every split is empty")
    out = pathlib.Path(out)
    for name in (VOLUMES_NAME, RECORDS_NAME):
        existing = out / name / VERSION
        if existing.exists():
            if not overwrite:
                raise FileExistsError(f"{existing} exists; pass overwrite=True to replace it")
            shutil.rmtree(existing)
    load = load or preprocessing_loader(shape=shape, modality=modality, window=window, limits=limits)
    metadata = dict(shape=list(shape), modality=modality, window=[float(w) for w in window], dtype=dtype,
                    quantisation_error=QUANTISATION_ERROR[dtype])

    volumes_cls, records_cls = _builders()
    tfds = _tfds()
    # Nothing to download; never ask GCS for a prepared copy of a dataset of the same name.
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    downloads = out / "downloads"
    volumes = volumes_cls(plan=plan, shape=shape, dtype=dtype, load=load, threads=threads, strict=strict,
                          metadata=metadata, root=image_root, allow_outside=allow_outside_root, data_dir=str(out),
                          file_format="array_record")
    volumes.download_and_prepare(download_dir=str(downloads), download_config=config)
    records_builder = records_cls(plan=plan, skipped=volumes.skipped, metadata=metadata, data_dir=str(out),
                                  file_format="array_record")
    records_builder.download_and_prepare(download_dir=str(downloads), download_config=config)
    shutil.rmtree(downloads, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------
# Reading.


class PreprocessedSource:
    """Record i of one split with its volume: a random-access source for `grain.MapDataset.source`.

    `source[i] == {"volume": float32 (1, slices, height, width), "record": dict}`. The TFDS data sources
    open lazily, so the object pickles small (for Grain's worker processes) and reopens in each worker.
    """

    def __init__(self, out: str | os.PathLike, split: str):
        self.out, self.split = pathlib.Path(out), split
        self._records = self._volumes = None
        self._len = len(self._open()[0])

    def _open(self):
        if self._records is None:
            tfds = _tfds()
            builders = {}
            for name in (RECORDS_NAME, VOLUMES_NAME):
                directory = self.out / name / VERSION
                if not (directory / "dataset_info.json").exists():
                    raise DataError(f"{directory} holds no prepared TFDS dataset; build it with build_preprocessed",
                                    path=directory)
                builders[name] = tfds.builder_from_directory(str(directory))
            splits = sorted(builders[RECORDS_NAME].info.splits)
            if self.split not in splits:
                raise DataError(f"{self.out}: no split {self.split!r}; found {splits}", path=self.out)
            self._records = builders[RECORDS_NAME].as_data_source(self.split)
            self._volumes = builders[VOLUMES_NAME].as_data_source(self.split)
            self.metadata = dict(builders[VOLUMES_NAME].info.metadata or {})
        return self._records, self._volumes

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"record {index} of split {self.split!r} in {self.out}: the split has {self._len}")
        records, volumes = self._open()
        example = records[index]
        volume_index = int(example["volume_index"])
        stored = volumes[volume_index]
        if int(stored["index"]) != volume_index:
            raise DataError(
                f"{self.out}: volume example {volume_index} of split {self.split!r} says it is {int(stored['index'])}; "
                "the dataset was written out of order",
                path=self.out,
            )
        return {"volume": dequantise(stored["volume"]), "record": json.loads(_text(example["record"]))}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_records"] = state["_volumes"] = None
        return state

    def __repr__(self) -> str:
        return f"PreprocessedSource({str(self.out)!r}, split={self.split!r}, len={self._len})"


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def open_preprocessed(out: str | os.PathLike, split: str) -> PreprocessedSource:
    """The records of `split` written by `build_preprocessed(..., out)`, each with its volume."""
    return PreprocessedSource(out, split)
