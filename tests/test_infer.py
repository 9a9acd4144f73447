"""POST /v1/glm/infer end to end on the embedded worker thread, against the real database.

The tiny model's answers are random noise: these tests check the shape of the answer, the row
written for it and the error codes, never the answer's content."""

import base64
import hashlib

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from inference import imagestore
from inference.dispatch import get_dispatcher
from inference.models import Query
from tests import media

# The worker thread has its own database connection, so rows must really be committed.
pytestmark = pytest.mark.django_db(transaction=True)

URL = "/v1/glm/infer"


def _assert_succeeded_row(body: dict) -> Query:
    assert body["code"] == 0
    assert isinstance(body["result"], str) and body["result"]
    assert body["cost_time"] > 0
    query = Query.objects.get(pk=body["query_id"])
    assert query.status == Query.Status.SUCCEEDED, (query.error_code, query.error_message)
    assert query.answer == body["result"]
    assert query.prompt_tokens > 0 and query.completion_tokens > 0
    assert body["usage"] == {
        "prompt_tokens": query.prompt_tokens,
        "completion_tokens": query.completion_tokens,
        "total_tokens": query.prompt_tokens + query.completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": 0},  # thinking is off by default here
    }
    assert body["reasoning"] == query.reasoning == ""
    assert query.created_at <= query.started_at <= query.first_token_at <= query.finished_at
    assert query.error_code == ""
    return query


def test_multipart_request_succeeds_and_writes_one_row(authed_client, api_key, png_bytes):
    upload = SimpleUploadedFile("photo.png", png_bytes, content_type="image/png")
    response = authed_client.post(
        URL, {"image": upload, "prompt": "What is in this picture?", "max_tokens": "12"}, format="multipart"
    )
    assert response.status_code == 200, response.content
    query = _assert_succeeded_row(response.json())
    assert Query.objects.count() == 1
    assert query.completion_tokens == 12  # the tiny model never stops by itself
    assert query.finish_reason == "length"
    assert query.endpoint == Query.Endpoint.GLM_INFER
    assert query.api_key_id == api_key[0].pk and query.tenant_id == api_key[0].tenant_id
    image = query.images.get()
    assert (image.position, image.width, image.height, image.format) == (0, 64, 48, "PNG")
    assert image.size_bytes == len(png_bytes) and image.sha256 == hashlib.sha256(png_bytes).hexdigest()
    assert query.params == {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "enable_thinking": False}
    assert query.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}
    ]
    assert imagestore.read(image.key)[:8] == b"\x89PNG\r\n\x1a\n"  # in image storage; the row holds the key
    assert image.content is None and image.key == imagestore.key_for(query.tenant_id, imagestore.read(image.key))


@pytest.mark.parametrize("as_data_uri", [False, True], ids=["base64", "data-uri"])
def test_json_request_succeeds(authed_client, as_data_uri):
    jpeg = media.encode(media.image(80, 60), "JPEG")
    encoded = base64.b64encode(jpeg).decode()
    if as_data_uri:
        encoded = "data:image/jpeg;base64," + encoded
    response = authed_client.post(URL, {"image": encoded, "prompt": "Describe it.", "max_tokens": 8}, format="json")
    assert response.status_code == 200, response.content
    query = _assert_succeeded_row(response.json())
    assert query.images.get().format == "JPEG"
    assert Query.objects.count() == 1


def test_sampling_parameters_are_used(authed_client, png_bytes):
    """Their effect, not only their storage: greedy decoding (temperature 0) is deterministic,
    sampling (temperature > 0) is not, and sampling from a tiny top_p keeps only the likeliest
    token, which is greedy decoding again. The engine takes no seed, so "sampling differs" is
    checked over several runs (48 tokens of a random model's vocabulary: equal by chance never)."""
    encoded = base64.b64encode(png_bytes).decode()

    def answer(**params) -> str:
        body = {"image": encoded, "prompt": "Describe it.", "max_tokens": 48, **params}
        response = authed_client.post(URL, body, format="json")
        assert response.status_code == 200, response.content
        query = Query.objects.get(pk=response.json()["query_id"])
        assert query.params == {"max_tokens": 48, "temperature": 0.0, "top_p": 1.0, "enable_thinking": False, **params}
        assert query.completion_tokens == 48
        return response.json()["result"]

    greedy = answer()
    assert answer() == greedy
    sampled = [answer(temperature=1.0) for _ in range(3)]
    assert any(text != greedy for text in sampled), sampled
    assert answer(temperature=1.0, top_p=1e-6) == greedy


def _multipart(client, content: bytes, name: str, prompt: str = "What is this?"):
    upload = SimpleUploadedFile(name, content, content_type="image/jpeg")
    return client.post(URL, {"image": upload, "prompt": prompt}, format="multipart")


