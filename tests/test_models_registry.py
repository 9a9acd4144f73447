"""Issue 12, item 5: several models at once (INFERENCE_MODELS, config/models_registry.py).

The settings refuse a bad registry at load. Then a real stack — one web process (Uvicorn) with two
models registered, the tiny model under two names on two queues, and a Celery worker per model
(INFERENCE_MODEL_NAME picks its entry), on PostgreSQL and Redis: each query runs on its own model's
worker; /v1/models lists what the key may use; a tenant limited to one model gets model_not_found
for the other; /health/ready and /metrics are per model; the sweeper sends a lost query to its own
model's queue, and a worker hands a query of another model on instead of running it. The dashboard's
and the admin's query lists filter by model (Django's test client). The tiny model's answers are
noise: the tests check rows, workers, codes and labels."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from accounts import services as accounts
from config import models_registry
from inference import services
from inference.models import Query
from tests import media
from tests.conftest import REPO
from tests.stack import Stack, get_json, post_json

pytestmark = pytest.mark.django_db(transaction=True)


# --- the settings -------------------------------------------------------------------------------
def _settings_error(**env) -> str:
    """The last line of what `import config.settings` says when it refuses ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in models_registry.REPLACED_SETTINGS}
    result = subprocess.run(
        [sys.executable, "-c", "import config.settings"],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0, f"settings accepted {env}"
    return result.stderr.strip().splitlines()[-1]


def _parse(document) -> dict:
    raw = document if isinstance(document, str) else json.dumps(document)
    return models_registry.parse(raw, max_images=8, max_new_tokens=1024)


def test_settings_refuse_a_bad_registry():
    production = {"REDIS_URL": "redis://127.0.0.1:6379/15", "SECRET_KEY": "k" * 10 + uuid.uuid4().hex * 2}
    # at settings load, naming what is wrong
    assert "'a' has unknown field(s) path" in _settings_error(INFERENCE_MODELS='{"a": {"path": "/m"}}')
    assert "INFERENCE_MODELS is not valid: not JSON" in _settings_error(INFERENCE_MODELS="{a: 1}")
    assert "INFERENCE_QUEUE cannot be set beside INFERENCE_MODELS" in _settings_error(
        INFERENCE_MODELS='{"a": {"model": "/m"}}', INFERENCE_QUEUE="infer.a"
    )
    two = '{"a": {"model": "/m"}, "b": {"model": "/m"}}'
    assert "INFERENCE_MODEL_NAME='c' is not a model of INFERENCE_MODELS (a, b)" in _settings_error(
        INFERENCE_MODELS=two, INFERENCE_MODEL_NAME="c", **production
    )
    assert "several models needs REDIS_URL" in _settings_error(INFERENCE_MODELS=two)

    # a good one: the process's model (INFERENCE_MODEL_NAME, else the first) gives the single-model
    # settings its worker reads, and a worker started without -Q consumes its queue
    engine = {"model": "zai-org/GLM-4.6V-Flash", "backend": "openai", "engine_url": "http://127.0.0.1:8001"}
    good = json.dumps({"a": {"model": "/m"}, "b": {**engine, "queue": "gpu.b"}})
    names = ("INFERENCE_MODEL_NAME", "INFERENCE_QUEUE", "INFERENCE_BACKEND", "INFERENCE_ENGINE_URL", "INFERENCE_MODEL")
    code = (
        "import json, config.settings as s; print(json.dumps([getattr(s, n) for n in "
        f"{names!r} + ('CELERY_WORKER_CONCURRENCY', 'CELERY_TASK_DEFAULT_QUEUE')]))"
    )
    base = {k: v for k, v in os.environ.items() if k not in models_registry.REPLACED_SETTINGS}

    def loaded(**env):
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**base, **production, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert loaded(INFERENCE_MODELS=good) == ["a", "infer.a", "transformers", "", "/m", 16, "infer.a"]
    assert loaded(INFERENCE_MODELS=good, INFERENCE_MODEL_NAME="b") == [
        "b",
        "gpu.b",
        "openai",
        "http://127.0.0.1:8001",
        "zai-org/GLM-4.6V-Flash",
        64,
        "gpu.b",
    ]

    # each rule of the parser
    def refused(document) -> str:
        with pytest.raises(Exception) as info:
            _parse(document)
        assert type(info.value).__name__ == "ImproperlyConfigured"
        return str(info.value)

    assert "want a JSON object of one or more models" in refused([{"model": "/m"}])
    assert "want a JSON object of one or more models" in refused({})
    assert "'a' needs 'model'" in refused({"a": {}})
    assert "'a' must be an object" in refused({"a": "/m"})
    assert "'a'.backend must be one of transformers, openai; got 'vllm'" in refused(
        {"a": {"model": "m", "backend": "vllm"}}
    )
    assert "needs 'engine_url'" in refused({"a": {"model": "m", "backend": "openai"}})
    assert "'a'.engine_url must be an http:// or https:// URL" in refused(
        {"a": {"model": "m", "backend": "openai", "engine_url": "localhost:8001"}}
    )
    assert "are for backend openai only" in refused({"a": {"model": "m", "engine_url": "http://127.0.0.1:1"}})
    assert "'b' and 'a' share the queue q" in refused(
        {"a": {"model": "m", "queue": "q"}, "b": {"model": "m", "queue": "q"}}
    )
    assert "'a'.max_images must be a whole number from 0 to 8" in refused({"a": {"model": "m", "max_images": 9}})
    assert "'a'.max_images must be a whole number" in refused({"a": {"model": "m", "max_images": True}})
    assert "'a'.max_new_tokens must be a whole number from 1 to 1024" in refused(
        {"a": {"model": "m", "max_new_tokens": 0}}
    )
    assert "'a'.model must be a string" in refused({"a": {"model": 7}})
    assert "the model name 'a b' must be" in refused({"a b": {"model": "m"}})
    assert "'a'.queue 'q q' must be" in refused({"a": {"model": "m", "queue": "q q"}})

    # a good one: defaults filled in, order kept, the engine's key not in the repr
    registry = _parse(
        {
            "b": {"model": "/m"},
            "a": {
                "model": "zai-org/GLM-4.6V-Flash",
                "backend": "openai",
                "engine_url": "http://127.0.0.1:8001/v1/",
                "engine_api_key": "secret-key",
                "engine_model": "glm",
                "queue": "gpu.a",
                "max_images": 2,
                "max_new_tokens": 64,
            },
        }
    )
    assert list(registry) == ["b", "a"]
    assert registry["b"] == models_registry.ServedModel(name="b", queue="infer.b", backend="transformers", model="/m")
    assert registry["a"].engine_url == "http://127.0.0.1:8001/v1" and registry["a"].engine_model == "glm"
    assert (registry["a"].queue, registry["a"].max_images, registry["a"].max_new_tokens) == ("gpu.a", 2, 64)
    assert "secret-key" not in repr(registry) and "secret-key" not in json.dumps(registry["a"].as_dict())
    # unset: no registry; the one model of the single-model settings stands in
    assert models_registry.parse("  ", max_images=8, max_new_tokens=1024) == {}


# --- two models in a real stack -----------------------------------------------------------------
def _samples(text: str) -> dict:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _wait_finished(query_id, timeout: float = 90) -> Query:
    deadline = time.monotonic() + timeout
    while (query := Query.objects.get(pk=query_id)).status in (Query.Status.QUEUED, Query.Status.RUNNING):
        assert time.monotonic() < deadline, f"query {query_id} is still {query.status}"
        time.sleep(0.2)
    return query


def _chat(stack, key, model=None, max_tokens=3, images=0):
    content = [{"type": "text", "text": "What is this?"}]
    png = base64.b64encode(media.png(16, 16)).decode()
    content += [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}] * images
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    if model is not None:
        body["model"] = model
    return post_json(stack.url + "/v1/chat/completions", body, key)


