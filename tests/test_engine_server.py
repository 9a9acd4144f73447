"""Issue 12: workers that drive an OpenAI-compatible engine server (``INFERENCE_BACKEND=openai``).

The engine server is real: ``transformers serve`` (transformers' ``serving`` extra) serving the tiny
model from its folder on the CPU, started and stopped by these tests (one per module, killed and
started again by the engine-failure test). The stack is the production one: Uvicorn and Celery
worker processes on PostgreSQL and Redis, the worker holding no model of its own. The tiny model's
answers are noise; greedy answers are compared with what the in-process engine gives for the same
stored query, and the rest checks frames, rows, counts and codes. No test asserts a time.

What ``transformers serve`` cannot show (it has no GLM reasoning or tool-call parser, and drops
special tokens, so the tiny model's output is plain text through it): the reading of reasoning and
tool-call deltas is checked on the chunk shapes vLLM sends (``StreamReader``), and through the same
GLM parser the in-process engine uses.
"""

import asyncio
import base64
import json
import signal
import subprocess
import sys
import time

import openai
import pytest
import websockets

from accounts import services as accounts
from inference.engine import EngineError, EngineRequest, SamplingParams
from inference.engine.output import parse_output
from inference.engine.remote import RemoteEngine, StreamReader, error_for_status, error_in_stream, request_body
from inference.models import Query
from tests import forcing, media
from tests.conftest import REPO, free_port
from tests.stack import EngineServer, get_json, post_json, running_stack, wait_finished

MODEL = "glm-4.6v-flash"  # the public name (INFERENCE_MODEL_NAME)
# Tests through the stack: their rows are committed, for the stack's processes to see.
live = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def engine_server(tiny_model_dir, tmp_path_factory):
    server = EngineServer(tiny_model_dir, tmp_path_factory.mktemp("engine")).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(django_db_setup, engine_server, tmp_path_factory):
    """Web + one worker with the openai backend, pointed at the engine server."""
    with running_stack(
        tmp_path_factory.mktemp("stack-openai"),
        INFERENCE_BACKEND="openai",
        INFERENCE_ENGINE_URL=engine_server.url + "/v1",
        ENGINE_MAX_INFLIGHT="8",
        ENGINE_PROBE_SECONDS="0.3",
        ENGINE_WAIT_SECONDS="90",
        ENGINE_START_TIMEOUT="90",
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def local_engine(tiny_model_dir):
    """The in-process engine on the same model: what the openai backend's answers are compared with."""
    from inference.engine import Engine

    return Engine.load(str(tiny_model_dir))


@pytest.fixture
def key(tenant):
    return accounts.create_api_key(tenant, "engine-server", max_concurrent_requests=20)[1]


def _image_b64(seed=0, width=64, height=48) -> str:
    return base64.b64encode(media.encode(media.image(width, height, seed=seed), "PNG")).decode()


def _data_uri(seed=0) -> str:
    return "data:image/png;base64," + _image_b64(seed)


def _in_process(local_engine, query: Query):
    """What the in-process engine answers for this stored query (its conversation and parameters)."""
    from inference import runner

    return local_engine.generate(runner.engine_request(query))


def _worker_engine(stack) -> dict:
    status, body = stack.get_json("/health/ready")
    engines = body.get("queues", {}).get(stack.queue, {}).get("engines") or [{}]
    return {"http_status": status, **engines[0]}


def _wait_engine_ready(stack, ready: bool, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        engine = _worker_engine(stack)
        if engine.get("ready") is ready and (engine["http_status"] == 200) is ready:
            return engine
        time.sleep(0.1)
    raise AssertionError(f"the worker never reported its engine ready={ready}: {_worker_engine(stack)}")


# --- the engine server client on its own -----------------------------------------------------------
def _conversations():
    from PIL import Image

    red, blue = Image.new("RGB", (64, 48), (220, 20, 20)), Image.new("RGB", (40, 70), (20, 20, 220))
    greedy = {"max_new_tokens": 16, "temperature": 0}
    tool_history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        # As parts: transformers serve turns a text content into parts before templating, and GLM's
        # template ends a text tool result with one more newline than a parts one.
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny, 21 C"}]},
    ]
    return [
        EngineRequest(
            messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
            images=[red],
            sampling=SamplingParams(**greedy),
        ),
        EngineRequest(  # two images, a system turn, thinking on
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
            ],
            images=[red, blue],
            sampling=SamplingParams(**greedy),
            enable_thinking=True,
        ),
        EngineRequest(
            messages=[{"role": "user", "content": "A question without a picture."}], sampling=SamplingParams(**greedy)
        ),
        EngineRequest(messages=tool_history, sampling=SamplingParams(**greedy), tools=[forcing.WEATHER_TOOL]),
    ]


