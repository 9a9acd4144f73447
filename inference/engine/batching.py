"""Many queries per model at once: a batch decodes several conversations in one transformers
``generate``, and the worker's scheduler gathers queries into batches as they arrive.

What is built, and why: **static batching with a short gathering window**. The scheduler takes the
first waiting query, waits at most ``INFERENCE_BATCH_WAIT_MS`` for company (up to
``INFERENCE_MAX_BATCH`` queries and ``INFERENCE_MAX_BATCH_TOKENS`` tokens of prompt and answer),
and decodes them together, left-padded, one row per choice. Each row samples, stops (EOS, stop
strings, its own ``max_tokens``, its grammar), streams and is cancelled on its own
(``decoding.Row``); a finished row is padded until the batch ends, and queries that arrive
meanwhile form the next batch. Continuous batching (joining a running batch) needs a cache that
can take new sequences mid-flight — a paged KV cache and a model runner that schedules every step
— which transformers' ``generate`` does not offer; that is what the vLLM/SGLang engine-server
backend is for. Static batching keeps transformers' own cache, GLM's multimodal rope positions and
every sampling feature, and a batch of queries arriving together decodes at nearly the cost of one.

The gathering window costs a query that comes alone the whole window. A worker therefore tells
its scheduler how many queries it holds (``pending``: taken from the queue, not yet finished);
when every one of them has reached the scheduler, no other is on its way and the batch starts at
once. Without ``pending`` (the engine used on its own) the window is waited out.

A CUDA out-of-memory in a batch that has streamed nothing yet is retried as two halves, down to
single queries: only a query that fails alone ends ``gpu_oom``.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable

from inference.engine.request import Delta, EngineRequest, Result

logger = logging.getLogger("sightline.engine")

_DONE = object()


class Generation:
    """One query's answer being generated (in a batch). Iterate for its ``Delta`` pieces (every
    choice's); afterwards ``result`` is its ``Result``. An error is raised from the iteration as
    ``EngineError``."""

    def __init__(self, engine, request: EngineRequest, should_stop=None):
        self.engine = engine
        self.request = request
        self.should_stop = should_stop
        self.result: Result | None = None
        self.prepared = None  # the encoded conversation, made once (also for a retry)
        self.emitted = False  # whether any piece reached the client (a batch is not retried then)
        self._queue: queue.Queue = queue.Queue()
        self._error = None

    # the batch's side
    def put(self, delta: Delta) -> None:
        self.emitted = True
        self._queue.put(delta)

    def finish(self, result: Result) -> None:
        self.result = result
        self._queue.put(_DONE)

    def fail(self, error) -> None:
        self._error = error
        self._queue.put(_DONE)

    # the caller's side
    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is _DONE:
                break
            yield item
        if self._error is not None:
            raise self._error


def run_batch(engine, generations: list[Generation]) -> None:
    """Decode these queries together; each gets its pieces, then its result or its error."""
    live = []
    for generation in generations:
        try:
            if generation.prepared is None:
                generation.prepared = engine.prepare(generation.request)
        except Exception as exc:  # a bad conversation fails its own query only
            generation.fail(engine.translate_error(exc))
            continue
        live.append(generation)
    if not live:
        return
    try:
        results = engine.decode([g.prepared for g in live], live)
    except BaseException as exc:
        if engine.is_oom(exc) and len(live) > 1 and not any(g.emitted for g in live):
            engine.free_memory()
            half = len(live) // 2
            logger.warning(
                "out of memory in a batch of %d queries: retrying as %d + %d", len(live), half, len(live) - half
            )
            run_batch(engine, live[:half])
            run_batch(engine, live[half:])
            return
        error = engine.translate_error(exc)
        for generation in live:
            generation.fail(error)
        return
    for generation, result in zip(live, results, strict=True):
        generation.finish(result)


class Scheduler:
    """The worker's one engine thread: gathers queries into batches and decodes them, one batch at a
    time. ``submit`` returns at once; the caller iterates its ``Generation``.

    ``pending``: how many queries the worker holds now (taken, not yet finished), or None; see the
    module's docstring."""

    # While queries are on their way, how often the gathering looks whether they all arrived.
    POLL_SECONDS = 0.0005

    def __init__(
        self,
        engine,
        *,
        max_batch: int,
        wait_seconds: float,
        max_tokens: int,
        pending: Callable[[], int] | None = None,
    ):
        self.engine = engine
        self.max_batch = max(1, max_batch)
        self.wait_seconds = max(0.0, wait_seconds)
        self.max_tokens = max_tokens
        self.pending = pending
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._submitted = 0  # queries put in the queue (counted after the put)
        self._settled = 0  # of them, those that have finished or failed
        # For the heartbeat and /metrics: the rows of the batch running now, and recent tokens/s.
        self.batch_rows = 0
        self.max_batch_rows = 0  # the largest batch since the worker started
        self.tokens_per_second = 0.0

    def submit(self, generation: Generation) -> Generation:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sightline-scheduler", daemon=True)
                self._thread.start()
        self._queue.put(generation)
        with self._lock:
            self._submitted += 1
        return generation

    def _coming(self) -> int | None:
        """Queries the worker holds that have not reached the scheduler yet; None when unknown."""
        if self.pending is None:
            return None
        try:
            holding = int(self.pending())
        except Exception:  # noqa: BLE001 - unknown: wait the window, as without pending
            return None
        with self._lock:
            in_flight = self._submitted - self._settled
        return max(0, holding - in_flight)

    def _cost(self, generation: Generation) -> int:
        """Tokens of prompt and answer the query may hold in the batch (every choice)."""
        try:
            if generation.prepared is None:
                generation.prepared = self.engine.prepare(generation.request)
        except Exception as exc:
            generation.fail(self.engine.translate_error(exc))
            return -1
        sampling = generation.request.sampling
        return (generation.prepared.prompt_tokens + sampling.max_new_tokens) * sampling.n

    def _gather(self, first: Generation) -> tuple[list[Generation], Generation | None]:
        batch, budget = [], 0
        cost = self._cost(first)
        if cost >= 0:
            batch.append(first)
            budget = cost
        else:
            self._settled += 1  # failed in its preparation
        deadline = time.monotonic() + self.wait_seconds
        while len(batch) < self.max_batch:
            try:
                candidate = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                coming = self._coming()
                if coming == 0:
                    break  # every query the worker holds is here: no one to wait for
                try:
                    candidate = self._queue.get(timeout=left if coming is None else min(left, self.POLL_SECONDS))
                except queue.Empty:
                    continue
            cost = self._cost(candidate)
            if cost < 0:
                self._settled += 1  # failed in its preparation
                continue
            if batch and budget + cost > self.max_tokens:
                return batch, candidate  # it opens the next batch
            batch.append(candidate)
            budget += cost
        return batch, None

    def _loop(self) -> None:
        carried = None
        while True:
            first = carried if carried is not None else self._queue.get()
            batch, carried = self._gather(first)
            if not batch:
                continue
            started = time.monotonic()
            self.batch_rows = sum(g.request.sampling.n for g in batch)
            self.max_batch_rows = max(self.max_batch_rows, self.batch_rows)
            try:
                run_batch(self.engine, batch)
            except Exception:  # never lose the engine thread; run_batch fails its queries itself
                logger.exception("a batch failed")
                for generation in batch:
                    if generation.result is None:
                        generation.fail(self.engine.translate_error(RuntimeError("batch failed")))
            finally:
                self._settled += len(batch)
                tokens = sum(g.result.completion_tokens for g in batch if g.result is not None)
                elapsed = max(time.monotonic() - started, 1e-6)
                self.tokens_per_second = round(tokens / elapsed, 1)
                self.batch_rows = 0
