"""Recycled shared-memory slots: large arrays from Grain worker processes to the main process.

A fresh shared-memory segment per batch makes the worker allocate, zero and later free tmpfs pages
for every batch, several times what stacking the volumes into pages already in place and copying
them out in the main process cost. So each worker keeps a pool of segments, "slots", and reuses
them:

    worker: SlotWriter.stack(arrays)                       main process: SlotReader.take(array)
      take a FREE slot (create one if none is free or        map the slot (once per name), check that
      big enough), mark it BUSY, bump its generation,  ──►   it is BUSY with the descriptor's generation,
      np.stack(arrays, out=<the slot's payload>),            copy the payload into a new numpy array,
      send SlotArray(name, generation, shape, dtype)         mark the slot FREE

A slot is a `multiprocessing.shared_memory` segment: HEADER_BYTES of header (state uint64,
generation uint64, padding that keeps the payload 64-byte aligned), then the payload. The worker
touches only FREE slots and the main process only BUSY ones, so the state word is the whole
protocol; the generation makes a stale or duplicated descriptor an error (`StaleSlotError`) instead
of silently reading another batch. A worker never waits for a slot: the pool grows to what the
prefetch depth holds in flight, and that is the bound on its size.

The main process owns the segments of a run: its `SlotReader` makes the name prefix the workers
use, and `close()` unlinks the segments it has mapped and (Linux) every /dev/shm entry with the
prefix, which covers slots whose chunks never arrived (dropped from Grain's queues when the workers
are stopped). Grain spawns its workers with the parent's resource tracker, so unlinking in the main
process also unregisters the segments the workers created, and no "leaked shared_memory" warning
follows. Close the reader only after the workers have stopped; a reader that is never closed is
released when it is garbage collected or at interpreter exit. Where /dev/shm cannot be listed, the
slots the reader never saw are left to the resource tracker, which unlinks them (with its warning)
when the program ends.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import struct
import threading
from multiprocessing import resource_tracker, util
from multiprocessing.shared_memory import SharedMemory
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

FREE, BUSY = 0, 1
HEADER_BYTES = 64
_HEADER = struct.Struct("=QQ")  # state, generation
_STATE = struct.Struct("=Q")
_STATE_NAMES = {FREE: "FREE", BUSY: "BUSY"}
# Where Linux lists POSIX shared memory; elsewhere only the segments the reader mapped are unlinked.
_SHM_DIR = "/dev/shm"


class StaleSlotError(RuntimeError):
    """A descriptor does not match its slot: the slot was reused or freed before the main process
    read it, or the descriptor is not of this run. A bug in the transfer, never a data problem."""


@dataclasses.dataclass(frozen=True)
class SlotArray:
    """What crosses the process boundary in place of an array: where it lies and what it is.

    name: the shared-memory segment; generation: the slot's generation when the array was written;
    shape, dtype: of the array (`dtype` as `np.dtype.str`).
    """

    name: str
    generation: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class _Slot:
    """One segment of a worker's pool, and the payload size it was made for."""

    def __init__(self, name: str, capacity: int):
        self.shm = SharedMemory(name=name, create=True, size=HEADER_BYTES + capacity)
        self.capacity = capacity  # new segments are zero-filled: FREE, generation 0

    def header(self) -> tuple[int, int]:
        return _HEADER.unpack_from(self.shm.buf, 0)