def test_the_engine_server_answers_as_the_in_process_engine(engine_server, local_engine):
    """Greedy: the same conversation (images, system turn, reasoning switch, tool history) gives the
    same answer and the same token counts through the engine server as in process: the conversation,
    images and template switches reach the server as the in-process engine reads them."""
    remote = RemoteEngine(engine_server.url, str(engine_server.model_dir)).start_monitor()
    try:
        assert remote.loaded and remote.status()["served_models"] == [engine_server.model_dir]
        for request in _conversations():
            there, here = remote.generate(request), local_engine.generate(request)
            assert there.choices[0].text == here.choices[0].text
            assert (there.prompt_tokens, there.completion_tokens) == (here.prompt_tokens, here.completion_tokens)
            assert there.choices[0].finish_reason == here.choices[0].finish_reason == "length"
    finally:
        remote.close()


def test_an_engine_serving_another_model_or_none_is_not_ready(engine_server):
    wrong = RemoteEngine(engine_server.url, "zai-org/GLM-4.6V-Flash").start_monitor()
    nowhere = RemoteEngine(f"http://127.0.0.1:{free_port()}", engine_server.model_dir).start_monitor()
    try:
        assert not wrong.loaded and wrong.status()["healthy"]
        assert f"serves {engine_server.model_dir}, not 'zai-org/GLM-4.6V-Flash'" in wrong.status()["error"]
        request = EngineRequest(messages=[{"role": "user", "content": "hi"}], sampling=SamplingParams(max_new_tokens=4))
        with pytest.raises(EngineError) as refused:
            wrong.generate(request)
        assert refused.value.code == "model_unavailable" and "zai-org/GLM-4.6V-Flash" in refused.value.message
        assert not nowhere.loaded and "cannot reach" in nowhere.status()["error"]
        with pytest.raises(EngineError) as unreachable:  # connection refused
            nowhere.generate(request)
        assert unreachable.value.code == "model_unavailable" and nowhere.url in unreachable.value.message
        assert not nowhere.wait_ready(0.3)
    finally:
        wrong.close()
        nowhere.close()


# --- every endpoint through the openai backend -----------------------------------------------------
@live
def test_rest_infer_answers_from_the_engine_server(stack, key, local_engine):
    status, body = post_json(
        stack.url + "/v1/glm/infer",
        {"image": _image_b64(1), "prompt": "What is in the picture?", "max_tokens": 12, "temperature": 0},
        key,
    )
    assert status == 200, body
    query = Query.objects.get(pk=body["query_id"])
    assert query.status == Query.Status.SUCCEEDED and query.answer == body["result"]
    assert query.worker.startswith("w1-")
    alone = _in_process(local_engine, query)
    assert body["result"] == alone.choices[0].text
    assert body["usage"]["prompt_tokens"] == query.prompt_tokens == alone.prompt_tokens
    assert body["usage"]["completion_tokens"] == query.completion_tokens == 12
    assert _worker_engine(stack)["backend"] == "openai"  # the worker holds no model of its own
    status, usage = get_json(stack.url + "/v1/usage", key)
    assert status == 200 and usage["key"]["quotas"]["tokens_per_month"]["used"] == query.total_tokens


@live
def test_chat_completions_plain_and_streamed(stack, key, local_engine):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=120)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image_url", "image_url": {"url": _data_uri(2)}},
                {"type": "image_url", "image_url": {"url": _data_uri(3)}},
            ],
        }
    ]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    query = Query.objects.get(pk=plain.id.removeprefix("chatcmpl-"))
    alone = _in_process(local_engine, query)
    assert plain.choices[0].message.content == alone.choices[0].text
    assert plain.usage.prompt_tokens == alone.prompt_tokens and plain.usage.completion_tokens == 10

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == alone.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


