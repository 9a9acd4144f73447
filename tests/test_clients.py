"""Unmodified OpenAI-based clients pointed at Sightline (issue 10): the official `openai` SDK (sync
and async, chat completions, the Responses API, models), litellm's `completion` and LangChain's
`ChatOpenAI` (text-only invoke, an image, bind_tools with a tool-call round trip, structured
output), against the live stack (Uvicorn + a Celery worker + Redis + PostgreSQL) and the tiny
random model, whose answers are noise: specific outputs are forced through the real generation
path (tests/forcing.py)."""

import asyncio
import base64
import json
import os

import openai
import pytest

from inference.models import Query
from tests import forcing, media

pytestmark = pytest.mark.django_db(transaction=True)
MODEL = "glm-4.6v-flash"
# litellm reads a price list from the network at import unless told to use its own copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _data_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(media.png(40, 40)).decode()


@pytest.fixture
def base_url(live_stack) -> str:
    return live_stack.url + "/v1"


@pytest.fixture
def key(api_key) -> str:
    return api_key[1]


# --- the openai SDK -----------------------------------------------------------------------------
def test_sdk_text_only_chat(base_url, key):
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=6
    )
    assert completion.choices[0].message.content
    query = Query.objects.get(pk=completion.id.removeprefix("chatcmpl-"))
    assert query.status == Query.Status.SUCCEEDED and query.answer == completion.choices[0].message.content


def test_async_sdk_chat_and_stream(base_url, key):
    async def run():
        client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
        plain = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
        )
        parts = []
        async for chunk in await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True
        ):
            parts.extend(c.delta.content or "" for c in chunk.choices)
        return plain.choices[0].message.content, "".join(parts)

    plain, streamed = asyncio.run(run())
    assert plain and plain == streamed


def test_sdk_responses_plain_and_streamed(base_url, key):
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
    content = [{"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": _data_uri()}]
    response = client.responses.create(
        model=MODEL,
        instructions="Answer briefly.",
        input=[{"role": "user", "content": content}],
        max_output_tokens=8,
        temperature=0,
    )
    assert response.id.startswith("resp_") and response.output_text
    assert response.usage.output_tokens == 8
    query = Query.objects.get(pk=response.id.removeprefix("resp_"))
    assert query.endpoint == Query.Endpoint.RESPONSES and query.answer == response.output_text
    events = list(
        client.responses.create(
            model=MODEL,
            instructions="Answer briefly.",
            input=[{"role": "user", "content": content}],
            max_output_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == response.output_text  # greedy: the same answer
    assert events[-1].response.output_text == response.output_text


def test_sdk_responses_text_input_and_refused_state(base_url, key):
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
    assert client.responses.create(model=MODEL, input="hello", max_output_tokens=4).output_text
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="hello", previous_response_id="resp_123")
    assert info.value.code == "unsupported_parameter" and info.value.param == "previous_response_id"


# --- litellm ------------------------------------------------------------------------------------
def test_litellm_completion_text_and_stream(base_url, key):
    import litellm

    response = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=base_url,
        api_key=key,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
    )
    text = response.choices[0].message.content
    assert text
    chunks = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=base_url,
        api_key=key,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_litellm_tool_call(base_url, key):
    import litellm

    response = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=base_url,
        api_key=key,
        messages=[{"role": "user", "content": f"{forcing.TOOL_CALL} weather in Paris?"}],
        tools=[forcing.WEATHER_TOOL],
        max_tokens=80,
    )
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"


# --- LangChain ----------------------------------------------------------------------------------
@pytest.fixture
def chat_model(base_url, key):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=base_url, api_key=key, max_tokens=80, temperature=0, max_retries=0)


def test_langchain_invoke_text_and_image(chat_model):
    from langchain_core.messages import HumanMessage

    assert chat_model.invoke("hello").content
    image = HumanMessage(
        content=[{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": _data_uri()}}]
    )
    assert chat_model.invoke([image]).content


def test_langchain_bind_tools_round_trip(chat_model):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str, days: int = 1) -> str:
        """The weather of a city."""
        return f"sunny in {city}"

    model = chat_model.bind_tools([get_weather])
    question = HumanMessage(content=f"{forcing.TOOL_CALL} weather in Paris?")
    first = model.invoke([question])
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris", "days": 3}
    result = ToolMessage(content=get_weather.invoke(call["args"]), tool_call_id=call["id"])
    second = model.invoke([question, first, result])
    assert second.content or second.tool_calls  # the loop goes on after the tool's answer


def test_langchain_structured_output(chat_model):
    from typing import Literal

    from pydantic import BaseModel

    class Picture(BaseModel):  # bounded fields: a random model's free integer could run past max_tokens
        animal: bool
        colour: Literal["red", "green", "blue"]

    structured = chat_model.with_structured_output(Picture, method="json_schema")
    assert isinstance(structured.invoke("Describe the picture."), Picture)
