"""Issue 10, item 1: a query is a conversation with 0..MAX_IMAGES_PER_REQUEST images on every
endpoint, stored as ``Query.messages`` and one ``QueryImage`` row per image (in order, with its
SHA-256, size and format), shown whole by the admin and the dashboard.

In-process requests on the embedded worker thread against the real PostgreSQL and Redis, and the
websocket against the session's live stack. The tiny model's answers are noise: the tests check
outcomes, rows, errors and token counts, never the text.

What depends on the engine: until the engine takes every image (the lead's EngineRequest), the
runner hands it the first image for every image part. The assertions below hold either way: the
stored rows are the web tier's; the prompt-token growth per image holds when the images have the
same size (each image part becomes that many image tokens whichever picture fills it).
"""

import base64
import csv
import hashlib
import io
import json
import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from accounts import services as accounts
from accounts.models import Membership
from config.errors import ApiError
from inference import imagestore
from inference import services as inference_services
from inference.models import Query, QueryImage
from inference.selectors import conversation_of
from tests import media

pytestmark = pytest.mark.django_db(transaction=True)

GLM, QUERIES, CHAT = "/v1/glm/infer", "/v1/queries", "/v1/chat/completions"


def _pictures() -> list[tuple[bytes, str]]:
    """Three different pictures of the same size in three formats: (bytes, format)."""
    return [
        (media.encode(media.image(40, 30, seed=1), "PNG"), "PNG"),
        (media.encode(media.image(40, 30, seed=2), "JPEG"), "JPEG"),
        (media.encode(media.image(40, 30, seed=3), "WEBP", lossless=True), "WEBP"),
    ]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + _b64(data)


def _image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": _data_uri(data)}}


