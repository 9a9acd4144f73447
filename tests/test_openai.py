"""The OpenAI-compatible API, driven by the official `openai` package against the live stack
(Uvicorn + Celery worker + Redis + PostgreSQL). The tiny model's answers are noise: the tests compare
what the SDK returns with what was stored, never what the answer says."""

import base64

import openai
import pytest

from accounts import services as accounts
from inference.models import Query
from tests import media

pytestmark = pytest.mark.django_db(transaction=True)


def _data_uri(seed=0) -> str:
    return "data:image/png;base64," + base64.b64encode(media.encode(media.image(64, 64, seed=seed), "PNG")).decode()


def _messages(seed=0, text="What is in this picture?"):
    return [
        {"role": "system", "content": "You describe pictures."},
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": _data_uri(seed)}}],
        },
    ]


@pytest.fixture
def client_for(live_stack):
    def make(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=live_stack.url + "/v1", api_key=key, max_retries=0, timeout=60)

    return make


@pytest.fixture
def client(client_for, api_key):
    return client_for(api_key[1])


def _query_of(completion_id: str) -> Query:
    assert completion_id.startswith("chatcmpl-")
    return Query.objects.get(pk=completion_id.removeprefix("chatcmpl-"))


def test_non_streaming_completion_matches_the_stored_answer(client):
    completion = client.chat.completions.create(model="glm-4.6v-flash", messages=_messages(), max_tokens=12)
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    query = _query_of(completion.id)
    assert completion.choices[0].message.content == query.answer != ""
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "length"  # the tiny model always runs to max_tokens
    assert completion.usage.completion_tokens == query.completion_tokens == 12
    assert completion.usage.prompt_tokens == query.prompt_tokens
    assert completion.model == "glm-4.6v-flash"
    assert query.endpoint == Query.Endpoint.CHAT_COMPLETIONS
    assert "messages" not in query.params
    assert query.messages[0] == {
        "role": "system",
        "content": [{"type": "text", "text": "You describe pictures."}],
    }


def test_streaming_chunks_join_to_the_stored_answer_with_usage(client):
    stream = client.chat.completions.create(
        model="glm-4.6v-flash",
        messages=_messages(seed=3),
        max_completion_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage_chunks = [c for c in chunks if c.usage is not None]
    query = _query_of(chunks[0].id)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert text == query.answer != ""
    assert finish == ["length"]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
    assert usage_chunks[0].usage.completion_tokens == query.completion_tokens == 20


def test_streaming_without_usage_has_no_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(model="glm-4.6v-flash", messages=_messages(), max_tokens=5, stream=True)
    )
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == _query_of(chunks[0].id).answer


def test_rate_limit_surfaces_as_rate_limit_error(client_for, tenant):
    _, key = accounts.create_api_key(tenant, "slow", requests_per_minute=1)
    client = client_for(key)
    client.chat.completions.create(model="glm-4.6v-flash", messages=_messages(), max_tokens=2)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="glm-4.6v-flash", messages=_messages(), max_tokens=2)
    assert info.value.code == "rate_limited"
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert Query.objects.filter(api_key__name="slow").count() == 1


def test_bad_and_revoked_keys_are_authentication_errors(client_for, api_key):
    with pytest.raises(openai.AuthenticationError) as info:
        client_for("sl_AAAAAAAA_" + "b" * 32).chat.completions.create(model="glm-4.6v-flash", messages=_messages())
    assert info.value.code == "unauthorized"
    row, key = api_key
    client = client_for(key)
    assert client.models.list().data[0].id == "glm-4.6v-flash"
    accounts.revoke_api_key(row)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="glm-4.6v-flash", messages=_messages())
    assert info.value.code == "key_revoked"


def test_models_are_limited_per_tenant(client_for, tenant):
    tenant.allowed_models = ["some-other-model"]
    tenant.save()
    client = client_for(accounts.create_api_key(tenant, "limited")[1])
    assert client.models.list().data == []
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="glm-4.6v-flash", messages=_messages())
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize(
    "messages, fragment",
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri()}}] * 9}],
            "has 9 images; the limit is 8",
        ),
        ([{"role": "robot", "content": "x"}], "role"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
            "not fetched",
        ),
    ],
)
def test_bad_requests_are_bad_request_errors(client, messages, fragment):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="glm-4.6v-flash", messages=messages)
    assert fragment in info.value.message
    assert Query.objects.count() == 0
