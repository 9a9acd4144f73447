"""``GET /metrics`` in Prometheus' text format.

Every figure is read from state the whole deployment shares — the daily rollups, the live rows of
the query log, the workers' heartbeats — not from counters kept in one process, so any web process
answers for all of them, and a restart loses nothing:

* ``sightline_requests_total{tenant,outcome}`` — queries that ended (``succeeded``, ``failed``) and
  quota refusals (``rejected``); ``sightline_tokens_total{tenant,kind}``; and
  ``sightline_request_duration_seconds{tenant}``, a histogram of acceptance-to-answer time of the
  succeeded ones (the rollups' buckets). All from ``UsageDaily``, never a scan of the query log.
  The ``tenant`` label only when ``METRICS_TOKEN`` is set (the scraper proved it holds it); the
  open endpoint gives the same series summed over all tenants, without the label.
* ``sightline_queue_depth{model}`` and ``sightline_queries_running{model}`` — accepted queries
  waiting for a worker, and running, per served model.
* ``sightline_recent_{queue,first_token,total}_seconds{model,quantile}`` — p50/p90/p99 per model
  over the queries that succeeded in the last ``METRICS_WINDOW_SECONDS`` (300): time queued, to the
  first token, and in all.
* ``sightline_workers{model,queue}`` — live workers with the model loaded, per served model (1 for
  the embedded thread).
* ``sightline_worker_batch_rows{model,worker}``, ``sightline_worker_max_batch_rows{model,worker}``
  and ``sightline_worker_tokens_per_second{model,worker}`` — each worker's batching, from its heartbeat.

The usage series (requests, tokens, durations) come from the daily rollups, summed over their keys,
models and endpoints per tenant (``selectors.usage_by_tenant``): they carry no ``model`` label.
"""

import itertools
from datetime import timedelta

from django.conf import settings
from django.db.models import Count
from django.utils import timezone
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder

from inference import selectors
from inference.dispatch import get_dispatcher
from inference.models import Query, UsageDaily
from inference.services import served_models

