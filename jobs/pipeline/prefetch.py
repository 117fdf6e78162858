"""Build requests ahead of admission, in a background thread.

Reading the source, rendering the chat template and tokenizing cost about a millisecond per row
on the CPU: done in the generation loop's thread they would stall the engine's step pipeline.
The loop's thread mostly waits for the GPU (with the GIL released), so a producer thread that
keeps a bounded queue of ready requests uses that time instead. The order of the requests is
the source's, exactly as without the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()


class Prefetcher(Generic[T]):
    """An iterator over ``items``, computed up to ``depth`` ahead in a daemon thread.

    An exception raised by ``items`` is raised by ``next`` in the consumer, in order. ``close``
    stops the producer (it is left alone after that; the queue is dropped).
    """

    def __init__(self, items: Iterator[T], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._closed = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._produce, args=(items,), name="request-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(_Failure(e))
            return
        self._put(_END)

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        return item

    def close(self, timeout: float = 10.0) -> None:
        """Stop the producer after its current item and wait for it (up to ``timeout`` seconds): a
        process that exits while the producer is inside native code (a source reader, a tokenizer)
        can abort in that library's teardown ("terminate called without an active exception")."""
        self._closed.set()
        self._done = True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error