BAD_IMAGES = {
    "text-renamed-jpg": (
        lambda: b"This is a plain text file, not a picture.\n" * 20,
        "notes.jpg",
        400,
        "invalid_image",
    ),
    "truncated-png": (lambda: media.png(96, 96)[:9000], "cut.png", 400, "invalid_image"),
    "12-MB-file": (lambda: b"\xff\xd8\xff\xe0" + bytes(12 * 1024 * 1024), "huge.jpg", 413, "image_too_large"),
    "20000x20000-png-bomb": (media.png_bomb, "bomb.png", 413, "image_too_large"),
}


@pytest.mark.parametrize("case", BAD_IMAGES, ids=list(BAD_IMAGES))
def test_bad_images_are_refused_before_the_engine(authed_client, case):
    make, name, status, code = BAD_IMAGES[case]
    submitted_before = get_dispatcher().status()["queue_depth"]
    response = _multipart(authed_client, make(), name)
    assert response.status_code == status, response.content
    body = response.json()
    assert body["code"] == code
    assert len(body["msg"]) > 20  # says what is wrong
    assert "query_id" not in body
    # Refused before any row was written or anything reached the worker.
    assert Query.objects.count() == 0
    assert get_dispatcher().status()["queue_depth"] == submitted_before


def test_bomb_as_base64_json_is_refused_too(authed_client):
    body = {"image": base64.b64encode(media.png_bomb()).decode(), "prompt": "hi"}
    response = authed_client.post(URL, body, format="json")
    assert response.status_code == 413
    assert response.json()["code"] == "image_too_large"


@pytest.mark.parametrize(
    "prompt, fragment",
    [("", "must not be empty"), ("   \n ", "must not be empty"), ("x" * 8001, "limit is 8,000")],
    ids=["empty", "blank", "oversize"],
)
def test_bad_prompts_are_400(authed_client, png_bytes, prompt, fragment):
    response = _multipart(authed_client, png_bytes, "a.png", prompt=prompt)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"
    assert fragment in response.json()["msg"]
    assert Query.objects.count() == 0


@pytest.mark.parametrize(
    "body, code, fragment",
    [
        ({"prompt": "hi", "image": ["AAAA"] * 9}, "invalid_request", "'image' has 9 images; the limit is 8"),
        ({"prompt": "hi", "image": "not base64 at all!"}, "invalid_image", "'image' is not valid base64"),
        ({"prompt": "hi", "image": "https://example.com/cat.png"}, "invalid_image", "Remote image URLs"),
        ({"image": "AAAA"}, "invalid_request", "'prompt' is required"),
        ({"prompt": "hi", "image": "AAAA", "max_tokens": 0}, "invalid_request", "'max_tokens' must be between 1"),
        ({"prompt": "hi", "image": "AAAA", "max_tokens": 100000}, "invalid_request", "'max_tokens' must be between"),
        ({"prompt": "hi", "image": "AAAA", "temperature": 2.5}, "invalid_request", "'temperature' must be between"),
        ({"prompt": "hi", "image": "AAAA", "top_p": "abc"}, "invalid_request", "'top_p' must be a number"),
    ],
    ids=["nine-images", "bad-base64", "remote-url", "no-prompt", "max-tokens-0", "max-tokens-big", "temp", "top-p"],
)
def test_bad_json_fields_say_which_field(authed_client, body, code, fragment):
    response = authed_client.post(URL, body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["code"] == code
    assert fragment in response.json()["msg"]
    assert Query.objects.count() == 0


def test_unparseable_json_is_invalid_request(authed_client):
    response = authed_client.generic("POST", URL, "{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"


def test_model_that_fails_to_load_gives_503_and_a_failed_row(authed_client, png_bytes, tmp_path, settings):
    """A worker without a model answers model_unavailable; the accepted query still ends failed."""
    from inference import dispatch
    from inference.dispatch import ThreadDispatcher

    broken = ThreadDispatcher(model_id=str(tmp_path / "no-such-model"))
    saved, dispatch._dispatchers["embedded"] = dispatch._dispatchers.get("embedded"), broken
    try:
        response = _multipart(authed_client, png_bytes, "a.png")
    finally:
        dispatch._dispatchers["embedded"] = saved
    assert response.status_code == 503
    body = response.json()
    assert body["code"] == "model_unavailable"
    assert str(tmp_path / "no-such-model") in body["msg"]
    query = Query.objects.get(pk=body["query_id"])
    assert query.status == Query.Status.FAILED and query.error_code == "model_unavailable"


def test_sync_timeout_gives_504_with_query_id_and_the_query_goes_on(authed_client, png_bytes, settings):
    import time

    settings.SYNC_TIMEOUT = 0.001
    response = _multipart(authed_client, png_bytes, "a.png")
    assert response.status_code == 504
    body = response.json()
    assert body["code"] == "timeout" and body["query_id"]
    for _ in range(300):  # bounded wait for the query to finish (and be settled) on its own
        query = Query.objects.get(pk=body["query_id"])
        if query.settled_at is not None:
            break
        time.sleep(0.1)
    assert query.status == Query.Status.SUCCEEDED, (query.error_code, query.error_message)
    assert query.answer