async def _ws_query(ws_url, key, *, max_tokens, cancel_after=None, on_token=None, seed=0):
    frames = []
    async with websockets.connect(ws_url + "/ws/v1/infer", additional_headers={"X-API-Key": key}) as ws:
        frames.append(json.loads(await ws.recv()))  # ready
        request = {"type": "infer", "prompt": "Describe it.", "image": _image_b64(seed), "max_tokens": max_tokens}
        await ws.send(json.dumps(request))
        tokens = 0
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 90))
            frames.append(frame)
            if frame["type"] == "token":
                tokens += 1
                if tokens == cancel_after:
                    await ws.send(json.dumps({"type": "cancel"}))
                if tokens == 1 and on_token is not None:
                    on_token()
            if frame["type"] in ("done", "error"):
                return frames


@live
def test_websocket_streams_the_engine_servers_tokens(stack, key):
    frames = asyncio.run(_ws_query(stack.ws_url, key, max_tokens=20))
    done = frames[-1]
    assert done["type"] == "done", done
    streamed = "".join(f["text"] for f in frames if f["type"] == "token")
    assert streamed == done["result"] and done["usage"]["completion_tokens"] == 20
    query = Query.objects.get(pk=done["query_id"])
    assert query.answer == streamed and query.prompt_tokens == done["usage"]["prompt_tokens"] > 0


@live
def test_cancel_closes_the_upstream_stream_and_keeps_the_partial_answer(stack, key):
    frames = asyncio.run(_ws_query(stack.ws_url, key, max_tokens=1000, cancel_after=1))
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "cancelled", frames[-1]
    query = wait_finished(frames[1]["query_id"])
    assert (query.status, query.error_code, query.finish_reason) == (Query.Status.FAILED, "cancelled", "cancelled")
    assert query.answer == "".join(f["text"] for f in frames if f["type"] == "token")
    assert 1 <= query.completion_tokens < 1000
    # The engine server is free again: the next query runs to its end.
    assert asyncio.run(_ws_query(stack.ws_url, key, max_tokens=5))[-1]["type"] == "done"


@live
def test_async_jobs_are_in_flight_together_at_the_engine_server(stack, key):
    """ENGINE_MAX_INFLIGHT (8 here): the worker sends queries to the server side by side (the server
    queues and batches them), then each ends with its own counts."""
    ids = []
    for i in range(5):
        status, body = post_json(
            stack.url + "/v1/queries", {"image": _image_b64(i), "prompt": f"q{i}", "max_tokens": 60}, key
        )
        assert status == 202, body
        ids.append(body["id"])
    most = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and most < 3:
        most = max(most, _worker_engine(stack).get("inflight", 0))
        time.sleep(0.05)
    assert most >= 3, most
    for query_id in ids:
        status, polled = get_json(f"{stack.url}/v1/queries/{query_id}", key)
        query = wait_finished(query_id)
        assert query.status == Query.Status.SUCCEEDED and query.completion_tokens == 60
    status, polled = get_json(f"{stack.url}/v1/queries/{ids[-1]}", key)
    assert polled["status"] == "succeeded" and polled["usage"]["completion_tokens"] == 60


@live
def test_the_engine_servers_refusal_is_invalid_request_with_its_message(stack, key):
    """The server takes prompts of at most --max-model-len (1024) tokens; ours are bounded higher."""
    long = "qzx " * 600  # 2400 tokens of the tiny model's tokenizer
    status, body = post_json(stack.url + "/v1/glm/infer", {"image": _image_b64(), "prompt": long}, key)
    assert status == 400, body
    assert body["code"] == "invalid_request" and "at most 1024" in body["msg"], body
    query = Query.objects.get(pk=body["query_id"])
    assert (query.status, query.error_code) == (Query.Status.FAILED, "invalid_request")


