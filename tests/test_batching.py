"""Issue 11: queries decoded together. On the tiny random model (its answers are noise): a batch
gives each query exactly the greedy answer and token counts it gets alone, whatever its image,
prompt length, max_tokens, stop, n or grammar; a query cancelled mid-batch ends on its own; an
out-of-memory in a batch is retried in halves so that only the query that fails alone fails; and
through the production stack concurrent requests are decoded in batches. No test asserts a time."""

import json
import threading
import time

import pytest
from PIL import Image

from inference.engine import OOM_TEST_MARKER_ENV, Engine, EngineError, EngineRequest, SamplingParams
from tests import forcing


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(str(tiny_model_dir))


def _request(i: int, **sampling) -> EngineRequest:
    """Query i: its own image size and colour (or none), prompt length and max_tokens."""
    sampling = {"max_new_tokens": 10 + 3 * i, "temperature": 0, **sampling}
    if i % 3 == 2:  # text only
        messages = [{"role": "user", "content": "A question without a picture, " + "and more words " * i}]
        return EngineRequest(messages=messages, sampling=SamplingParams(**sampling))
    picture = Image.new("RGB", (40 + 37 * i, 90 - 5 * i), (25 * i % 256, 120, 200))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it. " * (i + 1)}]}]
    return EngineRequest(messages=messages, images=[picture], sampling=SamplingParams(**sampling))


def _summary(result) -> list:
    return [(c.text, c.reasoning, c.finish_reason, c.completion_tokens) for c in result.choices] + [
        result.prompt_tokens
    ]


def test_a_batch_gives_each_query_its_answer_alone(engine):
    requests = [_request(i) for i in range(6)]
    requests.append(_request(6, stop=("e",)))  # its own stop string
    requests.append(
        EngineRequest(  # a forced output cut by its stop string
            messages=[{"role": "user", "content": f"{forcing.STOP} go"}],
            sampling=SamplingParams(max_new_tokens=40, stop=("STOP",)),
        )
    )
    requests.append(_request(1, n=2, temperature=1.0, seed=9))  # two sampled choices, seeded
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    requests.append(
        EngineRequest(
            messages=[{"role": "user", "content": "JSON please"}],
            sampling=SamplingParams(max_new_tokens=30, temperature=0),
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    )
    alone = [engine.generate(request) for request in requests]
    batched = engine.generate_batch(requests)
    assert [_summary(r) for r in batched] == [_summary(r) for r in alone]
    assert batched[7].choices[0].text == "alpha beta" and batched[7].choices[0].finish_reason == "stop"
    assert [c.completion_tokens for c in batched[0].choices] == [10]  # its own max_tokens, not the batch's
    assert json.loads(batched[-1].choices[0].text) in ({"ok": True}, {"ok": False})


def test_the_scheduler_batches_queries_that_arrive_together(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir))
    engine.enable_batching(max_batch=8, wait_ms=300, max_tokens=100_000)
    requests = [_request(i) for i in range(5)]
    generations = [engine.stream(request) for request in requests]
    results = []
    for generation in generations:
        for _ in generation:
            pass
        results.append(generation.result)
    assert engine.scheduler.max_batch_rows == 5  # one batch: they arrived within the window
    assert [_summary(r) for r in results] == [_summary(engine.generate_batch([r])[0]) for r in requests]


def test_a_query_its_worker_holds_alone_does_not_wait_out_the_window(tiny_model_dir):
    """The worker holds one query (``pending``) and it has arrived: the batch starts without waiting
    for company, though the window is an hour (waiting it out would fail the bound below)."""
    engine = Engine.load(str(tiny_model_dir))
    engine.enable_batching(max_batch=8, wait_ms=3_600_000, max_tokens=100_000, pending=lambda: 1)
    finished = threading.Event()
    generation = engine.stream(_request(0))

    def read():
        for _ in generation:
            pass
        finished.set()

    threading.Thread(target=read, daemon=True).start()
    assert finished.wait(timeout=120), "the lone query waited for company that was not coming"
    assert generation.result.choices[0].completion_tokens == 10


