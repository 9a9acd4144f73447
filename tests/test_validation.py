"""Issue 9, items 4, 5, 16 and 17: malformed input is a 400 naming the field (never a 500), the
prompt limits hold for the whole conversation before admission spends anything, the OpenAPI
schema tells the truth, and create_api_key refuses a non-positive expiry.

In-process requests against the real PostgreSQL and Redis (quota counters); the query runs on the
embedded worker thread where one is needed. The tiny model's answers are noise, never asserted."""

import base64
import json

import pytest
from django.core.management import CommandError, call_command

from inference import validation
from inference.models import Query
from tests import media

pytestmark = pytest.mark.django_db(transaction=True)

GLM, QUERIES, CHAT = "/v1/glm/infer", "/v1/queries", "/v1/chat/completions"
PNG = base64.b64encode(media.png(32, 24)).decode()
DATA_URI = "data:image/png;base64," + PNG


def _post(client, url, raw: str):
    return client.generic("POST", url, raw.encode("utf-8", "surrogatepass"), content_type="application/json")


def _error(response) -> tuple[str, str, str | None]:
    """(code, message, param) in either error shape."""
    body = response.json()
    if "error" in body:
        return body["error"]["code"], body["error"]["message"], body["error"]["param"]
    return body["code"], body["msg"], None


