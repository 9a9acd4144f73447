"""Issue 10: every chat parameter honoured, structured outputs, tool calls and GLM's reasoning,
through the official `openai` SDK against the live stack (Uvicorn + a Celery worker + Redis +
PostgreSQL) and the tiny random model.

The tiny model's answers are noise. Each parameter is tested by an effect it cannot have when it is
ignored: a stop string cuts a forced output exactly there (tests/forcing.py forces tokens through
the real generation path), a seed repeats a sampled answer and another seed does not, a penalty
changes a greedy answer, logprobs name the greedy token as the likeliest one, a schema is met by
whatever the random model writes."""

import json

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from inference.models import Query
from tests import forcing, media

pytestmark = pytest.mark.django_db(transaction=True)
MODEL = "glm-4.6v-flash"


@pytest.fixture
def client(live_stack, api_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_stack.url + "/v1", api_key=api_key[1], max_retries=0, timeout=60)


def _picture() -> dict:
    import base64

    data = base64.b64encode(media.png(48, 48)).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def ask(text: str = "Describe the picture.", *, image: bool = True) -> list[dict]:
    content = [{"type": "text", "text": text}, *([_picture()] if image else [])]
    return [{"role": "user", "content": content}]


def create(client, text="Describe the picture.", **params):
    params.setdefault("max_tokens", 16)
    params.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=ask(text), **params)


def stream(client, text="Describe the picture.", **params) -> dict:
    """A streamed completion put together per choice: text, reasoning, tool calls, finish reasons."""
    params.setdefault("max_tokens", 16)
    params.setdefault("temperature", 0)
    out: dict[int, dict] = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=ask(text), stream=True, **params):
        for choice in chunk.choices:
            got = out.setdefault(choice.index, {"text": "", "reasoning": "", "tool_calls": [], "finish": None})
            got["text"] += choice.delta.content or ""
            got["reasoning"] += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            for call in choice.delta.tool_calls or []:
                got["tool_calls"].append((call.function.name, call.function.arguments))
            got["finish"] = choice.finish_reason or got["finish"]
    return out


# --- stop, seed, n ------------------------------------------------------------------------------
def test_stop_cuts_the_answer_before_the_stop_text(client):
    completion = create(client, f"{forcing.STOP} go", stop=["STOP"], max_tokens=40)
    choice = completion.choices[0]
    # forced: "alpha beta STOP gamma delta"; the answer's trailing whitespace is not kept (GLM's parser)
    assert choice.message.content == "alpha beta"
    assert choice.finish_reason == "stop"
    streamed = stream(client, f"{forcing.STOP} go", stop="STOP", max_tokens=40)[0]
    assert (streamed["text"], streamed["finish"]) == ("alpha beta", "stop")
    # Without stop, the whole forced text comes back: the cut above is the stop's doing.
    assert (
        create(client, f"{forcing.STOP} go", max_tokens=40).choices[0].message.content == forcing.FORCED[forcing.STOP]
    )


def test_a_seed_repeats_a_sampled_answer_and_another_seed_differs(client):
    first = create(client, temperature=1.0, seed=11, max_tokens=24).choices[0].message.content
    again = create(client, temperature=1.0, seed=11, max_tokens=24).choices[0].message.content
    other = create(client, temperature=1.0, seed=12, max_tokens=24).choices[0].message.content
    assert first == again
    assert other != first


def test_n_choices_are_decoded_together_each_with_its_index(client):
    completion = create(client, n=3, temperature=1.0, seed=5, max_tokens=12)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    texts = [c.message.content for c in completion.choices]
    assert len(set(texts)) == 3  # sampled: seed + index differ
    assert completion.usage.completion_tokens == 3 * 12
    streamed = stream(client, n=3, temperature=1.0, seed=5, max_tokens=12)
    assert [streamed[i]["text"] for i in range(3)] == texts
    query = Query.objects.get(pk=completion.id.removeprefix("chatcmpl-"))
    assert [c["text"] for c in query.choices] == texts