@live
def test_engine_killed_mid_stream_then_restarted(stack, key, engine_server):
    """SIGKILL the engine server mid-answer: the query ends failed/engine_error with the part
    streamed kept; the worker stays up and reports not-ready (so /health/ready is 503 and sync
    requests are refused with model_unavailable); async jobs wait queued; a worker started meanwhile
    waits for its engine. Start the engine again: the same worker process takes work again."""
    worker_pid = stack.processes["w1"].pid
    frames = asyncio.run(_ws_query(stack.ws_url, key, max_tokens=1000, on_token=engine_server.kill))
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == "engine_error", error
    query = wait_finished(frames[1]["query_id"])
    assert (query.status, query.error_code) == (Query.Status.FAILED, "engine_error")
    assert query.answer and query.answer == "".join(f["text"] for f in frames if f["type"] == "token")

    down = _wait_engine_ready(stack, ready=False)
    assert down["http_status"] == 503 and "cannot reach" in down["error"], down
    status, body = post_json(stack.url + "/v1/glm/infer", {"image": _image_b64(), "prompt": "x"}, key)
    assert status == 503 and body["code"] == "model_unavailable", body
    status, job = post_json(stack.url + "/v1/queries", {"image": _image_b64(), "prompt": "later", "max_tokens": 6}, key)
    assert status == 202, job
    stack.start_worker("w2")  # starts while its engine is away: waits for it before taking work
    deadline = time.monotonic() + 60
    while "waiting for the engine server" not in stack.log("w2") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "waiting for the engine server" in stack.log("w2")
    assert Query.objects.get(pk=job["id"]).status == Query.Status.QUEUED
    # Alive while its engine is away (the pod's liveness probe): restarting it would not help.
    alive = subprocess.run(
        [sys.executable, "manage.py", "worker_alive"], cwd=REPO, env=stack.env, capture_output=True, text=True
    )
    assert alive.returncode == 0, alive.stderr

    restarted_at = time.time()
    engine_server.start().wait_ready()
    _wait_engine_ready(stack, ready=True)
    later = wait_finished(job["id"])
    assert later.status == Query.Status.SUCCEEDED and later.completion_tokens == 6
    assert later.started_at.timestamp() > restarted_at  # it waited, queued, for the engine
    status, body = post_json(
        stack.url + "/v1/glm/infer", {"image": _image_b64(), "prompt": "again", "max_tokens": 4}, key
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 4, body
    assert stack.processes["w1"].pid == worker_pid and stack.processes["w1"].poll() is None
    stack.wait_ready(workers=2)
    stack.kill("w2", signal.SIGTERM)
    # The job waited held by a live worker: never handed out again meanwhile.
    assert "not running it again" not in stack.log("w1") + stack.log("w2")


@live
def test_a_worker_killed_mid_stream_loses_nothing(stack, key):
    """SIGKILL the worker while its engine server streams a query to it: the query ends
    failed/worker_lost (the next worker's sweeper, once the heartbeat has expired), and the next
    worker, started beside the same engine server, takes work at once (no model to load)."""
    status, job = post_json(
        stack.url + "/v1/queries", {"image": _image_b64(), "prompt": "long", "max_tokens": 1000}, key
    )
    assert status == 202, job
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        query = Query.objects.get(pk=job["id"])
        if query.status == Query.Status.RUNNING and _worker_engine(stack).get("inflight"):
            break
        time.sleep(0.05)
    assert query.status == Query.Status.RUNNING and query.worker.startswith("w1-")
    stack.kill("w1")
    stack.start_worker("w3")
    lost = wait_finished(job["id"])
    assert (lost.status, lost.error_code) == (Query.Status.FAILED, "worker_lost")
    assert lost.worker in lost.error_message
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        engine = _worker_engine(stack)
        if engine["http_status"] == 200 and engine.get("worker", "").startswith("w3-"):
            break
        time.sleep(0.1)
    status, body = post_json(
        stack.url + "/v1/glm/infer", {"image": _image_b64(), "prompt": "next", "max_tokens": 4}, key
    )
    assert status == 200, body
    assert Query.objects.get(pk=body["query_id"]).worker.startswith("w3-")


# --- reading what vLLM sends ----------------------------------------------------------------------
def _chunk(index=0, usage=None, finish=None, logprobs=None, **delta) -> dict:
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"choices": [choice], **({"usage": usage} if usage else {})}


def _read(request: EngineRequest, chunks: list[dict]):
    reader = StreamReader(request)
    deltas = [d for chunk in chunks for d in reader.feed(chunk)] + reader.end("length")
    return deltas, reader.result()