def _assert_images(query: Query, pictures: list[tuple[bytes, str]]) -> None:
    """One row per image, in the order sent, with what was sent, and the content the model saw."""
    rows = list(QueryImage.objects.filter(query=query).order_by("position"))
    assert [row.position for row in rows] == list(range(len(pictures)))
    for row, (data, fmt) in zip(rows, pictures, strict=True):
        assert row.sha256 == hashlib.sha256(data).hexdigest()
        assert (row.format, row.size_bytes, row.width, row.height) == (fmt, len(data), 40, 30)
        assert imagestore.read(row.key)[:8] == b"\x89PNG\r\n\x1a\n"  # in image storage, not in the row
        assert row.content is None and row.stored_bytes == len(imagestore.read(row.key))
    messages, pngs = conversation_of(query)
    assert messages == query.messages
    assert pngs == [imagestore.read(row.key) for row in rows]
    placeholders = [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
    assert len(placeholders) == len(pictures)


def _succeeded(query_id) -> Query:
    query = Query.objects.get(pk=query_id)
    assert query.status == Query.Status.SUCCEEDED, (query.error_code, query.error_message)
    assert query.prompt_tokens > 0 and query.completion_tokens > 0
    return query


def _usage(client) -> tuple[int, int]:
    quotas = client.get("/v1/usage").json()["key"]["quotas"]
    return quotas["requests_per_minute"]["used"], quotas["tokens_per_month"]["used"]


def _error(response) -> tuple[str, str, str | None]:
    body = response.json()
    if "error" in body:
        return body["error"]["code"], body["error"]["message"], body["error"]["param"]
    return body["code"], body["msg"], None


# --- /v1/glm/infer: several image fields, or none --------------------------------------------
def test_glm_infer_multipart_with_three_image_parts(authed_client):
    pictures = _pictures()
    uploads = [SimpleUploadedFile(f"p{k}", data) for k, (data, _) in enumerate(pictures)]
    response = authed_client.post(
        GLM, {"image": uploads, "prompt": "Compare them.", "max_tokens": "3"}, format="multipart"
    )
    assert response.status_code == 200, response.content
    query = _succeeded(response.json()["query_id"])
    _assert_images(query, pictures)
    assert query.messages == [
        {"role": "user", "content": [{"type": "image"}] * 3 + [{"type": "text", "text": "Compare them."}]}
    ]
    assert query.prompt == "Compare them." and query.endpoint == Query.Endpoint.GLM_INFER


def test_glm_infer_json_image_list_and_text_only(authed_client):
    pictures = _pictures()[:2]
    body = {"image": [_b64(pictures[0][0]), "data:image/jpeg;base64," + _b64(pictures[1][0])], "prompt": "Which?"}
    response = authed_client.post(GLM, {**body, "max_tokens": 3}, format="json")
    assert response.status_code == 200, response.content
    _assert_images(_succeeded(response.json()["query_id"]), pictures)

    for text_only in ({"prompt": "Say hello."}, {"prompt": "Say hello.", "image": []}, {"prompt": "Hi", "image": None}):
        response = authed_client.post(GLM, {**text_only, "max_tokens": 3}, format="json")
        assert response.status_code == 200, response.content
        query = _succeeded(response.json()["query_id"])
        assert not query.images.exists()
        assert query.messages == [{"role": "user", "content": [{"type": "text", "text": text_only["prompt"]}]}]
    upload = authed_client.post(GLM, {"prompt": "Say hello.", "max_tokens": "3"}, format="multipart")
    assert upload.status_code == 200, upload.content
    assert not _succeeded(upload.json()["query_id"]).images.exists()


def test_each_image_adds_prompt_tokens(authed_client):
    """Same-size images: every image part adds the same number of prompt tokens (the model sees
    each one), so 0, 1 and 3 images give a straight line."""
    pictures = [_b64(media.encode(media.image(112, 84, seed=k), "PNG")) for k in range(3)]

    def prompt_tokens(images: list[str]) -> int:
        response = authed_client.post(GLM, {"image": images, "prompt": "Describe.", "max_tokens": 1}, format="json")
        assert response.status_code == 200, response.content
        return response.json()["usage"]["prompt_tokens"]

    none, one, three = prompt_tokens([]), prompt_tokens(pictures[:1]), prompt_tokens(pictures)
    per_image = one - none
    assert per_image >= 12  # 112x84 pixels: 4x3 image tokens of 28x28 at least, and the markers
    assert three - none == 3 * per_image


def test_nine_images_are_refused_naming_the_limit_before_admission(authed_client, settings):
    before = _usage(authed_client)
    nine = [_b64(media.png(8, 8))] * 9
    response = authed_client.post(GLM, {"image": nine, "prompt": "Too many?"}, format="json")
    assert response.status_code == 400, response.content
    code, message, _ = _error(response)
    assert code == "invalid_request" and "9 images" in message and "limit is 8" in message
    uploads = [SimpleUploadedFile(f"p{k}.png", media.png(8, 8)) for k in range(9)]
    response = authed_client.post(GLM, {"image": uploads, "prompt": "Too many?"}, format="multipart")
    assert response.status_code == 400 and "limit is 8" in _error(response)[1]
    settings.MAX_IMAGES_PER_REQUEST = 2  # the setting is the limit
    response = authed_client.post(GLM, {"image": nine[:3], "prompt": "Three?"}, format="json")
    assert response.status_code == 400 and "3 images; the limit is 2" in _error(response)[1]
    assert Query.objects.count() == 0 and _usage(authed_client) == before


def test_a_bad_second_image_is_named(authed_client):
    body = {"image": [_b64(media.png(8, 8)), _b64(b"not a picture at all, just text")], "prompt": "x"}
    response = authed_client.post(GLM, body, format="json")
    assert response.status_code == 400, response.content
    code, message, _ = _error(response)
    assert code == "invalid_image" and "'image[1]'" in message
    assert Query.objects.count() == 0


# --- /v1/chat/completions: any conversation ---------------------------------------------------
def _tool_conversation(pictures) -> list:
    """System, developer, a user turn with an image before and after its text, an assistant turn
    calling a tool (content null), the tool's result, and a user turn with a third image."""
    call = {"id": "call_1", "type": "function", "function": {"name": "zoom", "arguments": '{"factor": 2}'}}
    return [
        {"role": "system", "content": "You compare pictures."},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                _image_part(pictures[0][0]),
                {"type": "text", "text": "This one,"},
                _image_part(pictures[1][0]),
                {"type": "text", "text": " and this one."},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "Zoom first."},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "zoomed"}]},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}, _image_part(pictures[2][0])]},
    ]