# --- logprobs and penalties ---------------------------------------------------------------------
def test_logprobs_name_the_greedy_token_as_the_likeliest(client):
    completion = create(client, logprobs=True, top_logprobs=3, max_tokens=8)
    entries = completion.choices[0].logprobs.content
    assert len(entries) == 8
    assert "".join(e.token for e in entries) == completion.choices[0].message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy took the likeliest
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    assert create(client, max_tokens=8).choices[0].logprobs is None


@pytest.mark.parametrize(
    "penalty",
    [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 2.0}}],
    ids=["frequency", "presence", "repetition"],
)
def test_a_penalty_changes_a_greedy_answer(client, penalty):
    """The tiny model's greedy answer repeats tokens; a penalty on repeats must change it."""
    plain = create(client, max_tokens=32).choices[0].message.content
    assert create(client, max_tokens=32, **penalty).choices[0].message.content != plain


def test_top_k_one_and_min_p_one_sample_the_greedy_answer(client):
    greedy = create(client, max_tokens=24).choices[0].message.content
    sampled = create(client, temperature=1.0, seed=3, max_tokens=24).choices[0].message.content
    assert sampled != greedy
    top_k = create(client, temperature=1.0, seed=3, max_tokens=24, extra_body={"top_k": 1})
    min_p = create(client, temperature=1.0, seed=3, max_tokens=24, extra_body={"min_p": 1.0})
    assert top_k.choices[0].message.content == greedy
    assert min_p.choices[0].message.content == greedy


def test_logit_bias_forces_a_token(client, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    word = next(t for t in sorted(tokenizer.get_vocab()) if t.isalpha() and t.islower() and len(t) >= 3)
    token = tokenizer.convert_tokens_to_ids(word)
    completion = create(client, max_tokens=5, logit_bias={str(token): 100})
    assert completion.choices[0].message.content == word * 5


# --- structured outputs -------------------------------------------------------------------------
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "animal": {"type": "boolean"},
    },
    "required": ["colour", "count", "animal"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_validates_every_time(client, seed):
    response_format = {"type": "json_schema", "json_schema": {"name": "picture", "schema": SCHEMA, "strict": True}}
    completion = create(client, temperature=1.0, seed=seed, max_tokens=60, response_format=response_format)
    answer = json.loads(completion.choices[0].message.content)
    jsonschema.validate(answer, SCHEMA)
    assert completion.choices[0].finish_reason == "stop"


def test_json_object_output_is_a_json_object(client):
    completion = create(client, max_tokens=80, response_format={"type": "json_object"})
    choice = completion.choices[0]
    if choice.finish_reason == "stop":  # a random model may still be writing at max_tokens
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")


def test_the_sdk_parse_helper_gets_a_validated_object(client):
    from typing import Literal

    from pydantic import BaseModel

    class Picture(BaseModel):  # bounded fields: a random model's free integer could run past max_tokens
        animal: bool
        colour: Literal["red", "green", "blue"]

    completion = client.beta.chat.completions.parse(
        model=MODEL, messages=ask(), response_format=Picture, max_tokens=60, temperature=0
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Picture)


# --- tool calls ---------------------------------------------------------------------------------
def test_a_tool_call_in_the_output_becomes_tool_calls(client):
    completion = create(client, f"{forcing.TOOL_CALL} weather?", tools=[forcing.WEATHER_TOOL], max_tokens=80)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look it up."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    # "city" is a string in the schema, "days" an integer: as vLLM's GLM parser reads them.
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    streamed = stream(client, f"{forcing.TOOL_CALL} weather?", tools=[forcing.WEATHER_TOOL], max_tokens=80)[0]
    assert streamed["finish"] == "tool_calls" and streamed["text"] == "I will look it up."
    assert streamed["tool_calls"] == [("get_weather", call.function.arguments)]


def test_parallel_tool_calls_false_keeps_one_call(client):
    params = {"tools": [forcing.WEATHER_TOOL], "max_tokens": 80}
    both = create(client, f"{forcing.TWO_TOOL_CALLS} weather?", **params).choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in both] == ["Paris", "Rome"]
    one = create(client, f"{forcing.TWO_TOOL_CALLS} weather?", parallel_tool_calls=False, **params)
    assert [json.loads(c.function.arguments)["city"] for c in one.choices[0].message.tool_calls] == ["Paris"]


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=["required", "named"]
)
def test_a_forced_tool_choice_makes_the_random_model_call_the_tool(client, tool_choice):
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    completion = create(
        client, tools=[forcing.WEATHER_TOOL, other], tool_choice=tool_choice, max_tokens=120, temperature=1.0, seed=4
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        arguments = json.loads(call.function.arguments)
        if tool_choice != "required":
            assert call.function.name == "get_weather"
        if call.function.name == "get_weather":
            assert isinstance(arguments["city"], str)


def test_tool_choice_none_leaves_tool_text_as_text(client):
    completion = create(client, f"{forcing.TOOL_CALL} weather?", tools=[forcing.WEATHER_TOOL], tool_choice="none")
    assert not completion.choices[0].message.tool_calls


def test_an_agent_loop_round_trip(client):
    """The messages an agent sends after a tool call (assistant tool_calls with null content, then
    a tool message) are accepted and answered."""
    first = create(client, f"{forcing.TOOL_CALL} weather?", tools=[forcing.WEATHER_TOOL], max_tokens=80)
    message = first.choices[0].message
    messages = [
        *ask(f"{forcing.TOOL_CALL} weather?"),
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in message.tool_calls]},
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temperature": 21}'},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[forcing.WEATHER_TOOL], max_tokens=8, temperature=0
    )
    assert second.choices[0].message.content or second.choices[0].message.tool_calls
    query = Query.objects.get(pk=second.id.removeprefix("chatcmpl-"))
    assert query.status == Query.Status.SUCCEEDED