class SlotWriter:
    """The worker side: stacks arrays into the slots of this process's pool.

    Made in the main process (`SlotReader.writer`) and pickled into each worker, where it gets a
    pool of its own, created on first use; the read threads of a worker share it.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._slots: list[_Slot] = []
        self._created = 0
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])

    def stack(self, arrays: Sequence[np.ndarray]) -> SlotArray:
        """`np.stack(arrays)` written into a free slot; returns its descriptor for `SlotReader.take`.

        arrays: examples of one shape and dtype, e.g. volumes (1, depth, height, width) float32;
          the stacked array is (batch, 1, depth, height, width).
        """
        first = np.asarray(arrays[0])
        shape, dtype = (len(arrays), *first.shape), first.dtype
        nbytes = math.prod(shape) * dtype.itemsize
        slot, generation = self._acquire(nbytes)
        try:
            np.stack(arrays, out=np.ndarray(shape, dtype, buffer=slot.shm.buf, offset=HEADER_BYTES))
        except BaseException:
            _STATE.pack_into(slot.shm.buf, 0, FREE)
            raise
        return SlotArray(slot.shm.name, generation, shape, dtype.str)

    def _acquire(self, nbytes: int) -> tuple[_Slot, int]:
        """A FREE slot of at least `nbytes`, marked BUSY with its next generation."""
        with self._lock:
            free = [slot for slot in self._slots if slot.header()[0] == FREE]
            fitting = [slot for slot in free if slot.capacity >= nbytes]
            if fitting:
                slot = min(fitting, key=lambda s: s.capacity)
            else:
                # Array sizes are static in practice: a free slot too small for this one will be
                # too small again, so it makes room for the new one.
                for small in free:
                    self._slots.remove(small)
                    small.shm.close()
                    small.shm.unlink()
                slot = self._create(nbytes)
            generation = slot.header()[1] + 1
            _HEADER.pack_into(slot.shm.buf, 0, BUSY, generation)
            return slot, generation

    def _create(self, nbytes: int) -> _Slot:
        while True:
            name = f"{self.prefix}{os.getpid()}_{self._created}"
            self._created += 1
            try:
                slot = _Slot(name, nbytes)
            except FileExistsError:  # left by an earlier worker of this run with the same pid
                continue
            self._slots.append(slot)
            logger.debug("shared-memory slot %s: %d bytes, %d in this worker", name, nbytes, len(self._slots))
            return slot


class SlotReader:
    """The main process side of one run of workers: takes arrays out of their slots, owns the segments."""

    def __init__(self):
        self.prefix = f"m2e_{secrets.token_hex(4)}_"
        self._mapped: dict[str, SharedMemory] = {}
        # multiprocessing's finalizer rather than weakref's: at interpreter exit it runs after
        # multiprocessing has stopped the (daemonic) workers of an iterator never closed, so that
        # none of them makes a slot after the release.
        self._release = util.Finalize(
            self, _release_segments, args=(self.prefix, self._mapped), exitpriority=-1
        )

    @property
    def writer(self) -> SlotWriter:
        """The worker side for this run, to pickle into the workers."""
        return SlotWriter(self.prefix)

    @property
    def names(self) -> frozenset[str]:
        """The segments this reader has taken arrays from."""
        return frozenset(self._mapped)

    def take(self, array: SlotArray) -> np.ndarray:
        """The array `array` describes, copied out of its slot (batch axis first); frees the slot.

        A copy, not a view: the slot is rewritten by the worker as soon as it is FREE, and JAX may
        alias a numpy buffer on CPU.

        Raises:
          StaleSlotError: the slot is not BUSY with the descriptor's generation, or too small for it.
        """
        if not self._release.still_active():
            raise StaleSlotError(f"shared-memory slot {array.name}: the reader of this run is closed")
        if not array.name.startswith(self.prefix):
            raise StaleSlotError(f"shared-memory slot {array.name} is not of this run (prefix {self.prefix!r})")
        shm = self._mapped.get(array.name)
        if shm is None:
            shm = self._mapped[array.name] = SharedMemory(name=array.name)
        state, generation = _HEADER.unpack_from(shm.buf, 0)
        if state != BUSY or generation != array.generation:
            raise StaleSlotError(
                f"shared-memory slot {array.name}: the descriptor is of generation {array.generation} but the "
                f"slot is {_STATE_NAMES.get(state, state)} at generation {generation}; the slot was reused or "
                f"freed before this array was read"
            )
        if HEADER_BYTES + array.nbytes > shm.size:
            raise StaleSlotError(
                f"shared-memory slot {array.name} holds {shm.size - HEADER_BYTES} bytes, the descriptor "
                f"{array.shape} {array.dtype} needs {array.nbytes}"
            )
        out = np.ndarray(array.shape, np.dtype(array.dtype), buffer=shm.buf, offset=HEADER_BYTES).copy()
        # FREE only once the copy has returned, so that the worker cannot write into the payload while
        # it is read: x86 never makes a store visible before earlier loads; the ARM architecture
        # allows it, but this store comes thousands of instructions after the copy's last load.
        _STATE.pack_into(shm.buf, 0, FREE)
        return out

    def close(self) -> None:
        """Unlink every segment of the run. Call once the workers have stopped; idempotent."""
        self._release()


def _release_segments(prefix: str, mapped: dict[str, SharedMemory]) -> None:
    for shm in mapped.values():
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:  # a worker replaced it with a bigger slot
            pass
    unseen = [name for name in _listed_segments() if name.startswith(prefix) and name not in mapped]
    for name in unseen:
        try:
            os.unlink(os.path.join(_SHM_DIR, name))
        except FileNotFoundError:
            continue
        # The worker that created it registered it with the resource tracker it shares with us.
        resource_tracker.unregister("/" + name, "shared_memory")
    if mapped or unseen:
        logger.debug("released %d shared-memory slots of run %s (%d never read)", len(mapped) + len(unseen),
                     prefix, len(unseen))
    mapped.clear()


def _listed_segments() -> list[str]:
    try:
        return os.listdir(_SHM_DIR)
    except OSError:
        return []