def test_chat_conversation_with_tools_and_three_images(authed_client):
    pictures = _pictures()
    body = {"model": "glm-4.6v-flash", "max_tokens": 3, "messages": _tool_conversation(pictures)}
    response = authed_client.post(CHAT, body, format="json")
    assert response.status_code == 200, response.content
    query = _succeeded(response.json()["id"].removeprefix("chatcmpl-"))
    _assert_images(query, pictures)
    assert "messages" not in query.params
    assert query.prompt == "And now?"
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    assert query.messages == [
        {"role": "system", "content": [text("You compare pictures.")]},
        {"role": "system", "content": [text("Be brief.")]},
        {"role": "user", "content": [{"type": "image"}, text("This one,"), {"type": "image"}, text(" and this one.")]},
        {
            "role": "assistant",
            "content": [],
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "zoom", "arguments": '{"factor": 2}'}}
            ],
            "reasoning_content": "Zoom first.",
        },
        {"role": "tool", "content": "zoomed", "tool_call_id": "call_1"},
        {"role": "user", "content": [text("And now?"), {"type": "image"}]},
    ]


def test_chat_text_only_succeeds(authed_client):
    body = {"model": "glm-4.6v-flash", "max_tokens": 3, "messages": [{"role": "user", "content": "hello"}]}
    response = authed_client.post(CHAT, body, format="json")
    assert response.status_code == 200, response.content
    query = _succeeded(response.json()["id"].removeprefix("chatcmpl-"))
    assert not query.images.exists()
    assert query.messages == [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def _assistant(**fields) -> list:
    return [{"role": "user", "content": "hi"}, {"role": "assistant", **fields}]


BAD_CONVERSATIONS = {
    "tool_calls-object": (_assistant(content=None, tool_calls=CALL), "messages[1].tool_calls"),
    "tool_calls-empty": (_assistant(content=None, tool_calls=[]), "messages[1].tool_calls"),
    "tool_call-string": (_assistant(content=None, tool_calls=["f()"]), "messages[1].tool_calls[0]"),
    "tool_call-no-id": (
        _assistant(content=None, tool_calls=[{**CALL, "id": None}]),
        "messages[1].tool_calls[0].id",
    ),
    "tool_call-type": (
        _assistant(content=None, tool_calls=[{**CALL, "type": "code"}]),
        "messages[1].tool_calls[0].type",
    ),
    "tool_call-no-function": (
        _assistant(content=None, tool_calls=[{"id": "c1", "type": "function"}]),
        "messages[1].tool_calls[0].function",
    ),
    "tool_call-empty-name": (
        _assistant(content=None, tool_calls=[{**CALL, "function": {"name": "", "arguments": "{}"}}]),
        "messages[1].tool_calls[0].function.name",
    ),
    "arguments-object": (
        _assistant(content=None, tool_calls=[{**CALL, "function": {"name": "f", "arguments": {"a": 1}}}]),
        "messages[1].tool_calls[0].function.arguments",
    ),
    "arguments-not-json": (
        _assistant(content=None, tool_calls=[{**CALL, "function": {"name": "f", "arguments": "{a: 1"}}]),
        "messages[1].tool_calls[0].function.arguments",
    ),
    "arguments-json-list": (
        _assistant(content=None, tool_calls=[{**CALL, "function": {"name": "f", "arguments": "[1, 2]"}}]),
        "messages[1].tool_calls[0].function.arguments",
    ),
    "assistant-null-content": (_assistant(content=None), "messages[1].content"),
    "reasoning-number": (_assistant(content="x", reasoning_content=5), "messages[1].reasoning_content"),
    "tool-no-call-id": ([{"role": "tool", "content": "42"}], "messages[0].tool_call_id"),
    "tool-image": (
        [{"role": "tool", "tool_call_id": "c1", "content": [_image_part(media.png(8, 8))]}],
        "messages[0].content",
    ),
    "assistant-image": (_assistant(content=[_image_part(media.png(8, 8))]), "messages[1]"),
    "function-role": ([{"role": "function", "name": "f", "content": "x"}], "messages[0].role"),
    "audio-part": ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0]"),
    "nine-images": ([{"role": "user", "content": [_image_part(media.png(8, 8))] * 9}], "messages"),
}