def test_the_scheduler_waits_for_a_query_its_worker_holds(tiny_model_dir):
    """The worker holds two queries and one has arrived: the scheduler waits for the other (within
    the window) and decodes both in one batch."""
    engine = Engine.load(str(tiny_model_dir))
    engine.enable_batching(max_batch=8, wait_ms=3_600_000, max_tokens=100_000, pending=lambda: 2)
    first = engine.stream(_request(0))
    time.sleep(0.3)  # the second is still being prepared by its worker thread
    second = engine.stream(_request(1))
    finished = threading.Event()

    def read():
        for generation in (first, second):
            for _ in generation:
                pass
        finished.set()

    threading.Thread(target=read, daemon=True).start()
    assert finished.wait(timeout=120), "the scheduler kept waiting once both had arrived"
    assert engine.scheduler.max_batch_rows == 2


def test_the_token_budget_splits_batches(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir))
    requests = [_request(0), _request(1), _request(3)]
    budget = max((engine.prepare(r).prompt_tokens + r.sampling.max_new_tokens) for r in requests) + 1
    engine.enable_batching(max_batch=8, wait_ms=300, max_tokens=budget)  # one query's worth per batch
    generations = [engine.stream(request) for request in requests]
    for generation in generations:
        for _ in generation:
            pass
    assert engine.scheduler.max_batch_rows == 1
    assert all(g.result.completion_tokens == g.request.sampling.max_new_tokens for g in generations)


def test_cancelling_one_query_of_a_batch_leaves_the_others_untouched(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir))
    engine.enable_batching(max_batch=8, wait_ms=300, max_tokens=100_000)
    cancel = threading.Event()
    long = [_request(i, max_new_tokens=400) for i in range(3)]
    generations = [engine.stream(r, should_stop=cancel.is_set if i == 1 else None) for i, r in enumerate(long)]
    pieces = {i: [] for i in range(3)}

    def read(i):
        for delta in generations[i]:
            pieces[i].append(delta.text)
            if i == 1 and len(pieces[1]) == 3:
                cancel.set()

    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    cancelled = generations[1].result.choices[0]
    assert cancelled.finish_reason == "cancelled"
    assert 3 <= cancelled.completion_tokens < 400 and cancelled.text == "".join(pieces[1])
    for i in (0, 2):
        choice = generations[i].result.choices[0]
        assert (choice.finish_reason, choice.completion_tokens) == ("length", 400)
        assert choice.text == engine.generate(long[i]).choices[0].text


def test_an_out_of_memory_batch_is_retried_in_halves(engine, monkeypatch):
    """The test-only OOM hook fails every batch holding the marked query: the batch is split until
    that query is alone, and only it fails gpu_oom."""
    monkeypatch.setenv(OOM_TEST_MARKER_ENV, "[oom-me]")
    requests = [_request(i) for i in range(4)]
    requests.insert(2, EngineRequest(messages=[{"role": "user", "content": "[oom-me] hi"}]))
    expected = [_summary(engine.generate(r)) for i, r in enumerate(requests) if i != 2]
    from inference.engine.batching import Generation, run_batch

    generations = [Generation(engine, request) for request in requests]
    run_batch(engine, generations)
    outcomes = []
    for generation in generations:
        try:
            for _ in generation:
                pass
            outcomes.append(_summary(generation.result))
        except EngineError as error:
            outcomes.append(error.code)
    assert outcomes.pop(2) == "gpu_oom"
    assert outcomes == expected


# --- through the production stack -------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_are_batched_by_the_worker(live_stack, api_key):
    """Concurrent chat requests against the live stack all succeed with their greedy answers, and
    the worker reports (heartbeat -> /metrics) that it decoded batches of more than one."""
    import httpx
    import openai

    tenant = api_key[0].tenant
    tenant.max_concurrent_requests = 8  # the default (4) would refuse half of them
    tenant.save(update_fields=["max_concurrent_requests"])
    client = openai.OpenAI(base_url=live_stack.url + "/v1", api_key=api_key[1], max_retries=0, timeout=120)

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": f"Question number {i}: " + "tell me more. " * i}]
        answer = client.chat.completions.create(model="glm-4.6v-flash", messages=messages, max_tokens=48, temperature=0)
        return answer.choices[0].message.content

    answers: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, ask(i))) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(answers) == 8
    assert [ask(i) for i in (0, 5)] == [answers[0], answers[5]]  # alone, the same greedy answers
    deadline = time.monotonic() + 30
    largest = 0
    while time.monotonic() < deadline and largest < 2:
        metrics = httpx.get(live_stack.url + "/metrics", timeout=10).text
        for line in metrics.splitlines():
            if line.startswith("sightline_worker_max_batch_rows{"):
                largest = max(largest, float(line.rsplit(" ", 1)[1]))
        time.sleep(0.5)
    assert largest >= 2