QUANTILES = (0.5, 0.9, 0.99)
USAGE_FIELDS = ("succeeded", "failed", "rejected", "prompt_tokens", "completion_tokens", "latency_ms_total")


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class SightlineCollector:
    def __init__(self, *, per_tenant: bool):
        self.per_tenant = per_tenant

    def collect(self):
        yield from self._usage()
        yield from self._live()
        yield from self._recent()
        status = get_dispatcher().status()
        workers = GaugeMetricFamily(
            "sightline_workers", "Live workers with the model loaded", labels=["model", "queue"]
        )
        for model, served in status["models"].items():
            workers.add_metric([model, served["queue"]], served["workers"] if served["model_loaded"] else 0)
        yield workers
        yield from self._batching(status["models"])

    def _batching(self, models: dict):
        """Per worker, from its heartbeat: the batch it decodes now, its largest, its tokens/s."""
        labels = ["model", "worker"]
        families = {
            "batch_rows": GaugeMetricFamily(
                "sightline_worker_batch_rows", "Sequences in the batch a worker decodes now", labels=labels
            ),
            "max_batch_rows": GaugeMetricFamily(
                "sightline_worker_max_batch_rows", "The largest batch a worker has decoded", labels=labels
            ),
            "tokens_per_second": GaugeMetricFamily(
                "sightline_worker_tokens_per_second", "Tokens per second of a worker's last batch", labels=labels
            ),
        }
        for model, served in models.items():
            for worker in served.get("batching", []):
                for key, family in families.items():
                    family.add_metric([model, str(worker.get("worker", "?"))], float(worker.get(key) or 0))
        yield from families.values()

    def _usage(self):
        label = ["tenant"] if self.per_tenant else []
        requests = CounterMetricFamily(
            "sightline_requests", "Queries that ended, and quota refusals", labels=[*label, "outcome"]
        )
        tokens = CounterMetricFamily("sightline_tokens", "Tokens of queries that ended", labels=[*label, "kind"])
        duration = HistogramMetricFamily(
            "sightline_request_duration_seconds", "Acceptance to answer, succeeded queries", labels=label
        )
        bounds = [str(ms / 1000) for ms in UsageDaily.LATENCY_BUCKETS_MS] + ["+Inf"]
        for labels, entry in self._usage_entries():
            for outcome in ("succeeded", "failed", "rejected"):
                requests.add_metric([*labels, outcome], entry[outcome])
            tokens.add_metric([*labels, "prompt"], entry["prompt_tokens"])
            tokens.add_metric([*labels, "completion"], entry["completion_tokens"])
            cumulative = list(itertools.accumulate(entry["histogram"]))
            duration.add_metric(labels, list(zip(bounds, cumulative, strict=True)), entry["latency_ms_total"] / 1000)
        yield requests
        yield tokens
        yield duration

    def _usage_entries(self) -> list[tuple[list[str], dict]]:
        """([tenant slug], usage) per tenant; or, for a scraper without METRICS_TOKEN, one ([], usage)
        summed over all tenants: an open endpoint must not tell strangers who the tenants are."""
        entries = sorted(selectors.usage_by_tenant(), key=lambda e: e["tenant"].slug)
        if self.per_tenant:
            return [([entry["tenant"].slug], entry) for entry in entries]
        total = {name: sum(e[name] for e in entries) for name in USAGE_FIELDS}
        total["histogram"] = [0] * (len(UsageDaily.LATENCY_BUCKETS_MS) + 1)
        for entry in entries:
            total["histogram"] = [a + b for a, b in zip(total["histogram"], entry["histogram"], strict=True)]
        return [([], total)]

    def _live(self):
        depth = GaugeMetricFamily("sightline_queue_depth", "Accepted queries waiting for a worker", labels=["model"])
        running = GaugeMetricFamily("sightline_queries_running", "Queries a worker is running", labels=["model"])
        counts = {(m, s): 0 for m in served_models() for s in (Query.Status.QUEUED, Query.Status.RUNNING)}
        live = Query.objects.filter(status__in=[Query.Status.QUEUED, Query.Status.RUNNING])
        for row in live.values("model", "status").annotate(n=Count("id")).order_by():
            counts[(row["model"], row["status"])] = row["n"]
        for (model, status), n in sorted(counts.items()):
            (depth if status == Query.Status.QUEUED else running).add_metric([model], n)
        yield depth
        yield running

    def _recent(self):
        window = settings.METRICS_WINDOW_SECONDS
        since = timezone.now() - timedelta(seconds=window)
        rows = Query.objects.filter(created_at__gte=since, status=Query.Status.SUCCEEDED).values_list(
            "model", "created_at", "started_at", "first_token_at", "finished_at"
        )
        spans = {"queue": {}, "first_token": {}, "total": {}}  # per model
        for model, created, started, first_token, finished in rows:
            for name, end in (("queue", started), ("first_token", first_token), ("total", finished)):
                if end is not None:
                    spans[name].setdefault(model, []).append((end - created).total_seconds())
        for name, what in (("queue", "queued"), ("first_token", "to the first token"), ("total", "in all")):
            family = GaugeMetricFamily(
                f"sightline_recent_{name}_seconds",
                f"Time {what}, queries that succeeded in the last {window} s",
                labels=["model", "quantile"],
            )
            for model, values in sorted(spans[name].items()):
                ordered = sorted(values)
                for q in QUANTILES:
                    family.add_metric([model, str(q)], _quantile(ordered, q))
            yield family


def render(accept: str | None, *, per_tenant: bool) -> tuple[bytes, str]:
    """The body and its content type, in the format the scraper's Accept header asks for (the
    classic text format 0.0.4 by default; OpenMetrics when asked), as prometheus_client's own
    exposition negotiates it. ``per_tenant``: usage labelled by tenant, else totals only."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SightlineCollector(per_tenant=per_tenant))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