@pytest.mark.parametrize("case", BAD_CONVERSATIONS, ids=list(BAD_CONVERSATIONS))
def test_bad_conversations_are_400_naming_the_param(authed_client, case):
    messages, param = BAD_CONVERSATIONS[case]
    response = authed_client.post(CHAT, {"messages": messages, "max_tokens": 2}, format="json")
    assert response.status_code == 400, response.content
    code, message, got = _error(response)
    assert (code, got) == ("invalid_request", param), message
    assert f"'{param}'" in message or param == "messages[1]"
    assert Query.objects.count() == 0


def test_the_limits_count_tool_arguments_and_results(authed_client, settings):
    """The whole conversation is bounded, tool calls' arguments and tool results included."""
    settings.MAX_PROMPT_CHARS = 1000
    before = _usage(authed_client)
    arguments = json.dumps({"text": "a" * 600})
    long_call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [long_call]},
        {"role": "tool", "tool_call_id": "c1", "content": "b" * 500},
    ]
    response = authed_client.post(CHAT, {"messages": messages, "max_tokens": 2}, format="json")
    assert response.status_code == 400, response.content
    code, message, param = _error(response)
    assert (code, param) == ("invalid_request", "messages") and "the limit is 1,000" in message
    assert Query.objects.count() == 0 and _usage(authed_client) == before


def test_images_are_reserved_against_the_token_quota(settings):
    """Admission reserves IMAGE_TOKEN_BOUND per image: a budget that covers one image's
    reservation refuses three."""
    from accounts import quotas

    one = quotas.reservation("x", 1, images=1)
    three = quotas.reservation("x", 1, images=3)
    assert three - one == 2 * settings.IMAGE_TOKEN_BOUND
    assert quotas.reservation("x", 1, images=0) == one - settings.IMAGE_TOKEN_BOUND


# --- /v1/queries: prompt + images, or messages ------------------------------------------------
def _poll(client, query_id, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"{QUERIES}/{query_id}").json()
        if body["status"] in ("succeeded", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"query {query_id} did not end")


def test_queries_messages_form_and_the_detail_lists_the_images(authed_client):
    pictures = _pictures()
    messages = [
        {"role": "user", "content": [_image_part(data) for data, _ in pictures] + [{"type": "text", "text": "?"}]}
    ]
    response = authed_client.post(QUERIES, {"messages": messages, "max_tokens": 2}, format="json")
    assert response.status_code == 202, response.content
    body = _poll(authed_client, response.json()["id"])
    assert body["status"] == "succeeded", body
    query = _succeeded(body["id"])
    _assert_images(query, pictures)
    assert [image["sha256"] for image in body["images"]] == [hashlib.sha256(d).hexdigest() for d, _ in pictures]
    assert [(i["position"], i["format"], i["bytes"]) for i in body["images"]] == [
        (k, fmt, len(data)) for k, (data, fmt) in enumerate(pictures)
    ]
    assert body["image"] == body["images"][0]  # the one-image field, kept for older clients
    assert body["messages"] == query.messages
    listed = authed_client.get(QUERIES).json()["results"]
    assert listed[0]["id"] == body["id"] and listed[0]["images"] == body["images"]

    text_only = authed_client.post(QUERIES, {"prompt": "Hello?", "max_tokens": 2}, format="json")
    assert text_only.status_code == 202, text_only.content
    body = _poll(authed_client, text_only.json()["id"])
    assert body["status"] == "succeeded" and body["images"] == [] and body["image"] is None


