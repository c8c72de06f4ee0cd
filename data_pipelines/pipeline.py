"""The Grain pipeline: annotation records (or preprocessed TFDS examples) to static-shape batches.

    indices 0..N-1 ── shuffle(seed), reshuffled every epoch ── repeat(num_epochs)      MapDataset
      ── [process_index::process_count]        this host's share of every global batch: the visits
      ── [next_index:]                         where the iterator state says to resume
      ── map(LoadExample)                      read, preprocess, augment(seed, epoch, index), tokenize
      ── batch(batch_size, make_chunk)         a Chunk: the good examples stacked, the bad ones aside
      ── to_iter_dataset(ReadOptions)          `read_threads` threads per process
      ── mp_prefetch(worker_count)             worker w makes chunks w, w+W, …; interleaved back in order
      ── BatchIterator                         main process: count and log skips, cut batches

Every visit makes one example or one `Skipped`, and chunks are fixed runs of `batch_size` visits, so
the stream is the same whatever the number of workers or threads, and a position in it is a complete
iterator state. A chunk without a bad example is the batch itself; around a skip the main process
joins the pieces. Sharding by striding the shuffled stream gives process p the visits p, p+P, p+2P,
…: with batch size B per process, batch k of all processes together is exactly batch k of a single
process with batch size B·P (as long as no example is skipped).

A bad example (a `DataError`: unreadable or malformed volume, broken record) leaves no hole in the
stream: `LoadExample` returns a `Skipped` marker in its place, and the markers travel to the main
process, where `BatchIterator` drops them. Counting there, rather than filtering in the workers
(as a `grain` filter would), keeps one counter and one log for the host (workers have their own
memory and log handlers), keeps the batches independent of the worker count (a filter before
`mp_prefetch` shifts which examples share a batch), and puts the count in the iterator state, so a
resumed run keeps its skip budget. In strict mode the marker's error is raised instead. The budget
(`max_skip_fraction`) is judged on every batch once `MIN_SEEN_BEFORE_ABORT` examples were read, at
the end of the data, and (`BatchIterator.check_skip_budget`) at the end of a training run that stops
before the data does.

The iterator state is `{"next_index": visits consumed, "skipped": …}` plus the parameters that define
the visit stream (record count, seed, shuffle, epochs, process index and count), which `set_state`
checks: a few JSON integers that survive changes of worker count, thread count, batch size and Grain
version (Grain's own nested states promise none of these), for the trainer's checkpoint. Restoring
restarts the inner pipeline at `next_index`.

Skips are per host: hosts that skip different numbers of examples drift apart by those examples and
may end an epoch a batch apart; a multi-host trainer should run a fixed number of steps over
`num_epochs=None` (repeat forever) rather than to the end of the data.

From the workers, the volumes cross in shared memory that is recycled (`shm_slots`): a worker
stacks them straight into one of its slots and the chunk carries a small descriptor in their place;
the main process copies them out as the chunk arrives and frees the slot, and unlinks the run's
slots when the iterator is closed, restored or exhausted. A fresh segment per batch would cost the
worker its page faults and zeroing every time, several times the stack and the copy together. The
token arrays are pickled. Without workers nothing goes through shared memory. For the same reason
each worker process tells glibc's malloc to keep freed large arrays' memory (`_keep_freed_memory`),
so that preprocessing a volume does not fault in fresh pages either.

Nothing here touches JAX: the process index and count are plain ints that the caller reads once
(`jax.process_index()`, `jax.process_count()`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import logging
import threading
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from data_pipelines import shm_slots
from data_pipelines.annotations import validate_record
from data_pipelines.errors import DataError, RecordError, VolumeShapeError
from data_pipelines.model_inputs import InputSpec, load_volume, record_inputs, volume_limits
from data_pipelines.preprocess import augment

logger = logging.getLogger(__name__)

# Within a run the skip budget is judged once this many examples were read, so that one bad file among
# the first few does not abort a run whose overall skip rate is fine; at the end of the data, and at
# the end of a run (`BatchIterator.check_skip_budget`), it is judged whatever the count.
MIN_SEEN_BEFORE_ABORT = 20

BATCH_KEYS = ("volume", "input_ids", "labels", "attention_mask", "question_ids", "question_mask", "record_index")


class TooManySkipsError(RuntimeError):
    """More than `max_skip_fraction` of the examples read so far were bad. Not a `DataError`: it is
    about the data set, not one input, and must never be skipped itself."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in the element stream for an example that could not be made."""

    record_index: int
    error: DataError