def test_vllm_reasoning_and_tool_call_deltas_read_as_the_in_process_engine_reads_glm():
    """vLLM with --reasoning-parser glm45 --tool-call-parser glm45 streams ``reasoning_content`` (or
    ``reasoning``) and tool calls whose arguments come in pieces; a server without them streams GLM's
    raw text. Both read into what our GLM parser makes of the model's tokens."""
    request = EngineRequest(messages=[], tools=[forcing.WEATHER_TOOL], enable_thinking=True)
    structured = [
        _chunk(reasoning_content="\nThe user wants "),
        _chunk(reasoning="the weather. "),
        _chunk(content="\n\nI will look it up."),
        _chunk(
            tool_calls=[{"index": 0, "id": "chatcmpl-tool-1", "function": {"name": "get_weather", "arguments": ""}}]
        ),
        _chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"city": "Pa'}}]),
        _chunk(tool_calls=[{"index": 0, "function": {"arguments": 'ris", "days": 3}'}}]),
        _chunk(tool_calls=[{"index": 1, "id": "chatcmpl-tool-2", "function": {"name": "get_weather"}}]),
        _chunk(tool_calls=[{"index": 1, "function": {"arguments": '{"city": "Rome"}'}}]),
        _chunk(finish="tool_calls", usage={"prompt_tokens": 30, "completion_tokens": 41}),
    ]
    deltas, result = _read(request, structured)
    choice = result.choices[0]
    assert choice.reasoning == "The user wants the weather." == "".join(d.reasoning for d in deltas)
    assert choice.text == "I will look it up." == "".join(d.text for d in deltas)
    assert [(c.id, c.name, json.loads(c.arguments)) for c in choice.tool_calls] == [
        ("chatcmpl-tool-1", "get_weather", {"city": "Paris", "days": 3}),
        ("chatcmpl-tool-2", "get_weather", {"city": "Rome"}),
    ]
    assert [c for d in deltas for c in d.tool_calls] == choice.tool_calls  # each once, when whole
    assert choice.finish_reason == "tool_calls" and (result.prompt_tokens, result.completion_tokens) == (30, 41)
    assert choice.reasoning_tokens == 2  # not reported: a reasoning piece is a token

    raw = "<think>The user wants the weather.</think>\n" + forcing.FORCED[forcing.TOOL_CALL]
    pieces = [raw[i : i + 3] for i in range(0, len(raw), 3)]  # markers split across pieces
    deltas, result = _read(request, [_chunk(content=p) for p in pieces] + [_chunk(finish="stop")])
    whole = parse_output(raw, thinking=True, tools=[forcing.WEATHER_TOOL])
    choice = result.choices[0]
    assert (
        (choice.text, choice.reasoning)
        == (whole.text, whole.reasoning)
        == ("I will look it up.", "The user wants the weather.")
    )
    assert [(c.name, c.arguments) for c in choice.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]
    assert choice.finish_reason == "tool_calls" and result.completion_tokens == len(pieces)