def test_the_query_list_reads_all_images_in_one_query(authed_client, api_key):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def listing() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert authed_client.get(QUERIES).status_code == 200
        return len(captured)

    pictures = [d for d, _ in _pictures()]
    data = inference_services.check_input(prompt="x", images=pictures)
    inference_services.accept(api_key[0], data, endpoint=Query.Endpoint.QUERIES)
    listing()  # the first request of a key may write its last-used time
    one = listing()
    for _ in range(4):
        inference_services.accept(api_key[0], data, endpoint=Query.Endpoint.QUERIES)
    assert listing() == one
    results = authed_client.get(QUERIES).json()["results"]
    assert [len(result["images"]) for result in results] == [3] * 5


@pytest.mark.parametrize(
    "body, fmt, param",
    [
        ({"messages": [{"role": "user", "content": "x"}], "prompt": "y"}, "json", "prompt"),
        ({"messages": [{"role": "user", "content": "x"}], "image": _b64(media.png(8, 8))}, "json", "image"),
        ({"messages": "[]", "prompt": "y"}, "multipart", "messages"),
        ({"messages": []}, "json", "messages"),
    ],
    ids=["messages-and-prompt", "messages-and-image", "messages-in-a-form", "empty-messages"],
)
def test_queries_refuses_mixed_or_bad_forms(authed_client, body, fmt, param):
    response = authed_client.post(QUERIES, body, format=fmt)
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid_request" and f"'{param}'" in response.json()["msg"]
    assert Query.objects.count() == 0


def test_glm_infer_does_not_take_messages(authed_client):
    response = authed_client.post(GLM, {"messages": [{"role": "user", "content": "x"}]}, format="json")
    assert response.status_code == 400 and response.json()["code"] == "unsupported_parameter"


# --- the websocket: prompt + images, or messages ----------------------------------------------
def test_websocket_infer_with_an_image_list_and_with_messages(live_stack, api_key):
    import asyncio

    import websockets

    pictures = _pictures()[:2]
    frames = [
        {"type": "infer", "prompt": "Which?", "image": [_b64(data) for data, _ in pictures], "max_tokens": 2},
        {
            "type": "infer",
            "messages": [
                {"role": "system", "content": "Short answers."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Which?"}] + [_image_part(d) for d, _ in pictures],
                },
            ],
            "max_tokens": 2,
        },
        {"type": "infer", "prompt": "Hello?", "max_tokens": 2},
        {"type": "infer", "prompt": "Too many?", "image": [_b64(media.png(8, 8))] * 9},
    ]

    async def run() -> list[dict]:
        ends = []
        async with websockets.connect(
            live_stack.ws_url + "/ws/v1/infer", additional_headers={"X-API-Key": api_key[1]}, max_size=None
        ) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "ready"
            for frame in frames:
                await ws.send(json.dumps(frame))
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 120))
                    if message["type"] in ("done", "error"):
                        ends.append(message)
                        break
        return ends

    listed, conversation, text_only, refused = asyncio.run(run())
    for done in (listed, conversation, text_only):
        assert done["type"] == "done", done
    _assert_images(_succeeded(listed["query_id"]), pictures)
    query = _succeeded(conversation["query_id"])
    _assert_images(query, pictures)
    assert query.messages[0] == {"role": "system", "content": [{"type": "text", "text": "Short answers."}]}
    assert not _succeeded(text_only["query_id"]).images.exists()
    assert refused["code"] == "invalid_request" and "limit is 8" in refused["message"], refused
    assert Query.objects.filter(endpoint=Query.Endpoint.WEBSOCKET).count() == 3