def _chat(messages=None, **fields) -> dict:
    user = {
        "role": "user",
        "content": [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": DATA_URI}}],
    }
    return {"model": "glm-4.6v-flash", "messages": messages or [user], "max_tokens": 4, **fields}


# --- item 4: 400 naming the field, never 500 ---------------------------------------------------
@pytest.mark.parametrize("url", [GLM, QUERIES, CHAT])
@pytest.mark.parametrize("raw", ["[1]", '"x"', "5", "null", "true"])
def test_json_bodies_that_are_not_objects_are_400(authed_client, url, raw):
    response = _post(authed_client, url, raw)
    assert response.status_code == 400, response.content
    code, message, _ = _error(response)
    assert code == "invalid_request" and "must be a JSON object" in message
    assert Query.objects.count() == 0


@pytest.mark.parametrize("url", [GLM, QUERIES, CHAT])
def test_deeply_nested_json_is_400(authed_client, url):
    response = _post(authed_client, url, "[" * 100_000 + "]" * 100_000)
    assert response.status_code == 400, response.content
    assert "nested too deeply" in _error(response)[1]


def _glm(fields: str) -> str:
    """A raw JSON body for /v1/glm/infer: a valid image and the given (raw) fields."""
    return '{"image": "' + PNG + '", ' + fields + "}"


BAD_GLM = {
    "max_tokens-1e999": (_glm('"prompt": "hi", "max_tokens": 1e999'), "max_tokens"),
    "max_tokens-10^400": (_glm('"prompt": "hi", "max_tokens": 1' + "0" * 400), "max_tokens"),
    "temperature--1e999": (_glm('"prompt": "hi", "temperature": -1e999'), "temperature"),
    "max_tokens-string": (_glm('"prompt": "hi", "max_tokens": "12"'), "max_tokens"),
    "nul-prompt": (_glm('"prompt": "a\\u0000b"'), "prompt"),
    "surrogate-prompt": (_glm('"prompt": "\\ud800"'), "prompt"),
    "nul-unknown-field": (_glm('"prompt": "hi", "note": "\\u0000"'), "note"),
    "prompt-list": (_glm('"prompt": ["hi"]'), "prompt"),
}


@pytest.mark.parametrize("url", [GLM, QUERIES])
@pytest.mark.parametrize("case", BAD_GLM, ids=list(BAD_GLM))
def test_bad_fields_are_400_naming_the_field(authed_client, url, case):
    raw, field = BAD_GLM[case]
    response = _post(authed_client, url, raw)
    assert response.status_code == 400, response.content
    code, message, _ = _error(response)
    assert code == "invalid_request" and f"'{field}'" in message
    assert Query.objects.count() == 0


BAD_CHAT = {
    "role-list": (_chat([{"role": ["user"], "content": "x"}]), "messages[0].role"),
    "message-string": (_chat(["hello"]), "messages[0]"),
    "content-number": (_chat([{"role": "user", "content": 5}]), "messages[0].content"),
    "text-part-number": (
        _chat([{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        "messages[0].content[0].text",
    ),
    "image-url-number": (
        _chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]),
        "messages[0].content[0].image_url",
    ),
    "name-number": (_chat([{"role": "user", "name": 5, "content": "x"}]), "messages[0].name"),
    "stream-string": (_chat(stream="false"), "stream"),
    "stream-options-string": (_chat(stream=True, stream_options="x"), "stream_options"),
    "include-usage-string": (
        _chat(stream=True, stream_options={"include_usage": "yes"}),
        "stream_options.include_usage",
    ),
    "max-tokens-bool": (_chat(max_tokens=True), "max_tokens"),
    "n-string": (_chat(n="1"), "n"),
    "model-list": (_chat(model=["glm-4.6v-flash"]), "model"),
    "user-number": (_chat(user=5), "user"),
    "user-nul": (_chat(user="a\x00b"), "user"),
    "model-nul": (_chat(model="glm\x00"), "model"),
    "text-nul": (_chat([{"role": "system", "content": "a\x00"}]), "messages[0].content"),
}


@pytest.mark.parametrize("case", BAD_CHAT, ids=list(BAD_CHAT))
def test_bad_chat_fields_are_400_naming_the_field(authed_client, case):
    body, field = BAD_CHAT[case]
    response = _post(authed_client, CHAT, json.dumps(body))
    assert response.status_code == 400, response.content
    code, _, param = _error(response)
    assert code == "invalid_request" and param == field
    assert Query.objects.count() == 0


def test_chat_surrogate_and_infinite_max_tokens_are_400(authed_client):
    raw = json.dumps(_chat()).replace('"What is it?"', '"\\udfff"')
    assert _error(_post(authed_client, CHAT, raw))[2] == "messages[0].content[0].text"
    raw = json.dumps(_chat()).replace('"max_tokens": 4', '"max_tokens": 1e999')
    assert _error(_post(authed_client, CHAT, raw))[2] == "max_tokens"
    assert Query.objects.count() == 0


def test_a_tiny_temperature_is_greedy(authed_client):
    """Temperatures in (0, 1e-5) gave NaN probabilities in generation: now they are greedy."""
    body = {"prompt": "Describe it.", "image": PNG, "max_tokens": 4, "temperature": 1e-7}
    response = authed_client.post(GLM, body, format="json")
    assert response.status_code == 200, response.content
    assert Query.objects.get().params["temperature"] == 0.0


def test_multipart_numbers_are_still_read_from_text(authed_client):
    from django.core.files.uploadedfile import SimpleUploadedFile

    upload = SimpleUploadedFile("a.png", media.png(16, 16), content_type="image/png")
    response = authed_client.post(GLM, {"image": upload, "prompt": "a\x00b"}, format="multipart")
    assert response.status_code == 400 and "'prompt'" in _error(response)[1]
    upload.seek(0)
    response = authed_client.post(GLM, {"image": upload, "prompt": "hi", "max_tokens": "1e999"}, format="multipart")
    assert response.status_code == 400 and "'max_tokens'" in _error(response)[1]
    assert Query.objects.count() == 0


# --- item 5: the whole conversation is bounded, before admission -------------------------------
def _usage(client) -> tuple[int, int]:
    quotas = client.get("/v1/usage").json()["key"]["quotas"]
    return quotas["requests_per_minute"]["used"], quotas["tokens_per_month"]["used"]


def _assert_refused_for_free(client, body, before):
    response = _post(client, CHAT, json.dumps(body))
    assert response.status_code == 400, response.content
    code, message, param = _error(response)
    assert code == "invalid_request" and param == "messages"
    assert Query.objects.count() == 0
    assert _usage(client) == before  # no request counted, no token reserved
    return message


def test_a_huge_system_message_is_refused_before_admission(authed_client):
    before = _usage(authed_client)
    body = _chat()
    body["messages"].insert(0, {"role": "system", "content": "x" * 400_000})
    message = _assert_refused_for_free(authed_client, body, before)
    assert "400,011 characters" in message and "8,000" in message


def test_small_parts_over_the_total_are_refused(authed_client):
    before = _usage(authed_client)
    body = _chat()
    body["messages"][:0] = [{"role": "user", "content": "y" * 2000}, {"role": "assistant", "content": "z" * 2000}] * 2
    body["messages"][-1]["content"][0]["text"] = "w" * 1000  # each part < 8,000; together 9,000
    message = _assert_refused_for_free(authed_client, body, before)
    assert "9,000 characters" in message


def test_prompt_tokens_of_the_conversation_are_bounded(authed_client, settings):
    overhead = settings.IMAGE_TOKEN_BOUND + settings.TEMPLATE_TOKEN_BOUND + 3 * validation.MESSAGE_TOKEN_BOUND
    settings.MAX_PROMPT_TOKENS = overhead + 50
    before = _usage(authed_client)
    body = _chat()
    noise = "".join(chr(0x4E00 + i * 37 % 2000) for i in range(40))  # rare characters: several tokens each
    body["messages"][:0] = [{"role": "system", "content": noise}, {"role": "user", "content": noise}]
    message = _assert_refused_for_free(authed_client, body, before)
    assert "prompt tokens" in message


def test_tokens_are_counted_with_the_models_tokenizer(tiny_model_dir, settings):
    settings.INFERENCE_MODEL = str(tiny_model_dir)
    words = "the picture shows a cat on a red chair " * 8
    assert validation._tokenizer(str(tiny_model_dir)) is not None
    counted = validation.prompt_tokens([words], images=0) - validation.MESSAGE_TOKEN_BOUND
    assert 0 < counted - settings.TEMPLATE_TOKEN_BOUND < len(words)  # fewer tokens than characters
    settings.INFERENCE_MODEL = "no/such-model-anywhere"  # no local tokenizer: one token per character
    assert validation.prompt_tokens([words], images=0) == len(words) + 4 + settings.TEMPLATE_TOKEN_BOUND


# --- item 16: the OpenAPI schema ----------------------------------------------------------------
@pytest.fixture
def schema(api_client):
    response = api_client.get("/openapi.json")
    assert response.status_code == 200
    return json.loads(response.content)


def test_the_schema_is_valid_openapi(schema):
    from openapi_spec_validator import validate

    validate(schema)


def test_either_key_header_suffices_in_the_schema_and_in_fact(schema, api_client, api_key):
    operations = [op for path in schema["paths"].values() for op in path.values() if path is not None]
    keyed = [op for op in operations if op["operationId"] not in ("health", "health_ready")]
    for op in keyed:
        assert op["security"] == [{"BearerKey": []}, {"XApiKey": []}], op["operationId"]
    assert api_client.get("/v1/usage", HTTP_X_API_KEY=api_key[1]).status_code == 200
    assert api_client.get("/v1/usage", HTTP_AUTHORIZATION=f"Bearer {api_key[1]}").status_code == 200


def test_query_list_is_a_paginated_object_with_nullable_timestamps(schema, authed_client):
    page = schema["paths"]["/v1/queries"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    ref = page["$ref"].rsplit("/", 1)[1]
    page = schema["components"]["schemas"][ref]
    assert page["type"] == "object" and {"next", "previous", "results"} <= set(page["properties"])
    assert page["properties"]["next"].get("nullable") is True
    query = schema["components"]["schemas"]["Query"]["properties"]
    assert query["started_at"]["nullable"] is True and query["finished_at"]["nullable"] is True
    body = authed_client.get("/v1/queries").json()
    assert set(body) == {"next", "previous", "results"}


def test_every_operation_documents_its_errors(schema):
    expected = {
        ("post", "/v1/glm/infer"): {"400", "401", "413", "415", "429", "503", "504"},
        ("post", "/v1/queries"): {"400", "401", "413", "415", "429", "503"},
        ("post", "/v1/chat/completions"): {"400", "401", "404", "413", "415", "429", "503", "504"},
        ("get", "/v1/queries"): {"401", "404"},
        ("get", "/v1/queries/{query_id}"): {"401", "404"},
        ("post", "/v1/queries/{query_id}/cancel"): {"401", "404"},
        ("get", "/v1/models"): {"401"},
        ("get", "/v1/usage"): {"401"},
    }
    for (method, path), statuses in expected.items():
        assert statuses <= set(schema["paths"][path][method]["responses"]), (method, path)
    chat_400 = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]["content"]["application/json"]
    assert "OpenAIError" in chat_400["schema"]["$ref"]


def test_the_schemas_examples_are_requests_that_work(schema, authed_client):
    tried = 0
    for path, methods in schema["paths"].items():
        for op in methods.values():
            examples = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("examples", {})
            for example in examples.values():
                response = authed_client.post(path, example["value"], format="json")
                assert response.status_code in (200, 202), (path, response.content)
                tried += 1
    assert tried >= 3


# --- item 17 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("days", ["0", "-3"])
def test_create_api_key_refuses_a_non_positive_expiry(tenant, days):
    from accounts.models import ApiKey

    with pytest.raises(CommandError, match="positive number of days"):
        call_command("create_api_key", tenant.slug, "--expires-in-days", days)
    assert ApiKey.objects.count() == 0


def test_create_api_key_with_an_expiry_sets_it(tenant, capsys):
    from accounts.models import ApiKey

    call_command("create_api_key", tenant.slug, "--expires-in-days", "2")
    assert ApiKey.objects.get().expires_at is not None
