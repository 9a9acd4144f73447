"""Issue 10, items 7 and 8 (part): no request field is silently ignored, and GET /v1/models/{id}.

Every field of /v1/chat/completions is honoured, stored (informational) or refused with
400 unsupported_parameter naming it, before admission: no Query row, nothing counted. Values that
change nothing (SDK defaults such as ``stop: null``) are accepted. /v1/glm/infer and /v1/queries
refuse unknown fields the same way in their own shape. The tiny model's answers are noise: the
tests look at status codes, errors and stored rows only."""

import base64
import json
import re
from pathlib import Path

import openai
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from inference.chat import CHAT_PARAMETERS, HONOURED, REFUSED, STORED
from inference.models import Query
from tests import media

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
REPO = Path(__file__).resolve().parent.parent

# A value for each refused field that would change the answer if it were honoured.
REFUSED_VALUES = {
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
    "prediction": {"type": "content", "content": "x"},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "web_search_options": {},
    "best_of": 2,
    "use_beam_search": True,
    "min_tokens": 5,
    "ignore_eos": True,
    "stop_token_ids": [3],
    "chat_template": "{{ messages }}",
    "guided_json": {"type": "object"},
    "echo": True,
}

# Values a client sends by default that change nothing: accepted.
OFF_VALUES = [
    ("stop", None),
    ("stop", []),
    ("seed", None),
    ("logprobs", False),
    ("top_logprobs", None),
    ("response_format", {"type": "text"}),
    ("tools", []),
    ("tools", None),
    ("tool_choice", None),
    ("presence_penalty", 0),
    ("frequency_penalty", 0.0),
    ("logit_bias", {}),
    ("top_k", -1),
    ("repetition_penalty", 1.0),
    ("modalities", ["text"]),
]


def _data_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(media.png(32, 32)).decode()


def _chat(**extra) -> dict:
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": _data_uri()}}]
    return {"model": "glm-4.6v-flash", "max_tokens": 2, "messages": [{"role": "user", "content": content}], **extra}


def _post(client, body: dict, url: str = CHAT):
    return client.post(url, json.dumps(body), content_type="application/json")


def _usage(client) -> tuple[int, int]:
    quotas = client.get("/v1/usage").json()["key"]["quotas"]
    return quotas["requests_per_minute"]["used"], quotas["tokens_per_month"]["used"]


def _assert_unsupported(client, body: dict, param: str, url: str = CHAT) -> str:
    before = _usage(client)
    response = _post(client, body, url)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert Query.objects.count() == 0
    assert _usage(client) == before  # refused before admission: nothing counted or reserved
    return error["message"]


@pytest.mark.parametrize("field", sorted(REFUSED_VALUES))
def test_a_refused_field_is_400_unsupported_parameter_naming_it(authed_client, field):
    message = _assert_unsupported(authed_client, _chat(**{field: REFUSED_VALUES[field]}), field)
    assert f"'{field}'" in message and ("not supported" in message or "deprecated" in message)


def test_every_field_of_the_brief_is_refused_by_the_table():
    assert all(CHAT_PARAMETERS[field].treatment == REFUSED for field in REFUSED_VALUES)


@pytest.mark.parametrize("field", ["temperatur", "max_token", "x-debug"])
def test_an_unknown_chat_field_is_refused(authed_client, field):
    message = _assert_unsupported(authed_client, _chat(**{field: 1}), field)
    assert "misspelt" in message


def _assert_invalid(client, body: dict, param: str) -> str:
    response = _post(client, body)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == param, error
    assert Query.objects.count() == 0
    return error["message"]


def test_n_outside_one_to_max_n_is_invalid(authed_client, settings):
    settings.MAX_N = 4
    assert "between 1 and 4" in _assert_invalid(authed_client, _chat(n=5), "n")
    _assert_invalid(authed_client, _chat(n=0), "n")


def test_unknown_stream_options_are_refused(authed_client):
    body = _chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    _assert_unsupported(authed_client, body, "stream_options.continuous_usage_stats")


@pytest.mark.parametrize("field, value", OFF_VALUES, ids=[f"{f}={v!r}" for f, v in OFF_VALUES])
def test_a_value_that_changes_nothing_is_accepted(authed_client, field, value):
    response = _post(authed_client, _chat(**{field: value}))
    assert response.status_code == 200, response.content
    assert Query.objects.count() == 1


def test_a_false_or_zero_of_the_wrong_kind_is_refused(authed_client):
    _assert_invalid(authed_client, _chat(logprobs=0), "logprobs")
    _assert_invalid(authed_client, _chat(presence_penalty=False), "presence_penalty")