# --- the services' signatures -----------------------------------------------------------------
def test_check_input_takes_messages_or_a_prompt_with_images():
    pictures = _pictures()
    data = inference_services.check_input(prompt="Which?", images=[d for d, _ in pictures[:2]], max_tokens=3)
    assert [image.format for image in data.images] == ["PNG", "JPEG"]
    assert data.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}]}
    ]
    assert inference_services.check_input(prompt="Hi").images == []
    with pytest.raises(ApiError) as info:
        inference_services.check_input(
            messages=[{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image"}]}],
            images=[b"nope"],
        )
    assert info.value.code == "invalid_image" and info.value.param == "messages[0].content[1]"


# --- the admin and the dashboard show every image ---------------------------------------------
@pytest.fixture
def three_image_query(tenant, api_key):
    pictures = _pictures()
    data = inference_services.check_input(prompt="Compare.", images=[d for d, _ in pictures])
    query = inference_services.accept(api_key[0], data, endpoint=Query.Endpoint.QUERIES)
    return query, pictures


def _body(response) -> bytes:
    """A response's body, streamed (an image from storage) or not."""
    return b"".join(response.streaming_content) if response.streaming else response.content


def _figures(page: str) -> list[tuple[str, str]]:
    import re

    return re.findall(r'class="query-image" data-position="(\d+)"(?: data-sha256="([0-9a-f]{64})")?', page)


def test_dashboard_shows_every_image_to_members_only(three_image_query, tenant):
    query, pictures = three_image_query
    digests = [hashlib.sha256(d).hexdigest() for d, _ in pictures]
    owner = accounts.create_user("conv-owner", password="pw-12345678")
    member = accounts.create_user("conv-member", password="pw-12345678")
    outsider = accounts.create_user("conv-outsider", password="pw-12345678")
    accounts.add_member(tenant, owner, Membership.Role.OWNER)
    accounts.add_member(tenant, member, Membership.Role.MEMBER)
    accounts.add_member(accounts.create_tenant("Other", slug="other"), outsider, Membership.Role.OWNER)
    for user in (owner, member):
        client = Client()
        client.force_login(user)
        page = client.get(f"/dashboard/queries/{query.pk}/").content.decode()
        assert _figures(page) == [(str(k), digests[k]) for k in range(3)]
        for (data, fmt), digest in zip(pictures, digests, strict=True):
            assert digest in page and f"{fmt} 40×30 · {len(data)} bytes" in page
        for position in range(3):
            image = client.get(f"/dashboard/queries/{query.pk}/image/{position}")
            assert image.status_code == 200 and image["Content-Type"] == "image/png"
            assert _body(image) == imagestore.read(QueryImage.objects.get(query=query, position=position).key)
        assert client.get(f"/dashboard/queries/{query.pk}/image/3").status_code == 404
        first = client.get(f"/dashboard/queries/{query.pk}/image.png")  # the one-image URL: the first
        assert _body(first) == _body(client.get(f"/dashboard/queries/{query.pk}/image/0"))
    client = Client()
    client.force_login(outsider)
    assert client.get(f"/dashboard/queries/{query.pk}/").status_code == 404
    for url in ("image.png", "image/0", "image/2"):
        assert client.get(f"/dashboard/queries/{query.pk}/{url}").status_code == 404


def test_a_text_only_query_says_so_on_its_pages(tenant, api_key):
    owner = accounts.create_user("conv-owner", password="pw-12345678")
    accounts.add_member(tenant, owner, Membership.Role.OWNER)
    data = inference_services.check_input(prompt="No picture.")
    query = inference_services.accept(api_key[0], data, endpoint=Query.Endpoint.QUERIES)
    client = Client()
    client.force_login(owner)
    page = client.get(f"/dashboard/queries/{query.pk}/").content.decode()
    assert "a text-only query" in page and _figures(page) == []
    assert client.get(f"/dashboard/queries/{query.pk}/image.png").status_code == 404


def test_admin_shows_every_image_and_exports_their_digests(three_image_query):
    query, pictures = three_image_query
    digests = [hashlib.sha256(d).hexdigest() for d, _ in pictures]
    staff = accounts.create_user("conv-staff", password="pw-12345678")
    staff.is_staff = staff.is_superuser = True
    staff.save()
    client = Client()
    client.force_login(staff)
    page = client.get(f"/admin/inference/query/{query.pk}/change/").content.decode()
    assert [position for position, _ in _figures(page)] == ["0", "1", "2"]
    for position, ((data, fmt), digest) in enumerate(zip(pictures, digests, strict=True)):
        assert f"/admin/queries/{query.pk}/image/{position}" in page
        assert digest in page and f"{fmt} 40×30 · {len(data)} bytes" in page
        image = client.get(f"/admin/queries/{query.pk}/image/{position}")
        assert image.status_code == 200 and image["Content-Type"] == "image/png"
    assert client.get(f"/admin/queries/{query.pk}/image/3").status_code == 404
    exported = client.post("/admin/inference/query/", {"action": "export_csv", "_selected_action": [query.pk]})
    rows = list(csv.DictReader(io.StringIO(b"".join(exported.streaming_content).decode())))
    assert rows[0]["images"] == "3" and rows[0]["image_sha256"] == " ".join(digests)


# --- the migration keeps what was stored --------------------------------------------------------
def test_the_migration_moves_conversations_and_images(tenant, api_key):
    """Rows written before conversations (0006: params["messages"], one-to-one image, image_*
    columns) come out as Query.messages and QueryImage rows of position 0 — on PostgreSQL (single
    statements) and through the batches other databases use."""
    import importlib
    import uuid

    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    data_migration = importlib.import_module("inference.migrations.0008_conversations_data")
    old = [("inference", "0006_query_request_id")]
    png = media.png(20, 10)
    executor = MigrationExecutor(connection)
    # Back to the newest migration, whatever it is: a fixed name here once left the schema behind
    # a later migration and broke every test after this one.
    latest = executor.loader.graph.leaf_nodes("inference")
    executor.migrate(old)
    try:
        apps = executor.loader.project_state(old).apps
        OldQuery, OldImage = apps.get_model("inference", "Query"), apps.get_model("inference", "QueryImage")
        chat_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
        common = {
            "tenant_id": tenant.pk,
            "api_key_id": api_key[0].pk,
            "model": "glm-4.6v-flash",
            "image_sha256": "a" * 64,
            "image_format": "JPEG",
            "image_width": 640,
            "image_height": 480,
            "image_bytes": 12345,
        }
        chat_id, glm_id = uuid.uuid4(), uuid.uuid4()
        OldQuery.objects.create(
            id=chat_id,
            endpoint="chat_completions",
            prompt="hi",
            params={"top_p": 1.0, "messages": chat_messages},
            **common,
        )
        OldQuery.objects.create(id=glm_id, endpoint="glm_infer", prompt="What is it?", params={"top_p": 1.0}, **common)
        for query_id in (chat_id, glm_id):
            OldImage.objects.create(query_id=query_id, content=png, width=448, height=336)
        executor = MigrationExecutor(connection)
        executor.migrate(latest)
    finally:
        MigrationExecutor(connection).migrate(latest)

    chat, glm = Query.objects.get(pk=chat_id), Query.objects.get(pk=glm_id)
    assert chat.messages == chat_messages and chat.params == {"top_p": 1.0}
    assert glm.messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    for query in (chat, glm):
        image = query.images.get()
        assert (image.position, image.sha256, image.format, image.size_bytes) == (0, "a" * 64, "JPEG", 12345)
        # 0012 moved the PNG out of the row into image storage, under the tenant's content address.
        assert (image.width, image.height, image.content) == (640, 480, None)
        assert image.key == imagestore.key_for(tenant.pk, png) and imagestore.read(image.key) == png
        assert (image.stored_bytes, query.stored_images) == (len(png), 1)

    # The batch path (SQLite, the embedded default), on 0007's models.
    executor = MigrationExecutor(connection)
    try:
        executor.migrate([("inference", "0007_conversations")])
        apps = executor.loader.project_state([("inference", "0007_conversations")]).apps
        Mid = apps.get_model("inference", "Query")
        Mid.objects.filter(pk=chat_id).update(messages=[], params={"messages": chat_messages})
        Mid.objects.filter(pk=glm_id).update(messages=[])
        data_migration.move_messages_in_batches(Mid)
        assert Mid.objects.get(pk=chat_id).messages == chat_messages
        assert Mid.objects.get(pk=chat_id).params == {}
        assert Mid.objects.get(pk=glm_id).messages[0]["content"][1] == {"type": "text", "text": "What is it?"}
    finally:
        MigrationExecutor(connection).migrate(latest)
