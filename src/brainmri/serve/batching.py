"""Micro-batching for `brainmri serve`: requests that arrive together are
answered by one model call, as TF Serving's and Triton's dynamic batchers do.

Request threads submit one decoded image each and wait on a future; a single
batching thread takes whatever is queued (up to `max_batch`), waits at most
`max_wait` seconds for more, runs the model once, and hands each request its
own result. One model call for sixteen images costs little more than one
for a single image, and only one thread runs the model at a time.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np


class MicroBatcher:
    def __init__(self, predict: Callable[[np.ndarray], list[Any]], max_batch: int, max_wait: float) -> None:
        self._predict = predict
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: queue.Queue[tuple[np.ndarray, Future]] = queue.Queue()
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # the latest batches run; bounded, the server runs for days
        threading.Thread(target=self._run, name="micro-batcher", daemon=True).start()

    def submit(self, array: np.ndarray) -> Future:
        """Queue one image; the future's result is what `predict` returned for it."""
        future: Future = Future()
        self._queue.put((array, future))
        return future

    def _next_batch(self) -> list[tuple[np.ndarray, Future]]:
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = [(array, future) for array, future in self._next_batch() if future.set_running_or_notify_cancel()]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = self._predict(np.stack([array for array, _ in batch]))
            except Exception as error:  # every waiting request gets the error, the thread goes on
                for _, future in batch:
                    future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)
