"""Dynamic batching: callers submit single images from many threads; one thread runs them through the engine in
batches of up to ``max_batch``, waiting at most ``max_wait_ms`` for a batch to fill."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import numpy as np

from model.engine import Engine
from model.types import Prediction

_STOP = object()


class DynamicBatcher:
    """Thread-safe front of an Engine. ``submit(image).result()`` gives that image's Prediction or raises its error
    (a bad image fails alone; the rest of its batch still succeeds)."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_wait_ms: float = 5.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"Invalid max_batch {max_batch} or max_wait_ms {max_wait_ms}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="chexd-batcher", daemon=True)
        self._thread.start()
        self.batches_run = 0

    def submit(self, image: np.ndarray) -> Future[Prediction]:
        future: Future[Prediction] = Future()
        self._queue.put((image, future))
        return future

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=self.max_wait)
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._process(batch)
            if stop:
                return

    def _process(self, batch: list[tuple[np.ndarray, Future[Prediction]]]) -> None:
        try:
            predictions = self.engine.predict([image for image, _ in batch])
        except Exception:
            for image, future in batch:  # isolate the failing image(s)
                try:
                    future.set_result(self.engine.predict([image])[0])
                except Exception as exc:
                    future.set_exception(exc)
        else:
            for (_, future), prediction in zip(batch, predictions, strict=True):
                future.set_result(prediction)
        self.batches_run += 1
