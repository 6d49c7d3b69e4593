"""The engine's lock: `capacity` generations at a time (1 unless the engine decodes
several sequences together, see llamad.engine.slots), waiters served in arrival order.

The queue is bounded (`max_queue`) and a waiter gives up after `queue_timeout` seconds, so
overload is a fast, clear error instead of a hang. A waiter that is cancelled (its client
hung up) leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import collections
import time


class Overloaded(Exception):
    """The queue is full: answer at once with 429/529 and Retry-After."""

    def __init__(self, queue_depth: int, retry_after: int = 1):
        super().__init__(f"the server is busy: {queue_depth} requests are already waiting for the model")
        self.retry_after = retry_after


class QueueTimeout(Overloaded):
    def __init__(self, waited: float, retry_after: int = 1):
        Exception.__init__(self, f"the request waited {waited:.0f} s for the model and gave up; try again later")
        self.retry_after = retry_after


class ShuttingDown(Overloaded):
    def __init__(self) -> None:
        Exception.__init__(self, "the server is shutting down; retry against another instance or shortly")
        self.retry_after = 5


class Scheduler:
    def __init__(self, max_queue: int = 16, queue_timeout: float = 60.0, capacity: int = 1):
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.capacity = capacity
        self.active = 0  # generations holding the engine
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    @property
    def busy(self) -> bool:
        return self.active > 0

    @property
    def closed(self) -> bool:
        """True once shutdown began (SIGTERM): nothing new is admitted."""
        return self._closed

    def has_waiters(self) -> bool:
        """Whether a request waits for the engine; safe to read from another thread (one
        length read, never an iteration of the queue)."""
        return len(self._waiters) > 0

    @property
    def queue_depth(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def reconfigure(self, max_queue: int, queue_timeout: float) -> None:
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout

    def try_acquire(self) -> bool:
        if self._closed:
            raise ShuttingDown()
        if self.active < self.capacity and not self._waiters:
            self.active += 1
            return True
        return False

    def enqueue(self) -> asyncio.Future[None]:
        """Joins the queue; the future resolves when the lock is handed to this waiter."""
        if self._closed:
            raise ShuttingDown()
        if self.queue_depth >= self.max_queue:
            raise Overloaded(self.queue_depth)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    def abandon(self, waiter: asyncio.Future[None]) -> None:
        """A waiter leaves: if the lock was already handed to it, pass it on."""
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self.release()
        elif not waiter.done():
            waiter.cancel()

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1

    def close(self) -> None:
        """Stop accepting; every waiter gets ShuttingDown."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ShuttingDown())

    def deadline(self) -> float:
        return time.monotonic() + self.queue_timeout