# --- reasoning ----------------------------------------------------------------------------------
def test_reasoning_is_split_from_the_answer_and_boxes_removed(client):
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    completion = create(client, f"{forcing.REASONING} colour?", max_tokens=60, extra_body=thinking)
    message = completion.choices[0].message
    assert message.content == "Red"
    assert message.model_extra["reasoning_content"] == "The picture is red, so the answer is red."
    details = completion.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < completion.usage.completion_tokens
    query = Query.objects.get(pk=completion.id.removeprefix("chatcmpl-"))
    assert (query.answer, query.reasoning) == ("Red", message.model_extra["reasoning_content"])
    streamed = stream(client, f"{forcing.REASONING} colour?", max_tokens=60, extra_body=thinking)[0]
    assert (streamed["text"], streamed["reasoning"]) == ("Red", query.reasoning)


def test_box_markers_are_removed_from_answers(client):
    assert create(client, f"{forcing.BOX} ?", max_tokens=40).choices[0].message.content == "The answer: 42"


@pytest.mark.parametrize(
    "switch", [{"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}], ids=str
)
def test_thinking_can_be_switched_off(client, switch):
    completion = create(client, max_tokens=4, extra_body=switch)
    query = Query.objects.get(pk=completion.id.removeprefix("chatcmpl-"))
    assert query.params["enable_thinking"] is False
    on = create(client, max_tokens=4)
    assert Query.objects.get(pk=on.id.removeprefix("chatcmpl-")).params["enable_thinking"] is True


# --- streaming and not, the same --------------------------------------------------------------
@pytest.mark.parametrize(
    "text, params",
    [
        ("Describe it.", {}),
        (f"{forcing.TOOL_CALL} weather?", {"tools": [forcing.WEATHER_TOOL]}),
        (f"{forcing.REASONING} colour?", {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}),
    ],
    ids=["text", "tool-call", "reasoning"],
)
def test_streaming_and_not_give_the_same_answer(client, text, params):
    plain = create(client, text, max_tokens=60, **params).choices[0]
    streamed = stream(client, text, max_tokens=60, **params)[0]
    assert streamed["text"] == (plain.message.content or "")
    assert streamed["reasoning"] == (plain.message.model_extra.get("reasoning_content") or "")
    calls = [(c.function.name, c.function.arguments) for c in plain.message.tool_calls or []]
    assert streamed["tool_calls"] == calls
    assert streamed["finish"] == plain.finish_reason


# --- the websocket and /v1/glm/infer ------------------------------------------------------------
async def _socket(ws_url: str, key: str, frame: dict) -> list[dict]:
    import asyncio

    import websockets

    frames = []
    async with websockets.connect(ws_url + "/ws/v1/infer", additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        await ws.recv()  # ready
        await ws.send(json.dumps({"type": "infer", **frame}))
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            if frames[-1]["type"] in ("done", "error"):
                return frames


def test_the_websocket_sends_reasoning_and_tool_call_frames(live_stack, api_key):
    import asyncio

    frames = asyncio.run(_socket(live_stack.ws_url, api_key[1], {"prompt": f"{forcing.REASONING} colour?"}))
    reasoning = "".join(f["text"] for f in frames if f["type"] == "reasoning")
    answer = "".join(f["text"] for f in frames if f["type"] == "token")
    done = frames[-1]
    assert (reasoning, answer) == ("The picture is red, so the answer is red.", "Red")
    assert (done["type"], done["result"], done["reasoning"]) == ("done", "Red", reasoning)
    assert done["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    frame = {"prompt": f"{forcing.TOOL_CALL} weather?", "tools": [forcing.WEATHER_TOOL], "max_tokens": 80}
    frames = asyncio.run(_socket(live_stack.ws_url, api_key[1], frame))
    (call,) = [f["tool_call"] for f in frames if f["type"] == "tool_call"]
    assert call["function"]["name"] == "get_weather" and frames[-1]["finish_reason"] == "tool_calls"
    assert frames[-1]["tool_calls"] == [{k: v for k, v in call.items() if k != "index"}]
    off = asyncio.run(
        _socket(live_stack.ws_url, api_key[1], {"prompt": "hi", "chat_template_kwargs": {"enable_thinking": False}})
    )
    assert Query.objects.get(pk=off[-1]["query_id"]).params["enable_thinking"] is False


def test_glm_infer_keeps_the_reasoning_apart(live_stack, api_key):
    import httpx

    body = {"prompt": f"{forcing.REASONING} colour?", "max_tokens": 60, "enable_thinking": True}
    headers = {"Authorization": f"Bearer {api_key[1]}"}
    answer = httpx.post(live_stack.url + "/v1/glm/infer", json=body, headers=headers, timeout=60).json()
    assert (answer["result"], answer["reasoning"]) == ("Red", "The picture is red, so the answer is red.")
    plain = httpx.post(live_stack.url + "/v1/glm/infer", json={"prompt": "hi"}, headers=headers, timeout=60).json()
    assert plain["reasoning"] == "" and Query.objects.get(pk=plain["query_id"]).params["enable_thinking"] is False


def test_omitted_sampling_values_come_from_the_generation_config(client, tiny_model_dir):
    """The tiny model carries GLM-4.6V-Flash's generation_config (temperature, top_p, top_k,
    repetition_penalty): a request without them samples with those values, as vLLM does."""
    config = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert config["do_sample"] is True and config["temperature"] > 0

    def answer(**params) -> str:
        completion = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=24, **params)
        return completion.choices[0].message.content

    same = {"temperature": config["temperature"], "top_p": config["top_p"]}
    extra = {"top_k": config["top_k"], "repetition_penalty": config["repetition_penalty"]}
    assert answer(seed=21) == answer(seed=21, **same, extra_body=extra)
    assert answer(seed=21) != answer(seed=21, temperature=0)  # not greedy