def test_two_models_each_run_on_their_own_workers(tmp_path, tiny_model_dir):
    tag = uuid.uuid4().hex[:6]
    a, b = f"tiny-a-{tag}", f"tiny-b-{tag}"
    qa, qb = f"infer.a-{tag}", f"infer.b-{tag}"
    registry = {
        a: {"model": str(tiny_model_dir), "queue": qa},
        b: {"model": str(tiny_model_dir), "queue": qb, "max_images": 1},
    }
    stack = Stack(
        tmp_path,
        INFERENCE_MODELS=json.dumps(registry),
        # the registry says each model's path and queue: the single-model settings stay unset
        INFERENCE_MODEL="",
        INFERENCE_QUEUE="",
        # the sweeper dispatches a lost row of these two models after 2 s (no other stack has them)
        UNDISPATCHED_QUEUED_SECONDS="2",
    )
    stack.start_web()
    stack.start_worker("wa", queue=qa, INFERENCE_MODEL_NAME=a)
    stack.start_worker("wb", queue=qb, INFERENCE_MODEL_NAME=b)
    try:
        ready = stack.wait_ready(queues={qa: 1, qb: 1})
        assert ready["queues"][qa]["model"] == a and ready["queues"][qb]["model"] == b
        assert stack.get_json(f"/health/ready?model={a}")[0] == 200
        assert stack.get_json("/health/ready?model=nope")[0] == 404
        assert stack.get_json("/health")[1]["models"] == [a, b]

        everyone = accounts.create_tenant(f"Both {tag}", slug=f"both-{tag}")
        only_a = accounts.create_tenant(f"Only A {tag}", slug=f"only-a-{tag}", allowed_models=[a])
        only_b = accounts.create_tenant(f"Only B {tag}", slug=f"only-b-{tag}", allowed_models=[b])
        key = accounts.create_api_key(everyone, "both")[1]
        key_a = accounts.create_api_key(only_a, "a")[1]
        key_b = accounts.create_api_key(only_b, "b")[1]

        # /v1/models: what each key may use, in the registry's order
        assert [m["id"] for m in get_json(stack.url + "/v1/models", key)[1]["data"]] == [a, b]
        assert [m["id"] for m in get_json(stack.url + "/v1/models", key_a)[1]["data"]] == [a]
        assert get_json(stack.url + f"/v1/models/{b}", key)[1]["id"] == b

        # each query on its own model's worker, whichever endpoint asks
        ran = {}
        for model in (a, b):
            status, body = _chat(stack, key, model)
            assert status == 200 and body["model"] == model, body
            ran[model] = Query.objects.get(pk=body["id"].removeprefix("chatcmpl-"))
            status, body = post_json(
                stack.url + "/v1/glm/infer", {"prompt": "Hi", "max_tokens": 2, "model": model}, key
            )
            assert status == 200, body
            assert Query.objects.get(pk=body["query_id"]).worker == Query.objects.get(pk=ran[model].pk).worker
        assert Query.objects.get(pk=ran[a].pk).worker.startswith(f"wa-{stack.tag}@")
        assert Query.objects.get(pk=ran[b].pk).worker.startswith(f"wb-{stack.tag}@")
        # the model's own limits: b takes one image, a the global eight
        status, body = _chat(stack, key, b, images=2)
        assert status == 400 and "the limit is 1 for the model" in body["error"]["message"], body
        assert _chat(stack, key, a, images=2)[0] == 200

        # a tenant limited to a: b does not exist for it (OpenAI's 404 shape), on every path
        status, body = _chat(stack, key_a, b)
        assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
        assert get_json(stack.url + f"/v1/models/{b}", key_a)[1]["error"]["code"] == "model_not_found"
        status, body = post_json(stack.url + "/v1/glm/infer", {"prompt": "Hi", "max_tokens": 2, "model": b}, key_a)
        assert (status, body["code"]) == (404, "model_not_found")
        assert _chat(stack, key_a, "no-such-model")[1]["error"]["code"] == "model_not_found"
        assert not Query.objects.filter(tenant=only_a).exclude(model=a).exists()
        # without a model: the web process's (the first entry) if allowed, else the tenant's own
        status, body = post_json(stack.url + "/v1/glm/infer", {"prompt": "Hi", "max_tokens": 2}, key)
        assert Query.objects.get(pk=body["query_id"]).model == a
        status, body = post_json(stack.url + "/v1/glm/infer", {"prompt": "Hi", "max_tokens": 2}, key_b)
        assert status == 200, body
        assert Query.objects.get(pk=body["query_id"]).worker.startswith(f"wb-{stack.tag}@")

        # /metrics: a worker per model, queue depth and latencies per model
        with urllib.request.urlopen(stack.url + "/metrics", timeout=30) as response:
            samples = _samples(response.read().decode())
        assert samples[("sightline_workers", frozenset({("model", a), ("queue", qa)}))] == 1
        assert samples[("sightline_workers", frozenset({("model", b), ("queue", qb)}))] == 1
        for model in (a, b):
            assert samples[("sightline_queue_depth", frozenset({("model", model)}))] == 0
            assert ("sightline_recent_total_seconds", frozenset({("model", model), ("quantile", "0.5")})) in samples

        # a row whose message was lost (its web process died before sending it): the sweeper sends it
        # to its own model's queue. This process writes it and sends nothing.
        key_row = only_b.api_keys.get()
        lost = services.accept(key_row, services.check_input(prompt="lost", max_tokens=2), endpoint="queries", model=b)
        assert _wait_finished(lost.pk).worker.startswith(f"wb-{stack.tag}@")

        # a message of a's query sent to b's queue: b's worker does not run it, it sends it on to a's
        from celery import Celery

        strayed = services.accept(
            only_a.api_keys.get(), services.check_input(prompt="strayed", max_tokens=2), endpoint="queries", model=a
        )
        with Celery(broker=stack.redis_url) as sender:
            sender.send_task("inference.run_query", args=[str(strayed.pk)], queue=qb)
        query = _wait_finished(strayed.pk)
        assert query.status == Query.Status.SUCCEEDED and query.worker.startswith(f"wa-{stack.tag}@")
        assert f"query {strayed.pk} is for the model '{a}', not this worker's: sent on to {qa}" in stack.log("wb")

        # b's worker stops: b is unavailable (and not ready), a goes on
        stack.kill("wb", sig=signal.SIGTERM)
        deadline = time.monotonic() + 30
        while stack.get_json(f"/health/ready?model={b}")[0] != 503:
            assert time.monotonic() < deadline, "b still ready without its worker"
            time.sleep(0.3)
        status, body = stack.get_json("/health/ready")
        assert status == 503 and body["queues"][qb]["workers"] == 0 and body["queues"][qa]["workers"] == 1
        assert stack.get_json(f"/health/ready?model={a}")[0] == 200
        status, body = _chat(stack, key, b)
        assert status == 503 and body["error"]["code"] == "model_unavailable" and qb in body["error"]["message"]
        assert _chat(stack, key, a)[0] == 200
    finally:
        stack.stop()