# ---------------------------------------------------------------------------------------------------
# One example.


class LoadExample:
    """`(epoch, record_index)` → one example's model inputs, or `Skipped`.

    `source` is either a sequence of annotation records (`vision3d` paths read from disk and
    preprocessed here) or a random-access source of preprocessed examples `{"volume", "record"}`
    (`tfds_builder.open_preprocessed`), whose volumes are already at `cfg.volume_shape`. Records were
    validated once, in `make_dataset`: `invalid` maps the index of each bad one to its error.
    """

    def __init__(self, source, cfg, *, train: bool, tokenizer, question_tokenizer,
                 invalid: Mapping[int, DataError] | None = None):
        self.source = source
        self.from_records = _is_record_list(source)
        self.invalid = dict(invalid or {})
        self.spec = InputSpec(
            volume_shape=tuple(int(s) for s in cfg.volume_shape), num_vision_tokens=int(cfg.num_vision_tokens),
            max_length=int(cfg.max_length), question_max_length=int(cfg.question_max_length),
            template=cfg.template, modality=cfg.modality, hu_window=tuple(float(w) for w in cfg.hu_window),
            data_root=cfg.get("image_root") or None, allow_outside_root=bool(cfg.get("allow_outside_root", False)),
            limits=volume_limits(cfg),
        )
        self.augment = bool(train and cfg.augment)
        self.seed = int(cfg.seed)
        self.tokenizer = tokenizer
        self.question_tokenizer = question_tokenizer
        self._tokenizer_lock = threading.Lock()

    # Fast tokenizers keep truncation/padding settings in shared Rust state, which concurrent calls
    # from the reader threads would fight over ("Already borrowed"); tokenizing is cheap, so one lock.
    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_tokenizer_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tokenizer_lock = threading.Lock()

    def __call__(self, visit: tuple[int, int]) -> dict[str, np.ndarray] | Skipped:
        epoch, index = visit
        if index in self.invalid:
            return Skipped(index, self.invalid[index])
        try:
            return self.example(epoch, index)
        except DataError as error:
            return Skipped(index, error)

    def example(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        if self.from_records:
            record = self.source[index]
            volume = load_volume(record["vision3d"][0], self.spec, record_id=record.get("id", f"#{index}"))
        else:
            item = self.source[index]
            record = _decode_record(item["record"], index)
            volume = _check_preprocessed(item["volume"], self.spec.volume_shape, record)
        if self.augment:
            volume = augment(volume, seed=self.seed, epoch=epoch, index=index)
        with self._tokenizer_lock:
            inputs = record_inputs(record, self.spec, self.tokenizer, self.question_tokenizer,
                                   volume=np.ascontiguousarray(volume, np.float32))
        return dict(inputs, record_index=np.int64(index))


def _is_record_list(source) -> bool:
    return isinstance(source, Sequence) and (len(source) == 0 or isinstance(source[0], Mapping))


def _decode_record(record, index: int) -> dict:
    if isinstance(record, (bytes, np.bytes_)):
        record = record.decode("utf-8")
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as error:
            raise RecordError(f"preprocessed example {index}: its record is not valid JSON: {error}",
                              path=f"#{index}") from None
    validate_record(record, index=index)
    return record


def _check_preprocessed(volume, shape, record) -> np.ndarray:
    volume = np.asarray(volume, np.float32)
    if volume.shape == shape:
        volume = volume[None]
    if volume.shape != (1, *shape):
        raise VolumeShapeError(
            f"preprocessed volume of record {record.get('id')!r} has shape {volume.shape}; expected "
            f"(1, {', '.join(map(str, shape))}) (cfg.volume_shape): rebuild the TFDS data set at this shape",
            path=record.get("vision3d", [record.get("id")])[0],
        )
    return volume


# ---------------------------------------------------------------------------------------------------
# The order of visits.


class _WithEpoch:
    """Position in the repeated stream → (epoch, record index)."""

    def __init__(self, num_records: int):
        self.num_records = num_records

    def __call__(self, position: int, index) -> tuple[int, int]:
        return position // self.num_records, int(index)


def visit_order(num_records: int, cfg, *, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """This process's `(epoch, record_index)` visits: a seeded shuffle, a new one each epoch, repeated
    `cfg.num_epochs` times (None: forever), then every `process_count`-th visit from `process_index`."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count})")
    if num_records == 0:
        raise ValueError("the data set has no records")
    visits = grain.MapDataset.range(num_records)
    if cfg.shuffle:
        visits = visits.shuffle(seed=int(cfg.seed))
    visits = visits.repeat(cfg.num_epochs).map_with_index(_WithEpoch(num_records))
    return visits[process_index::process_count]


# ---------------------------------------------------------------------------------------------------
# Chunks: what the workers send.

# Arrays this large cross from the workers in shared memory; the token arrays are cheaper to pickle.
SHARED_MEMORY_MIN_BYTES = 1 << 20


def stack_examples(
    examples: Sequence[Mapping[str, np.ndarray]], *, slots: shm_slots.SlotWriter | None = None
) -> dict[str, np.ndarray | shm_slots.SlotArray]:
    """Examples → one batch of numpy arrays, the batch axis first.

    `volume` (batch, 1, depth, height, width) float32; `input_ids`, `labels`, `attention_mask`
    (batch, length) int32; `question_ids`, `question_mask` (batch, question_length) int32;
    `record_index` (batch,) int64. (No question arrays when the pipeline has no question tokenizer.)

    slots: in a worker process, its shared-memory slots: an array of at least SHARED_MEMORY_MIN_BYTES
      is stacked into one of them and its `SlotArray` descriptor stands in its place (the main
      process's `SlotReader.take` turns it back into the array).
    """
    keys = [key for key in BATCH_KEYS if key in examples[0]]
    batch = {}
    for key in keys:
        arrays = [np.asarray(example[key]) for example in examples]
        if slots is not None and arrays[0].nbytes * len(arrays) >= SHARED_MEMORY_MIN_BYTES:
            batch[key] = slots.stack(arrays)
        else:
            batch[key] = np.stack(arrays)
    return batch


@dataclasses.dataclass(frozen=True)
class Chunk:
    """`batch_size` consecutive visits as made in a worker: the good examples stacked, the bad ones aside.

    A leaf for Grain's tree functions (not a NamedTuple), so that Grain pickles it whole and moves
    no array of it through shared memory of its own: from a worker, the large arrays are
    `SlotArray` descriptors of the worker's recycled slots, which `BatchIterator` replaces by the
    arrays as the chunk arrives.

    examples: `stack_examples` of the good ones, in visit order (None if there are none).
    visits: how many visits the chunk covers (`batch_size`, fewer at the end of the data).
    skipped: {position in the chunk: Skipped}.
    """

    examples: dict[str, np.ndarray | shm_slots.SlotArray] | None
    visits: int
    skipped: dict[int, Skipped]


def make_chunk(elements: Sequence[dict | Skipped], *, slots: shm_slots.SlotWriter | None = None) -> Chunk:
    good = [e for e in elements if not isinstance(e, Skipped)]
    return Chunk(
        examples=stack_examples(good, slots=slots) if good else None,
        visits=len(elements),
        skipped={i: e for i, e in enumerate(elements) if isinstance(e, Skipped)},
    )


# ---------------------------------------------------------------------------------------------------
# Batches, skips and the iterator state, in the main process.


class Batches(grain.IterDataset):
    """This process's batches: examples of `visits` made by `load`, `batch_size` at a time, bad ones skipped.

    The examples come from an inner Grain pipeline (reader threads, worker processes) that starts at
    a given visit and delivers chunks of `batch_size` consecutive visits, stacked in the worker; a
    chunk without a bad example is passed on as the batch itself. The iterator state is
    a position in the visit stream and the skip count — valid for any worker or thread count and any
    Grain version — and restoring it starts the inner pipeline at that position.
    """

    def __init__(self, visits: grain.MapDataset, load: LoadExample, cfg, *, identity: Mapping[str, Any]):
        super().__init__()
        self.visits = visits
        self.load = load
        self.batch_size = int(cfg.batch_size)
        self.drop_remainder = bool(cfg.drop_remainder)
        self.strict = bool(cfg.strict)
        self.max_skip_fraction = float(cfg.max_skip_fraction)
        self.read_options = grain.ReadOptions(
            num_threads=int(cfg.read_threads), prefetch_buffer_size=int(cfg.prefetch_buffer_size)
        )
        self.worker_count = int(cfg.worker_count)
        self.identity = dict(identity)
        if self.batch_size < 1:
            raise ValueError(f"cfg.batch_size must be positive, got {cfg.batch_size}")

    def chunks(self, start: int, slots: shm_slots.SlotWriter | None = None) -> grain.DatasetIterator:
        """`Chunk`s of the visits from `start` on, in order.

        slots: with worker processes, the slots the workers stack large arrays into (descriptors in
          the chunks); None (no workers): the chunks hold every array.
        """
        batch_fn = functools.partial(make_chunk, slots=slots)
        chunks = self.visits[start:].map(self.load).batch(self.batch_size, batch_fn=batch_fn)
        chunks = chunks.to_iter_dataset(self.read_options)
        if self.worker_count > 0:
            _mark_absl_flags_parsed()
            chunks = chunks.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count),
                                        worker_init_fn=_keep_freed_memory)
        return chunks.__iter__()

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)

    def __str__(self) -> str:
        return f"Batches(batch_size={self.batch_size}, workers={self.worker_count}, {self.identity})"


class BatchIterator(grain.DatasetIterator):
    """Batches of `Batches`; `get_state()` → `{"next_index", "skipped", **identity}` (JSON)."""

    def __init__(self, dataset: Batches):
        super().__init__()
        self.dataset = dataset
        self.next_index = 0  # visits consumed: examples batched plus examples skipped
        self.skipped = 0
        self._chunks: grain.DatasetIterator | None = None  # started on the first batch
        self._slots: shm_slots.SlotReader | None = None  # the workers' shared memory, while they run
        self._chunk: Chunk | None = None
        self._position = 0  # visits of `_chunk` consumed
        self._row = 0  # good examples of `_chunk` consumed
        self._last_skipped: Skipped | None = None

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._next_batch()
        self._check_budget(at_end=False)  # every batch: a run must not go on over budget without a new skip
        return batch

    def check_skip_budget(self) -> None:
        """TooManySkipsError if more than `max_skip_fraction` of the examples read so far were skipped,
        however few were read: for the trainer at the end of a run, which may stop before the data does."""
        self._check_budget(at_end=True)

    def _next_batch(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self._chunks is None:
            if self.dataset.worker_count > 0:
                self._slots = shm_slots.SlotReader()
            self._chunks = self.dataset.chunks(self.next_index, self._slots.writer if self._slots else None)
        size = self.dataset.batch_size
        pieces: list[dict[str, np.ndarray]] = []
        count = 0
        while count < size:
            if self._chunk is None or self._position == self._chunk.visits:
                try:
                    self._chunk, self._position, self._row = self._next_chunk(), 0, 0
                except StopIteration:
                    self._chunk = None
                    if self._slots is not None:  # every worker has delivered its last chunk
                        self._slots.close()
                    self._check_budget(at_end=True)
                    if count and not self.dataset.drop_remainder:
                        break
                    raise
            chunk = self._chunk
            if count == 0 and self._position == 0 and chunk.visits == size and not chunk.skipped:
                self._position, self.next_index = size, self.next_index + size
                return dict(chunk.examples)
            first_row = self._row
            while self._position < chunk.visits and count < size:
                skipped = chunk.skipped.get(self._position)
                self._position += 1
                self.next_index += 1
                if skipped is not None:
                    self._skip(skipped)
                else:
                    self._row += 1
                    count += 1
            if self._row > first_row:
                pieces.append({key: value[first_row : self._row] for key, value in chunk.examples.items()})
        return {key: np.concatenate([piece[key] for piece in pieces]) for key in pieces[0]}

    def _next_chunk(self) -> Chunk:
        chunk = next(self._chunks)
        if self._slots is None or chunk.examples is None:
            return chunk
        # Taken at once, so that the slots go back to the workers before the chunk is used up.
        examples = {
            key: self._slots.take(value) if isinstance(value, shm_slots.SlotArray) else value
            for key, value in chunk.examples.items()
        }
        return dataclasses.replace(chunk, examples=examples)

    def _skip(self, skipped: Skipped) -> None:
        if self.dataset.strict:
            raise skipped.error
        self.skipped += 1
        self._last_skipped = skipped
        logger.warning(
            "skipping record %d (%s): %s: %s [%d of %d examples skipped so far]",
            skipped.record_index, skipped.error.path, type(skipped.error).__name__, skipped.error,
            self.skipped, self.next_index,
        )
        self._check_budget(at_end=False, last=skipped)

    def _check_budget(self, *, at_end: bool, last: Skipped | None = None) -> None:
        seen, budget = self.next_index, self.dataset.max_skip_fraction
        if self.skipped <= budget * seen or (not at_end and seen < MIN_SEEN_BEFORE_ABORT):
            return
        last = last or self._last_skipped
        last_line = f"; the last: {last.error}" if last is not None else ""
        raise TooManySkipsError(
            f"skipped {self.skipped} of {seen} examples ({self.skipped / seen:.1%}), more than "
            f"max_skip_fraction={budget:g}: the data set is broken or misconfigured (the warnings above "
            f"name each file{last_line}). Fix or remove the bad records, or raise cfg.max_skip_fraction."
        )

    def get_state(self) -> dict[str, Any]:
        return dict(next_index=self.next_index, skipped=self.skipped, **self.dataset.identity)

    def set_state(self, state: Mapping[str, Any]) -> None:
        different = {
            key: (state.get(key), value) for key, value in self.dataset.identity.items() if state.get(key) != value
        }
        if different:
            raise ValueError(
                "the iterator state belongs to another data stream; (saved, now): "
                + ", ".join(f"{key}={saved!r} vs {now!r}" for key, (saved, now) in different.items())
            )
        self._close_chunks()
        self.next_index = int(state["next_index"])
        self.skipped = int(state["skipped"])

    def _close_chunks(self) -> None:
        if self._chunks is not None:
            self._chunks.close()  # stops the workers before their slots are unlinked
        if self._slots is not None:
            self._slots.close()
        self._chunks, self._slots, self._chunk, self._position, self._row = None, None, None, 0, 0

    def close(self) -> None:
        self._close_chunks()
        super().close()

    def __str__(self) -> str:
        return f"BatchIterator(next_index={self.next_index}, skipped={self.skipped})"


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20
_TRIM_THRESHOLD = 1 << 30


def _keep_freed_memory(worker_index: int, worker_count: int) -> None:
    """Worker start: glibc's malloc keeps freed large arrays' memory for the next ones.

    By default it gives each array of a few MB (a volume, the temporaries of preprocessing it) a
    fresh mmap, or trims the heap top when it is freed, so every volume faults in and zeroes new
    pages: the cost the shared-memory slots remove from the transfer, here in preprocessing. A fixed
    mmap threshold and a high trim threshold keep them in the heap: a worker holds on to its peak
    heap between batches instead of returning it and faulting it in again. Only in
    the worker processes, which the pipeline owns; a no-op without glibc's `mallopt`.
    """
    del worker_index, worker_count
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    settings = ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    for parameter, value in settings:
        if mallopt(parameter, value) != 1:
            logger.debug("mallopt(%d, %d) was refused; freed memory goes back to the system", parameter, value)


def _mark_absl_flags_parsed() -> None:
    # Grain 0.2.x reads an absl flag when it starts worker processes, which raises
    # UnparsedFlagAccessError in programs that do not run under absl.app (google/grain#1355).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(
    records_or_source,
    cfg,
    *,
    train: bool,
    tokenizer,
    question_tokenizer,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """The batches of this process, as a Grain `IterDataset`.

    Args:
      records_or_source: a list of annotation records (`annotations.load_records(..., validate=False)`
        leaves bad ones for the pipeline to skip; `vision3d` paths must be resolved), or a random-access
        source of preprocessed examples `{"volume", "record"}` (`tfds_builder.open_preprocessed`).
      cfg: the data config (`med2e3_jax.data_config.data_config()`).
      train: augment (if `cfg.augment`) — evaluation reads volumes as they are.
      tokenizer: the LLM's tokenizer; question_tokenizer: TG-IS's BERT tokenizer, or None for a model
        without the question branch (the batches then have no `question_ids` / `question_mask`).
      process_index, process_count: this host among all (`jax.process_index()`, `jax.process_count()`,
        read by the caller).

    Returns:
      An `IterDataset` of dicts (see `stack_examples`) with `cfg.batch_size` examples each (the last
      one smaller unless `cfg.drop_remainder`). Its iterator's `get_state()` is a small JSON-able dict
      (`next_index`, `skipped`, …) and `set_state()` resumes at the batch after it, in a new process too.
      Close the iterator (`.close()`) when done with it to stop worker processes promptly.
    """
    invalid = {}
    if _is_record_list(records_or_source):
        for index, record in enumerate(records_or_source):
            try:
                validate_record(record, index=index)
            except RecordError as error:
                invalid[index] = error  # skipped at each visit, counted against the skip budget
    load = LoadExample(records_or_source, cfg, train=train, tokenizer=tokenizer,
                       question_tokenizer=question_tokenizer, invalid=invalid)
    visits = visit_order(len(records_or_source), cfg, process_index=process_index, process_count=process_count)
    identity = dict(
        num_records=len(records_or_source), seed=int(cfg.seed), shuffle=bool(cfg.shuffle),
        num_epochs=None if cfg.num_epochs is None else int(cfg.num_epochs),
        process_index=int(process_index), process_count=int(process_count),
    )
    return Batches(visits, load, cfg, identity=identity)