def test_several_choices_logprobs_and_counts_from_the_usage():
    request = EngineRequest(messages=[], sampling=SamplingParams(n=2, logprobs=True, top_logprobs=1))
    entry = {
        "token": "a",
        "logprob": -0.5,
        "bytes": [97],
        "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}],
    }
    chunks = [
        _chunk(0, content="a", logprobs=[entry]),
        _chunk(1, content="a", logprobs=[entry]),
        _chunk(1, content="aa", logprobs=[entry, entry]),
        _chunk(0, finish="stop"),
        _chunk(1, finish="length", usage={"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}),
    ]
    deltas, result = _read(request, chunks)
    assert [(c.index, c.text, c.finish_reason, c.completion_tokens) for c in result.choices] == [
        (0, "a", "stop", 1),
        (1, "aaa", "length", 2),
    ]
    assert result.choices[1].logprobs == [entry] * 3 and sum(len(d.logprobs) for d in deltas) == 4
    assert result.prompt_tokens == 7 and result.completion_tokens == 3


def test_a_server_that_ignores_n_gives_the_choice_it_sent():
    request = EngineRequest(messages=[], sampling=SamplingParams(n=3))
    deltas, result = _read(request, [_chunk(content="a"), _chunk(finish="stop", usage={"completion_tokens": 1})])
    reader = StreamReader(request)
    for chunk in [_chunk(content="a"), _chunk(finish="stop")]:
        reader.feed(chunk)
    assert reader.finished and reader.missing_choices == 2
    assert [(c.index, c.text, c.finish_reason) for c in result.choices] == [(0, "a", "stop")]


def test_every_parameter_is_sent_and_what_is_left_out_is_not():
    from PIL import Image

    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    request = EngineRequest(
        messages=[
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": {"a": 1}}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
        images=[Image.new("RGB", (8, 8), (1, 2, 3))],
        sampling=SamplingParams(
            max_new_tokens=9,
            temperature=0.5,
            top_p=0.9,
            top_k=5,
            min_p=0.1,
            repetition_penalty=1.2,
            presence_penalty=0.3,
            frequency_penalty=0.4,
            seed=7,
            stop=("x",),
            n=2,
            logprobs=True,
            top_logprobs=3,
            logit_bias=((11, -5.0),),
        ),
        tools=[forcing.WEATHER_TOOL],
        tool_choice="required",
        response_format=schema,
        enable_thinking=True,
    )
    body = request_body(request, "m")
    assert {k: v for k, v in body.items() if k != "messages"} == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_tokens": 9,
        "chat_template_kwargs": {"enable_thinking": True},
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.3,
        "frequency_penalty": 0.4,
        "seed": 7,
        "stop": ["x"],
        "n": 2,
        "logprobs": True,
        "top_logprobs": 3,
        "logit_bias": {"11": -5.0},
        "tools": [forcing.WEATHER_TOOL],
        "tool_choice": "required",
        "response_format": schema,
    }
    image, text = body["messages"][0]["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,") and text == {"type": "text", "text": "hi"}
    assert body["messages"][1]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "c1", "content": "ok"}
    plain = request_body(EngineRequest(messages=[{"role": "user", "content": "hi"}]), "m")
    assert set(plain) == {"model", "messages", "stream", "stream_options", "max_tokens", "chat_template_kwargs"}


@pytest.mark.parametrize(
    ("status", "payload", "code"),
    [
        (
            400,
            {"error": {"message": "This model's maximum context length is 4096 tokens", "code": 400}},
            "invalid_request",
        ),
        (422, {"detail": [{"msg": "field required"}]}, "invalid_request"),
        (404, {"object": "error", "message": "The model `x` does not exist."}, "model_unavailable"),
        (503, {"error": "The model's process crashed"}, "model_unavailable"),
        (500, {"error": {"message": "CUDA out of memory. Tried to allocate 2.00 GiB"}}, "gpu_oom"),
        (500, "Internal Server Error", "engine_error"),
    ],
)
def test_the_engine_servers_errors_keep_their_meaning(status, payload, code):
    error = error_for_status(status, payload, url="http://engine", model="m")
    assert error.code == code
    if code == "invalid_request":
        assert error.message in json.dumps(payload)  # the server's own message


def test_an_error_in_the_stream_keeps_its_meaning():
    assert (
        error_in_stream({"error": {"message": "torch.OutOfMemoryError: CUDA out of memory", "code": 500}}).code
        == "gpu_oom"
    )
    assert error_in_stream({"error": "EngineCore died"}).code == "engine_error"
    assert (
        error_in_stream({"error": {"message": "bad", "type": "BadRequestError", "code": 400}}).code == "invalid_request"
    )


def test_settings_refuse_an_unknown_backend_or_a_missing_engine_url():
    import subprocess
    import sys

    from tests.conftest import REPO

    def settings_error(**env) -> str:
        import os

        result = subprocess.run(
            [sys.executable, "-c", "import config.settings"],
            cwd=REPO,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0
        return result.stderr.strip().splitlines()[-1]

    assert "INFERENCE_BACKEND='vllm' is not valid" in settings_error(INFERENCE_BACKEND="vllm")
    assert "needs INFERENCE_ENGINE_URL" in settings_error(INFERENCE_BACKEND="openai", INFERENCE_ENGINE_URL="")
    assert "INFERENCE_ENGINE_URL='localhost:8001' is not valid" in settings_error(
        INFERENCE_BACKEND="openai", INFERENCE_ENGINE_URL="localhost:8001"
    )


def test_a_worker_with_an_engine_server_imports_neither_torch_nor_transformers():
    """Such a worker runs from the web tier's install: what it runs (the task, the runner, the
    engine server's client) stays clear of torch and transformers."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "import sys, django; django.setup();"
        "import inference.tasks; from inference import runner; from inference.engine import backends;"
        "engine = backends.open_engine(backends.from_settings()); assert not engine.loaded;"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad; print('ok')"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "INFERENCE_BACKEND": "openai",
        "INFERENCE_ENGINE_URL": f"http://127.0.0.1:{free_port()}",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