def test_a_worker_on_the_wrong_queue_refuses_to_start(tmp_path, tiny_model_dir):
    """Its -Q must be its model's queue (and no other model's), or it would run queries on the wrong
    model, or get none."""
    registry = {"one": {"model": str(tiny_model_dir)}, "two": {"model": str(tiny_model_dir)}}
    stack = Stack(tmp_path, INFERENCE_MODELS=json.dumps(registry), INFERENCE_MODEL="", INFERENCE_QUEUE="")
    try:
        for name, queue, said in (
            ("wrong", "infer.two", "whose queue is infer.one, but consumes infer.two: start it with -Q infer.one"),
            ("both", "infer.one,infer.two", "but also consumes infer.two (two): start one worker per model"),
        ):
            worker = stack.start_worker(name, queue=queue, INFERENCE_MODEL_NAME="one")
            assert worker.wait(timeout=60) == 3
            assert said in stack.log(name)
    finally:
        stack.stop()


# --- the consoles -----------------------------------------------------------------------------------
def test_dashboard_and_admin_query_lists_filter_by_model(settings):
    from django.test import Client

    from accounts.models import Membership

    settings.INFERENCE_MODELS = _parse({"alpha": {"model": "/m"}, "beta": {"model": "/m"}})
    settings.INFERENCE_MODEL_NAME = "alpha"
    tenant = accounts.create_tenant("Filtered", slug="filtered")
    owner = accounts.create_user("filter-owner", password="pw-12345678")
    accounts.add_member(tenant, owner, Membership.Role.OWNER)
    key = accounts.create_api_key(tenant, "k")[0]
    rows = {
        model: services.accept(key, services.check_input(prompt=f"about {model}"), endpoint="queries", model=model)
        for model in ("alpha", "beta")
    }

    dashboard = Client()
    dashboard.force_login(owner)
    page = dashboard.get("/dashboard/queries/?model=beta").content.decode()
    assert str(rows["beta"].pk) in page and str(rows["alpha"].pk) not in page
    assert "<option selected>beta</option>" in page and "<option>alpha</option>" in page
    page = dashboard.get("/dashboard/queries/").content.decode()
    assert str(rows["beta"].pk) in page and str(rows["alpha"].pk) in page
    tenant.allowed_models = ["alpha"]
    tenant.save()
    assert "<option>beta</option>" not in dashboard.get("/dashboard/queries/").content.decode()

    staff = accounts.create_user("filter-staff", password="pw-12345678")
    staff.is_staff = staff.is_superuser = True
    staff.save()
    admin = Client()
    admin.force_login(staff)
    page = admin.get("/admin/inference/query/?model=alpha").content.decode()
    assert str(rows["alpha"].pk) in page and str(rows["beta"].pk) not in page
    assert "?model=beta" in page  # the filter offers every registered model