BAD_VALUES = [
    ("stop", ["a", "b", "c", "d", "e"], "stop", "at most 4"),
    ("stop", 5, "stop", "string"),
    ("top_logprobs", 21, "top_logprobs", "between 0 and 20"),
    ("top_logprobs", 2, "top_logprobs", "logprobs"),
    ("seed", 1.5, "seed", "whole number"),
    ("top_k", -2, "top_k", "between"),
    ("tool_choice", "required", "tool_choice", "no 'tools'"),
    ("tools", [{"type": "function", "function": {"name": "bad name!"}}], "tools[0].function.name", "letters"),
    ("response_format", {"type": "xml"}, "response_format", "json_schema"),
    ("response_format", {"type": "json_schema", "json_schema": {"schema": {}}}, "response_format", "'name'"),
    (
        "response_format",
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}},
        "response_format",
        "frob",
    ),
    ("reasoning_effort", "extreme", "reasoning_effort", "one of"),
    ("logit_bias", {"abc": 1}, "logit_bias", "token ids"),
]


@pytest.mark.parametrize("field, value, param, says", BAD_VALUES, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_VALUES)])
def test_a_bad_value_of_an_honoured_field_is_400_naming_it(authed_client, field, value, param, says):
    assert says in _assert_invalid(authed_client, _chat(**{field: value}), param)


def test_a_tool_choice_naming_an_unknown_function_is_refused(authed_client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = _chat(tools=tools, tool_choice={"type": "function", "function": {"name": "g"}})
    assert "'g'" in _assert_invalid(authed_client, body, "tool_choice")


def test_chat_template_kwargs_other_than_enable_thinking_are_refused(authed_client):
    _assert_unsupported(authed_client, _chat(chat_template_kwargs={"foo": 1}), "chat_template_kwargs.foo")


def test_informational_fields_are_stored(authed_client):
    body = _chat(
        user="u-42",
        metadata={"run": "7", "team": "vision"},
        store=False,
        service_tier="flex",
        safety_identifier="hash-of-u42",
        prompt_cache_key="k1",
    )
    response = _post(authed_client, body)
    assert response.status_code == 200, response.content
    params = Query.objects.get().params
    assert params["user"] == "u-42"
    assert (params["safety_identifier"], params["prompt_cache_key"]) == ("hash-of-u42", "k1")
    assert params["metadata"] == {"run": "7", "team": "vision"}
    assert params["store"] is False
    assert params["service_tier"] == "flex"


@pytest.mark.parametrize(
    "field, value",
    [
        ("metadata", "x"),
        ("metadata", {"k": 1}),
        ("store", "yes"),
        ("service_tier", "fastest"),
        ("user", 5),
        ("safety_identifier", 5),
    ],
)
def test_informational_fields_of_the_wrong_type_are_invalid(authed_client, field, value):
    response = _post(authed_client, _chat(**{field: value}))
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == field
    assert Query.objects.count() == 0


@pytest.mark.parametrize("url", ["/v1/glm/infer", "/v1/queries"])
def test_unknown_fields_of_sightline_endpoints_are_refused_json(authed_client, url):
    before = _usage(authed_client)
    body = {"image": _data_uri(), "prompt": "hi", "max_token": 4}
    response = _post(authed_client, body, url)
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "unsupported_parameter" and "'max_token'" in response.json()["msg"]
    assert Query.objects.count() == 0 and _usage(authed_client) == before


@pytest.mark.parametrize("url", ["/v1/glm/infer", "/v1/queries"])
def test_unknown_fields_of_sightline_endpoints_are_refused_multipart(authed_client, url):
    before = _usage(authed_client)
    upload = SimpleUploadedFile("a.png", media.png(32, 32), content_type="image/png")
    response = authed_client.post(url, {"image": upload, "prompt": "hi", "temprature": "0.5"}, format="multipart")
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "unsupported_parameter" and "'temprature'" in response.json()["msg"]
    assert Query.objects.count() == 0 and _usage(authed_client) == before


def test_the_readme_table_matches_the_code():
    """The README's Parameters table lists every field with its treatment, as CHAT_PARAMETERS says."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("#### Parameters", 1)[1].split("\n### ", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (honoured|stored|refused) \|", section, flags=re.M))
    assert rows == {field: p.treatment for field, p in CHAT_PARAMETERS.items()}
    assert {HONOURED, STORED, REFUSED} == set(rows.values())


# --- GET /v1/models/{id}, with the official SDK against the real server -------------------------
def test_models_retrieve_with_the_sdk(live_stack, api_key, tenant):
    client = openai.OpenAI(base_url=live_stack.url + "/v1", api_key=api_key[1], max_retries=0, timeout=30)
    model = client.models.retrieve("glm-4.6v-flash")
    assert (model.id, model.object, model.owned_by) == ("glm-4.6v-flash", "model", "sightline")
    assert model.created > 0
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"
    tenant.allowed_models = ["some-other-model"]
    tenant.save()
    with pytest.raises(openai.NotFoundError):  # served, but not to this tenant
        client.models.retrieve("glm-4.6v-flash")
