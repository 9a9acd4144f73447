"""Handing an accepted query to a worker.

One interface, two implementations chosen by settings, so views and consumers never know which
runs: the embedded default's in-process worker thread (no ``REDIS_URL``), or Celery workers on a
Redis queue per model (production; see ``inference/tasks.py``). Callers dispatch only after the
query row is committed.
"""

import logging
import queue
import socket
import threading

from django.conf import settings
from django.db import close_old_connections

logger = logging.getLogger("sightline.dispatch")


class ThreadDispatcher:
    """The embedded default: background threads of the web process own the model.

    The first thread opens the engine once (loads the model, or with ``INFERENCE_BACKEND=openai``
    connects to the engine server); then as many threads as a Celery worker runs take queries from
    an in-process queue, each running one, all feeding the engine (its batch scheduler, or the
    engine server) as a Celery worker does (generation is not done inside a request's event loop,
    and the model is never reloaded).
    """

    def __init__(self, model_id: str | None = None, recover_on_start: bool = True):
        self.model_id = model_id or settings.INFERENCE_MODEL
        self.recover_on_start = recover_on_start
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loaded = threading.Event()
        self.engine = None
        self.load_error: str | None = None
        self.worker_name = f"embedded@{socket.gethostname()}"
        self._cancelled: set[str] = set()
        self._holding = 0  # queries a worker thread has taken and not finished (the scheduler's ``pending``)

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sightline-worker", daemon=True)
                self._thread.start()

    def submit(self, query_id, model: str | None = None, *, stream: bool = True) -> None:
        """Queue a query; ``model`` changes nothing (the embedded default serves one model);
        ``stream`` off: nobody subscribed to its deltas (runner.execute)."""
        self.start()
        self._queue.put((query_id, stream))

    def cancel(self, query_id) -> None:
        self._cancelled.add(str(query_id))

    def recover_orphans(
        self, *, unclaimed_after: float, undispatched_after: float, held_by_live=frozenset(), limit: int = 1000
    ) -> dict:
        """Nothing to recover: the in-process queue lives and dies with this process, whose start
        dispatches the queued queries again."""
        return {"redelivered": 0, "dispatched_again": 0}

    def _stop_check(self, query_id):
        key = str(query_id)
        return lambda: key in self._cancelled

    def unavailable(self, model: str | None = None) -> str | None:
        """None: this thread answers every query itself (model_unavailable, with the load error,
        when its model failed to load)."""
        return None

    def wait_loaded(self, timeout: float | None = None) -> bool:
        self.start()
        return self._loaded.wait(timeout)

    def status(self) -> dict:
        from inference import workers
        from inference.engine import backends

        loaded = self.engine is not None and self.engine.loaded
        batching = [{"worker": self.worker_name, **workers.batch_info(self.engine)}]
        engines = [{"worker": self.worker_name, **backends.engine_status(self.engine)}] if self.engine else []
        own = {"queue": "embedded", "model_loaded": loaded, "workers": 1, "batching": batching, "engines": engines}
        return {
            "mode": "embedded",
            "model": self.model_id,
            "model_loaded": loaded,
            "model_error": self.load_error,
            "queue_depth": self._queue.qsize(),
            "batching": batching,
            "engines": engines,
            # per public model name, as the Celery dispatcher gives it: the one model served here
            "models": {settings.INFERENCE_MODEL_NAME: own},
        }

    def _load(self) -> None:
        from dataclasses import replace

        from inference.engine import EngineError, backends

        config = backends.from_settings()
        if config.backend == "transformers":
            config = replace(config, model=self.model_id)
        try:
            self.engine = backends.open_engine(config, pending=lambda: self._holding)
            logger.info("model %s opened on %s (%s)", config.model, self.engine.device, config.backend)
        except EngineError as exc:
            self.load_error = exc.message
            logger.error("the embedded worker could not load the model: %s", exc.message)
        except Exception as exc:  # noqa: BLE001 - reported on /health and in every query's error
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("the embedded worker could not load the model")
        finally:
            self._loaded.set()

    def _recover(self, publisher) -> None:
        """Queries a previous run of this process left behind: running ones end worker_lost, queued ones re-run."""
        from accounts import quotas
        from inference import runner, workers
        from inference.models import Query

        close_old_connections()
        # The in-process quota counters started empty: rebuild them from the rows first, so that
        # the queries ended below refund what they reserved.
        workers.restore_quotas()
        quotas.backend().mark_restored(quotas.now())
        for query_id in Query.objects.filter(status=Query.Status.RUNNING, worker=self.worker_name).values_list(
            "pk", flat=True
        ):
            runner.fail(query_id, "worker_lost", "The server stopped while this query ran.", publisher=publisher)
        for query_id in Query.objects.filter(status=Query.Status.QUEUED).values_list("pk", flat=True):
            self._queue.put((query_id, True))

    def _run(self) -> None:
        from inference import events, workers

        self._load()
        self.pruner = workers.start_pruner()  # the embedded default's periodic duty: pruning
        publisher = events.Publisher()
        if self.recover_on_start:
            try:
                self._recover(publisher)
            except Exception:
                logger.exception("could not recover queries left by a previous run")
            finally:
                close_old_connections()  # the thread may wait long for work: hold no connection meanwhile
        for number in range(1, max(1, settings.CELERY_WORKER_CONCURRENCY)):
            threading.Thread(
                target=self._serve, args=(publisher,), name=f"sightline-worker-{number}", daemon=True
            ).start()
        self._serve(publisher)

    def _serve(self, publisher) -> None:
        from inference import runner

        while True:
            query_id, stream = self._queue.get()
            with self._lock:
                self._holding += 1
            close_old_connections()
            try:
                if self.engine is None:
                    runner.fail(
                        query_id,
                        "model_unavailable",
                        f"The model is not loaded: {self.load_error}",
                        publisher=publisher,
                    )
                else:
                    from inference.engine.backends import wait_engine

                    wait_engine(self.engine)
                    runner.execute(
                        query_id,
                        self.engine,
                        publisher,
                        self.worker_name,
                        should_stop=self._stop_check(query_id),
                        stream=stream,
                    )
                    self._cancelled.discard(str(query_id))
            except Exception:  # the thread must survive any single query
                logger.exception("embedded worker failed on query %s", query_id)
                try:
                    runner.fail(query_id, "internal_error", "The worker failed on this query.", publisher=publisher)
                except Exception:
                    logger.exception("could not record the failure of query %s", query_id)
            finally:
                with self._lock:
                    self._holding -= 1
                close_old_connections()


_dispatchers: dict[str, object] = {}
_dispatcher_lock = threading.Lock()


def get_dispatcher():
    """The process's dispatcher for the mode the settings say: the in-process worker thread (the
    embedded default) or Celery. One of each at most, so a process whose settings change mode (the
    tests do) finds its loaded embedded worker again when it changes back."""
    mode = "embedded" if settings.EMBEDDED else "celery"
    with _dispatcher_lock:
        if mode not in _dispatchers:
            if settings.EMBEDDED:
                _dispatchers[mode] = ThreadDispatcher()
            else:
                from inference.tasks import CeleryDispatcher

                _dispatchers[mode] = CeleryDispatcher()
        return _dispatchers[mode]