def test_the_query_api_filters_by_model_status_and_endpoint(settings):
    """GET /v1/queries?model=…&status=…&endpoint=…: the tenant's matching queries only; a bad value
    is 400 naming the parameter, never ignored."""
    from django.test import Client

    settings.INFERENCE_MODELS = _parse({"alpha": {"model": "/m"}, "beta": {"model": "/m"}})
    settings.INFERENCE_MODEL_NAME = "alpha"
    tenant = accounts.create_tenant("Api filtered", slug="api-filtered")
    key, secret = accounts.create_api_key(tenant, "k")
    other_key, other_secret = accounts.create_api_key(accounts.create_tenant("Other", slug="other-t"), "o")
    rows = {
        model: services.accept(key, services.check_input(prompt=f"about {model}"), endpoint="queries", model=model)
        for model in ("alpha", "beta")
    }
    services.accept(other_key, services.check_input(prompt="not yours"), endpoint="queries", model="beta")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")

    def ids(query: str) -> list[str]:
        response = client.get(f"/v1/queries?{query}")
        assert response.status_code == 200, response.content
        return [item["id"] for item in response.json()["results"]]

    assert ids("model=beta") == [str(rows["beta"].pk)]
    assert set(ids("")) == {str(rows["alpha"].pk), str(rows["beta"].pk)}
    assert set(ids("status=queued&endpoint=queries")) == {str(rows["alpha"].pk), str(rows["beta"].pk)}
    assert ids("status=succeeded") == []
    assert ids("model=gamma") == []
    for bad, named in (("status=done", "'status'"), ("endpoint=chat", "'endpoint'"), ("model=", "'model'")):
        response = client.get(f"/v1/queries?{bad}")
        assert response.status_code == 400 and response.json()["code"] == "invalid_request"
        assert named in response.json()["msg"], response.json()
    assert other_secret  # the other tenant's query never shows (above: exact lists)
