"""Issue 14: images in object storage, privacy modes, retention, export and deletion.

Images go through Django's storage API: files (the embedded default) or an S3-compatible bucket.
The S3 API is a cloud boundary these tests cannot reach, so they start moto's S3-compatible HTTP
server (``moto_server``, a real process speaking the S3 protocol on a local port) and point
django-storages and boto3 at it; a web process and a Celery worker started as real processes read
and write the same bucket. Everything else is real: PostgreSQL, Redis, the embedded worker thread
running the tiny model (its answers are noise: the tests check what is stored, never the text).
"""

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from accounts import services as accounts
from accounts.models import Membership, PrivacyMode, Tenant
from inference import imagestore, privacy
from inference.models import Query, QueryImage, UsageDaily
from tests import media
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.django_db(transaction=True)

GLM = "/v1/glm/infer"
BUCKET = "sightline-test-images"


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def _owner(tenant, name=None) -> Client:
    user = accounts.create_user(name or f"owner-{tenant.slug}", password="pw-12345678")
    accounts.add_member(tenant, user, Membership.Role.OWNER)
    client = Client()
    client.force_login(user)
    return client


def _staff() -> Client:
    user = accounts.create_user(f"staff-{uuid.uuid4().hex[:6]}", password="pw-12345678")
    user.is_staff = user.is_superuser = True
    user.save()
    client = Client()
    client.force_login(user)
    return client


def _ask(api_client, plaintext, images=(), prompt="What is it?") -> dict:
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    response = api_client.post(
        GLM, {"image": [_b64(i) for i in images], "prompt": prompt, "max_tokens": 3}, format="json"
    )
    assert response.status_code == 200, response.content
    return response.json()


def _files(folder) -> list[str]:
    """The objects of a filesystem store (no temporary files left behind)."""
    return sorted(
        os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
    )


@pytest.fixture
def fs_store(tmp_path, settings):
    """The embedded default's store: files under a folder (this test's own)."""
    folder = tmp_path / "images"
    images = {"BACKEND": "inference.imagestore.ImageFileStorage", "OPTIONS": {"location": str(folder)}}
    settings.STORAGES = {**settings.STORAGES, "images": images}
    return folder


# --- moto_server: the S3 API, as a real HTTP server --------------------------------------------
@pytest.fixture(scope="module")
def moto():
    port = free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint + "/", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start (exit {server.poll()})") from None
                time.sleep(0.2)
        _s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def _s3_client(endpoint):
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    )


def imagestore_read_s3(endpoint, key) -> bytes:
    return _s3_client(endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _s3_keys(endpoint, prefix) -> list[str]:
    listed = _s3_client(endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []))


S3_ENV = {
    "IMAGE_S3_BUCKET": BUCKET,
    "IMAGE_S3_ACCESS_KEY_ID": "test",
    "IMAGE_S3_SECRET_ACCESS_KEY": "test",
    "IMAGE_S3_REGION": "us-east-1",
}


@pytest.fixture
def s3_store(moto, settings):
    """An S3-compatible bucket (moto_server), under a prefix of this test's own."""
    prefix = f"run-{uuid.uuid4().hex[:8]}/images"
    settings.STORAGES = {
        **settings.STORAGES,
        "images": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": BUCKET,
                "location": prefix,
                "endpoint_url": moto,
                "access_key": "test",
                "secret_key": "test",
                "region_name": "us-east-1",
                "file_overwrite": True,
                "default_acl": None,
                "querystring_expire": 60,
                "signature_version": "s3v4",
            },
        },
    }
    settings.IMAGE_S3_SERVE = "redirect"
    return moto, prefix


# --- the filesystem store ------------------------------------------------------------------------
def test_the_filesystem_store_keeps_one_object_per_image_and_tenant(fs_store, api_client):
    tenant_a, tenant_b = accounts.create_tenant("A", slug="a"), accounts.create_tenant("B", slug="b")
    key_a, key_b = accounts.create_api_key(tenant_a, "a")[1], accounts.create_api_key(tenant_b, "b")[1]
    picture, other = media.png(40, 30), media.encode(media.image(40, 30, seed=7), "JPEG")

    first = _ask(api_client, key_a, [picture, other, picture])  # the same image twice in one query
    second = _ask(api_client, key_a, [picture])  # and again in another
    _ask(api_client, key_b, [picture])  # another tenant's copy is its own

    rows = list(QueryImage.objects.filter(query_id=first["query_id"]).order_by("position"))
    assert rows[0].key == rows[2].key != rows[1].key
    assert QueryImage.objects.get(query_id=second["query_id"]).key == rows[0].key
    assert rows[0].key.startswith(f"t{tenant_a.pk}/") and rows[0].content is None
    assert _files(fs_store) == sorted(
        {row.key for row in QueryImage.objects.all()}
    )  # one file per (tenant, image): 2 for A, 1 for B
    assert len(_files(fs_store)) == 3
    # The worker read them from the store: every query ran and saw its images.
    assert set(Query.objects.values_list("status", flat=True)) == {Query.Status.SUCCEEDED}
    assert Query.objects.get(pk=first["query_id"]).stored_images == 3


# --- S3 (moto_server) ---------------------------------------------------------------------------
def test_s3_store_end_to_end(s3_store, api_client, settings):
    endpoint, prefix = s3_store
    tenant = accounts.create_tenant("S3 tenant", slug="s3")
    plaintext = accounts.create_api_key(tenant, "k")[1]
    picture = media.png(48, 32)
    answer = _ask(api_client, plaintext, [picture, picture])
    query = Query.objects.get(pk=answer["query_id"])
    assert query.status == Query.Status.SUCCEEDED  # the worker read the PNG back from the bucket
    (key,) = {image.key for image in query.images.all()}
    assert _s3_keys(endpoint, prefix) == [f"{prefix}/{key}"]  # the same image twice: one object
    stored = imagestore.read(key)
    assert stored.startswith(b"\x89PNG") and hashlib.sha256(stored).hexdigest() in key

    owner = _owner(tenant)
    for url in (f"/dashboard/queries/{query.pk}/image.png", f"/dashboard/queries/{query.pk}/image/1"):
        redirect = owner.get(url)
        assert redirect.status_code == 302 and redirect["Cache-Control"] == "no-store"
        signed = redirect["Location"]
        assert signed.startswith(f"{endpoint}/{BUCKET}/{prefix}/{key}?") and "X-Amz-Signature=" in signed
        assert "X-Amz-Expires=60" in signed
        assert urllib.request.urlopen(signed, timeout=10).read() == stored
    admin = _staff().get(f"/admin/queries/{query.pk}/image/0")
    assert admin.status_code == 302 and urllib.request.urlopen(admin["Location"], timeout=10).read() == stored

    settings.IMAGE_S3_SERVE = "stream"  # a bucket browsers cannot reach: the web streams it
    streamed = owner.get(f"/dashboard/queries/{query.pk}/image/0")
    assert streamed.status_code == 200 and _body(streamed) == stored

    outsider = _owner(accounts.create_tenant("Other", slug="other"))
    for url in ("image.png", "image/0", "image/1", ""):
        response = outsider.get(f"/dashboard/queries/{query.pk}/{url}")
        assert response.status_code == 404 and "Location" not in response  # no signed URL handed out

    # Deleting the query deletes the object.
    call_command("delete_queries", "--tenant", "s3", "--yes", stdout=io.StringIO())
    assert _s3_keys(endpoint, prefix) == []


def test_s3_store_with_a_web_process_and_a_celery_worker(moto, tmp_path, django_db_setup):
    """The production shape: the web process writes the image to the bucket, a Celery worker (another
    process) reads it from there to run the query. In metadata mode the worker deletes the object
    when the query settles, and its pruner thread removes the held answer once the hold is over."""
    from tests.stack import post_json, running_stack

    prefix = f"stack-{uuid.uuid4().hex[:8]}"
    tenant = accounts.create_tenant("Stack S3", slug="stack-s3")
    plaintext = accounts.create_api_key(tenant, "k")[1]
    private = accounts.create_tenant("Stack private", slug="stack-private", privacy_mode=PrivacyMode.METADATA)
    private_key = accounts.create_api_key(private, "k")[1]
    env = {
        **S3_ENV,
        "IMAGE_S3_ENDPOINT_URL": moto,
        "IMAGE_S3_PREFIX": prefix,
        "IMAGE_STORAGE_DIR": "",
        "PRUNE_INTERVAL_SECONDS": "0.5",
        "METADATA_HOLD_SECONDS": "1",
    }
    body = {"image": _b64(media.png(30, 20)), "prompt": "What?", "max_tokens": 2}
    with running_stack(tmp_path, **env) as stack:
        status, answer = post_json(stack.url + GLM, body, plaintext)
        assert status == 200, (answer, stack.log("w1")[-2000:])
        status, private_answer = post_json(stack.url + GLM, body, private_key)
        assert status == 200, (private_answer, stack.log("w1")[-2000:])
        query = Query.objects.get(pk=answer["query_id"])
        assert query.status == Query.Status.SUCCEEDED and query.worker.startswith("w1-")
        # One object: the metadata tenant's copy went when its query settled.
        assert _s3_keys(moto, prefix) == [f"{prefix}/{query.images.get().key}"]
        held = Query.objects.get(pk=private_answer["query_id"])
        assert held.prompt == "" and held.images.get().key == "" and held.answer == private_answer["result"]
        # The owner's export from the web process (ASGI: streamed page by page), and an image link
        # of it, which the web process answers with a redirect to the bucket (urllib follows it).
        owner = _owner(tenant)
        cookie = f"sessionid={owner.cookies['sessionid'].value}"
        request = urllib.request.Request(stack.url + "/dashboard/data/export.jsonl", headers={"Cookie": cookie})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["Content-Type"] == "application/x-ndjson"
            (line,) = [json.loads(text) for text in response.read().decode().splitlines()]
        assert line["id"] == answer["query_id"] and line["prompt"] == "What?"
        link = urllib.request.Request(line["images"][0]["url"], headers={"Cookie": cookie})
        with urllib.request.urlopen(link, timeout=30) as response:
            assert response.url.startswith(f"{moto}/{BUCKET}/{prefix}/")  # redirected to the signed URL
            assert response.read() == imagestore_read_s3(moto, f"{prefix}/{query.images.get().key}")
        deadline = time.monotonic() + 60
        while Query.objects.get(pk=held.pk).content_removed_at is None:  # the worker's pruner
            assert time.monotonic() < deadline, stack.log("w1")[-2000:]
            time.sleep(0.2)
    assert Query.objects.get(pk=held.pk).answer == ""
    assert Query.objects.get(pk=query.pk).answer == query.answer  # a full-mode answer stays


def test_half_set_s3_settings_fail_at_start():
    cases = [
        ({"IMAGE_S3_BUCKET": "b", "IMAGE_S3_ACCESS_KEY_ID": "x"}, "go together"),
        ({"IMAGE_S3_ENDPOINT_URL": "http://127.0.0.1:9"}, "without IMAGE_S3_BUCKET"),
        ({"IMAGE_S3_BUCKET": "b", "IMAGE_STORAGE_DIR": "/tmp/x"}, "both set"),
        ({"IMAGE_S3_BUCKET": "b", "IMAGE_S3_ENDPOINT_URL": "ftp://x"}, "IMAGE_S3_ENDPOINT_URL"),
        ({"RETENTION_CONTENT_DAYS": "0"}, "RETENTION_CONTENT_DAYS"),
    ]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGE_", "RETENTION_"))}
    for extra, message in cases:
        result = subprocess.run(
            [sys.executable, "-c", "import django; from django.conf import settings; settings.STORAGES"],
            cwd=REPO,
            env={**base, "DJANGO_SETTINGS_MODULE": "config.settings", **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0 and "ImproperlyConfigured" in result.stderr, (extra, result.stderr[-500:])
        assert message in result.stderr, (extra, result.stderr[-500:])


# --- tenants never see each other's images -------------------------------------------------------
def test_another_tenants_image_is_404_through_every_view(fs_store, api_client):
    mine, theirs = accounts.create_tenant("Mine", slug="mine"), accounts.create_tenant("Theirs", slug="theirs")
    their_key = accounts.create_api_key(theirs, "k")[1]
    picture = media.png(24, 24)
    their_query = _ask(api_client, their_key, [picture, picture])["query_id"]
    my_key = accounts.create_api_key(mine, "k")[1]
    _ask(api_client, my_key, [picture])  # the same picture: my own object, under my prefix

    me = _owner(mine)
    for url in ("", "image.png", "image/0", "image/1", "image/2"):
        assert me.get(f"/dashboard/queries/{their_query}/{url}").status_code == 404, url
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {my_key}")
    assert api_client.get(f"/v1/queries/{their_query}").status_code == 404
    assert their_query not in api_client.get("/v1/queries").content.decode()
    exported = _body(me.get("/dashboard/data/export.jsonl")).decode()
    assert their_query not in exported and len(exported.splitlines()) == 1
    # The admin's image view is for staff only.
    assert me.get(f"/admin/queries/{their_query}/image/0").status_code == 302  # to the admin's sign-in
    assert _staff().get(f"/admin/queries/{their_query}/image/0").status_code == 200


# --- privacy modes, end to end through the API -------------------------------------------------
def _set_mode(owner: Client, mode: str, content_days="", image_days="") -> None:
    response = owner.post(
        "/dashboard/data/",
        {"privacy_mode": mode, "content_retention_days": content_days, "image_retention_days": image_days},
    )
    assert response.status_code == 200 and "Saved." in response.content.decode(), response.content.decode()[-800:]


@pytest.mark.parametrize("mode", ["full", "no_images", "metadata"])
def test_privacy_modes_end_to_end(mode, fs_store, api_client):
    tenant = accounts.create_tenant(f"Mode {mode}", slug=f"mode-{mode.replace('_', '-')}")
    api_key, plaintext = accounts.create_api_key(tenant, "k")
    owner = _owner(tenant)
    _set_mode(owner, mode)
    assert Tenant.objects.get(pk=tenant.pk).privacy_mode == mode
    picture = media.png(32, 32)

    answer = _ask(api_client, plaintext, [picture], prompt="A secret question?")
    query = Query.objects.get(pk=answer["query_id"])
    assert query.privacy_mode == mode and query.status == Query.Status.SUCCEEDED and query.settled_at
    image = query.images.get()
    assert (image.sha256, image.size_bytes, image.format) == (hashlib.sha256(picture).hexdigest(), len(picture), "PNG")
    assert query.prompt_tokens > 0 and query.completion_tokens > 0  # tokens and timings always kept
    # The client got its answer whatever the mode.
    assert answer["result"] == query.answer

    if mode == "full":
        assert query.prompt == "A secret question?" and query.messages and image.key and _files(fs_store)
        assert query.client_ip is not None
    if mode == "no_images":
        assert query.prompt == "A secret question?" and query.messages
        assert image.key == "" and _files(fs_store) == [] and query.images_removed_at and query.stored_images == 0
    if mode == "metadata":
        # The conversation and the images went when the query settled; the answer is held for the client.
        assert (query.prompt, query.messages, query.client_ip, query.user_agent) == ("", [], None, "")
        assert image.key == "" and _files(fs_store) == []
        assert query.content_removed_at is None and privacy.answer_held_until(query) is not None

    # What the pages say.
    log = owner.get("/dashboard/queries/").content.decode()
    detail = owner.get(f"/dashboard/queries/{query.pk}/").content.decode()
    polled = api_client.get(f"/v1/queries/{query.pk}").json()
    staff = _staff()
    admin_page = staff.get(f"/admin/inference/query/{query.pk}/change/").content.decode()
    exported = staff.post("/admin/inference/query/", {"action": "export_csv", "_selected_action": [query.pk]})
    (csv_row,) = list(csv.DictReader(io.StringIO(_body(exported).decode())))
    assert csv_row["privacy_mode"] == mode
    line = json.loads(_body(owner.get("/dashboard/data/export.jsonl")).decode())
    image_view = owner.get(f"/dashboard/queries/{query.pk}/image/0")
    if mode == "full":
        assert "A secret question?" in log and 'id="query-image"' in detail and 'id="not-kept"' not in detail
        assert polled["kept"]["not_kept"] == [] and polled["images"][0]["kept"] is True
        assert csv_row["prompt"] == "A secret question?" and csv_row["not_kept"] == ""
        assert line["prompt"] == "A secret question?" and line["images"][0]["url"].endswith(f"{query.pk}/image/0")
        assert image_view.status_code == 200 and _body(image_view) == imagestore.read(image.key)
    else:
        assert image_view.status_code == 404 and 'id="query-image"' not in detail
        assert "The image is not kept (privacy mode: " + mode + ")" in detail
        assert polled["images"][0]["kept"] is False and "images" in polled["kept"]["not_kept"]
        assert line["images"][0] == {**line["images"][0], "kept": False, "url": None}
    if mode == "no_images":
        assert "A secret question?" in log and "A secret question?" in detail
        assert "Privacy mode 'no_images'" in polled["kept"]["note"]
    if mode == "metadata":
        assert "A secret question?" not in log + detail + admin_page
        assert "not kept (privacy mode: metadata)" in log and 'id="not-kept"' in detail
        assert '<div id="answer">' not in detail
        assert "not kept" in admin_page.lower() and 'class="not-kept"' in admin_page
        assert polled["prompt"] == "" and polled["answer"] == query.answer  # held for the client, for now
        assert set(polled["kept"]["not_kept"]) == {"prompt", "messages", "answer", "images"}
        assert "held until" in polled["kept"]["note"]
        assert csv_row["prompt"] == "" and "Privacy mode 'metadata'" in csv_row["not_kept"]
        assert line["prompt"] is None and line["answer"] is None and "metadata" in line["kept"]["note"]
    assert f"Privacy mode &#x27;{mode}&#x27;" in log  # the tenant's policy, on the log's page

    # Pruning: the metadata-mode answer goes once its hold is over, nothing else changes.
    rollup = list(UsageDaily.objects.filter(tenant=tenant).values_list("requests", "prompt_tokens"))
    assert privacy.prune(now=query.finished_at + timedelta(seconds=1))["answers_released"] == 0
    later = query.finished_at + timedelta(seconds=10_000)
    released = privacy.prune(now=later)["answers_released"]
    after = Query.objects.get(pk=query.pk)
    if mode == "metadata":
        assert released == 1 and (after.answer, after.reasoning, after.choices) == ("", "", [])
        assert after.content_removed_at == later and after.params.keys() <= {
            "max_tokens",
            "temperature",
            "top_p",
            "enable_thinking",
        }
        assert api_client.get(f"/v1/queries/{query.pk}").json()["answer"] == ""
    else:
        assert released == 0 and after.answer == query.answer and after.prompt == query.prompt
    assert (after.prompt_tokens, after.completion_tokens) == (query.prompt_tokens, query.completion_tokens)
    assert (
        list(UsageDaily.objects.filter(tenant=tenant).values_list("requests", "prompt_tokens"))
        == rollup
        == [(1, query.prompt_tokens)]
    )


def test_staff_set_the_mode_in_the_admin(fs_store):
    tenant = accounts.create_tenant("Admin set", slug="admin-set")
    page = _staff().get(f"/admin/accounts/tenant/{tenant.pk}/change/").content.decode()
    for field in ("privacy_mode", "content_retention_days", "image_retention_days"):
        assert f'name="{field}"' in page
    members = _owner(tenant, "owner-x").get("/dashboard/data/").content.decode()
    assert 'id="privacy-form"' in members
    member = accounts.create_user("just-a-member", password="pw-12345678")
    accounts.add_member(tenant, member, Membership.Role.ADMIN)
    client = Client()
    client.force_login(member)
    assert 'id="privacy-form"' not in client.get("/dashboard/data/").content.decode()
    assert client.post("/dashboard/data/", {"privacy_mode": "full"}).status_code == 403  # owners only
    assert client.get("/dashboard/data/export.jsonl").status_code == 403


# --- retention ----------------------------------------------------------------------------------
def test_retention_prunes_content_and_images_and_keeps_rows_and_rollups(fs_store, api_client):
    tenant = accounts.create_tenant("Retained", slug="retained")
    plaintext = accounts.create_api_key(tenant, "k")[1]
    owner = _owner(tenant)
    _set_mode(owner, "full", content_days="30", image_days="7")
    shared, own = media.png(20, 20), media.png(22, 22)
    old = _ask(api_client, plaintext, [own], prompt="old question")["query_id"]
    mid = _ask(api_client, plaintext, [shared], prompt="mid question")["query_id"]
    new = _ask(api_client, plaintext, [shared], prompt="new question")["query_id"]
    now = timezone.now()
    Query.objects.filter(pk=old).update(created_at=now - timedelta(days=40))
    Query.objects.filter(pk=mid).update(created_at=now - timedelta(days=10))
    before = {q.pk: q for q in Query.objects.all()}
    rollups = list(UsageDaily.objects.filter(tenant=tenant).values_list("date", "requests", "prompt_tokens"))
    assert len(_files(fs_store)) == 2

    out = io.StringIO()
    call_command("prune_queries", "--batch-size", "1", stdout=out)  # one row per transaction
    assert "1 queries' content removed, 2 queries' images removed" in out.getvalue()

    old_q, mid_q, new_q = (Query.objects.get(pk=pk) for pk in (old, mid, new))
    assert (old_q.prompt, old_q.messages, old_q.answer) == ("", [], "") and old_q.content_removed_at
    assert old_q.images.get().key == "" and old_q.images_removed_at
    assert mid_q.prompt == "mid question" and mid_q.images.get().key == "" and mid_q.content_removed_at is None
    assert new_q.prompt == "new question" and new_q.images.get().key  # kept
    # The shared image's object stays: the new query still refers to it. The old one's went.
    assert _files(fs_store) == [new_q.images.get().key]
    for q in (old_q, mid_q, new_q):  # the rows (tokens, timings, outcome) stay
        assert (q.status, q.prompt_tokens, q.finished_at) == (
            before[q.pk].status,
            before[q.pk].prompt_tokens,
            before[q.pk].finished_at,
        )
    assert list(UsageDaily.objects.filter(tenant=tenant).values_list("date", "requests", "prompt_tokens")) == rollups

    # What the pages and the API say.
    detail = owner.get(f"/dashboard/queries/{old}/").content.decode()
    assert "old question" not in detail and "(the tenant&#x27;s retention)" in detail
    assert "removed" in owner.get("/dashboard/queries/").content.decode()
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    assert set(api_client.get(f"/v1/queries/{old}").json()["kept"]["not_kept"]) == {
        "prompt",
        "messages",
        "answer",
        "images",
    }
    assert api_client.get(f"/v1/queries/{mid}").json()["kept"]["not_kept"] == ["images"]
    assert owner.get(f"/dashboard/queries/{mid}/image/0").status_code == 404
    # A second pass finds nothing left to do.
    assert set(privacy.prune().values()) == {0}


# --- export and deletion ------------------------------------------------------------------------
def test_export_streams_json_lines_with_image_links(fs_store, api_client):
    tenant = accounts.create_tenant("Exported", slug="exported")
    api_key, plaintext = accounts.create_api_key(tenant, "k")
    picture = media.png(26, 26)
    ids = [_ask(api_client, plaintext, [picture] if k % 2 else [], prompt=f"q{k}")["query_id"] for k in range(3)]
    owner = _owner(tenant)
    response = owner.get("/dashboard/data/export.jsonl")
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "application/x-ndjson" and ".jsonl" in response["Content-Disposition"]
    lines = [json.loads(line) for line in _body(response).decode().splitlines()]
    assert [line["id"] for line in lines] == ids  # oldest first
    assert [line["prompt"] for line in lines] == ["q0", "q1", "q2"]
    assert lines[1]["api_key"]["name"] == "k" and lines[1]["usage"]["prompt_tokens"] > 0
    (image,) = lines[1]["images"]
    assert image["sha256"] == hashlib.sha256(picture).hexdigest() and image["kept"] is True
    linked = owner.get(image["url"].removeprefix("http://testserver"))
    assert linked.status_code == 200 and _body(linked)[:4] == b"\x89PNG"
    out = io.StringIO()
    call_command("export_queries", "--tenant", "exported", stdout=out, stderr=io.StringIO())
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == ids


def test_deleting_a_keys_queries_and_a_tenant(fs_store, api_client):
    tenant = accounts.create_tenant("Doomed", slug="doomed")
    keep = accounts.create_tenant("Kept", slug="kept")
    first, first_plain = accounts.create_api_key(tenant, "first")
    second, second_plain = accounts.create_api_key(tenant, "second")
    kept_plain = accounts.create_api_key(keep, "k")[1]
    picture = media.png(28, 28)
    for plain in (first_plain, first_plain, second_plain, kept_plain):
        _ask(api_client, plain, [picture])
    assert len(_files(fs_store)) == 2  # one for the doomed tenant (three rows), one for the other
    owner = _owner(tenant)

    # The first key's queries: the object stays, the second key's query still refers to it.
    response = owner.post(f"/dashboard/keys/{first.pk}/delete-queries/", follow=True)
    assert "Deleted 2 queries of first and 0 stored images." in response.content.decode()
    assert not Query.objects.filter(api_key=first).exists() and len(_files(fs_store)) == 2
    assert UsageDaily.objects.get(api_key=first).requests == 2  # the usage figures stay
    # Another tenant's owner cannot.
    assert _owner(keep).post(f"/dashboard/keys/{second.pk}/delete-queries/").status_code == 404

    # The tenant, from the admin: its rows and objects go; its rollups stay, anonymised.
    staff = _staff()
    confirm = staff.get(f"/admin/accounts/tenant/{tenant.pk}/delete/").content.decode()
    assert "1 queries and their stored images" in confirm
    assert staff.post(f"/admin/accounts/tenant/{tenant.pk}/delete/", {"post": "yes"}).status_code == 302
    assert not Tenant.objects.filter(pk=tenant.pk).exists()
    assert Query.objects.filter(tenant=keep).count() == 1 and Query.objects.count() == 1
    assert _files(fs_store) == [QueryImage.objects.get().key]  # the other tenant's object only
    anonymised = UsageDaily.objects.filter(tenant__isnull=True)
    assert sorted(anonymised.values_list("requests", flat=True)) == [1, 2]
    assert set(anonymised.values_list("api_key", flat=True)) == {None}
    assert "deleted tenants (anonymised)" in staff.get("/admin/usage/").content.decode()

    # The operators' command.
    out = io.StringIO()
    call_command("delete_queries", "--tenant", "kept", "--delete-tenant", "--yes", stdout=out)
    assert "deleted 1 queries, 1 image rows, 1 stored images; 1 usage rollups anonymised" in out.getvalue()
    assert _files(fs_store) == []


# --- the data migration's mover -----------------------------------------------------------------
def test_images_in_rows_move_to_storage_in_resumable_batches(fs_store, tenant, api_key):
    """Rows written before 0011 (the PNG in ``content``): moved batch by batch, each batch committed
    on its own, so an interrupted run is resumed by the next; a moved row is never moved again."""
    pictures = [media.png(10 + k, 10) for k in range(5)]
    for k, png in enumerate(pictures):
        query = Query.objects.create(tenant=tenant, api_key=api_key[0], model="m", endpoint="queries")
        QueryImage.objects.create(
            query=query, position=0, sha256="a" * 64, format="PNG", size_bytes=1, width=1, height=1, content=png
        )
        if k == 4:  # and the same image twice in one query
            QueryImage.objects.create(
                query=query, position=1, sha256="a" * 64, format="PNG", size_bytes=1, width=1, height=1, content=png
            )

    class Interrupted(Exception):
        pass

    def stop_after_first_batch(message):
        raise Interrupted(message)

    with pytest.raises(Interrupted, match="moved 2 images"):
        imagestore.move_rows_to_storage(Query, QueryImage, batch=2, log=stop_after_first_batch)
    assert QueryImage.objects.filter(content__isnull=True).count() == 2  # the first batch stayed moved

    out = io.StringIO()
    call_command("move_images_to_storage", "--batch-size", "2", stdout=out)
    assert "4 images moved to storage" in out.getvalue()
    assert not QueryImage.objects.filter(content__isnull=False).exists()
    for image in QueryImage.objects.select_related("query"):
        stored = imagestore.read(image.key)
        assert stored in pictures and image.key == imagestore.key_for(tenant.pk, stored)
        assert image.stored_bytes == len(stored)
        assert image.query.stored_images == image.query.images.count()
    assert len(_files(fs_store)) == 5  # the image sent twice is one object
    assert "0 images moved" in _run_move()


def _run_move() -> str:
    out = io.StringIO()
    call_command("move_images_to_storage", stdout=out)
    return out.getvalue()


def test_privacy_mode_copies_onto_each_query(fs_store, api_key):
    """Changing the mode applies to new queries; queries already taken keep theirs."""
    from inference import services

    tenant = api_key[0].tenant
    first = services.accept(api_key[0], services.check_input(prompt="x"), endpoint=Query.Endpoint.QUERIES)
    Tenant.objects.filter(pk=tenant.pk).update(privacy_mode=PrivacyMode.METADATA)
    api_key[0].tenant.refresh_from_db()
    second = services.accept(api_key[0], services.check_input(prompt="y"), endpoint=Query.Endpoint.QUERIES)
    assert (first.privacy_mode, second.privacy_mode) == ("full", "metadata")


def test_a_pruning_batch_blocks_no_insert(fs_store, tenant, api_key):
    """While a pruning batch's transaction is open (content blanked, image references dropped, rows
    locked), a new query of the same tenant with the same image is written: it waits on no lock.
    The writer runs with PostgreSQL's lock_timeout, so any lock wait fails it (no clock involved)."""
    import threading

    from django.db import connection, transaction

    from inference import services

    picture = media.png(18, 18)
    data = services.check_input(prompt="old", images=[picture])
    old = [services.accept(api_key[0], data, endpoint=Query.Endpoint.QUERIES).pk for _ in range(20)]
    nine_days_ago = timezone.now() - timedelta(days=9)
    Query.objects.filter(pk__in=old).update(status=Query.Status.SUCCEEDED, created_at=nine_days_ago)
    holding, release = threading.Event(), threading.Event()
    outcome = {}

    def prune_batch():
        try:
            with transaction.atomic():
                privacy.remove_content(old)
                outcome["keys"] = privacy.remove_images(old)
                holding.set()
                release.wait(30)
        finally:
            connection.close()

    pruner = threading.Thread(target=prune_batch)
    pruner.start()
    try:
        assert holding.wait(30)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '2s'")
            new = services.accept(api_key[0], services.check_input(prompt="new", images=[picture]), endpoint="queries")
    finally:
        release.set()
        pruner.join()
    imagestore.release(outcome["keys"])
    assert Query.objects.get(pk=new.pk).images.get().key == outcome["keys"][0]  # the same object
    assert _files(fs_store) == [outcome["keys"][0]]  # still there: the new query refers to it
    assert Query.objects.filter(pk__in=old, content_removed_at__isnull=False).count() == 20


# --- orphaned objects ----------------------------------------------------------------------------
def _orphan(tenant, png: bytes) -> str:
    """What a web process that died between writing an image and committing its row leaves behind:
    the object (written under the key's lock, as ``accept`` writes it), and no row."""
    from django.db import transaction

    from inference import services

    png = services.check_input(prompt="x", images=[png]).images[0].normalised_png()  # as accept stores it
    key = imagestore.key_for(tenant.pk, png)
    with transaction.atomic():
        imagestore.lock_keys([key], exclusive=False)
        assert imagestore.put(key, png)
    return key


def _later(hours=2):
    return timezone.now() + timedelta(hours=hours)  # past ORPHAN_IMAGE_GRACE_SECONDS (1 h)


def test_the_pruner_deletes_orphaned_images_in_the_filesystem_store(fs_store, api_client, settings):
    tenant = accounts.create_tenant("Orphans", slug="orphans")
    plaintext = accounts.create_api_key(tenant, "k")[1]
    kept = QueryImage.objects.get(query_id=_ask(api_client, plaintext, [media.png(30, 20)])["query_id"]).key
    orphans = [_orphan(tenant, media.png(31 + k, 20)) for k in range(5)]
    # A writer that died while writing the file leaves a partial file beside the objects.
    partial = os.path.join(os.path.dirname(fs_store / kept), imagestore.PARTIAL_PREFIX + "abc123")
    with open(partial, "wb") as out:
        out.write(b"half a png")
    assert len(_files(fs_store)) == 7

    # Younger than the grace period: nothing goes (a writer may be about to commit its row).
    assert privacy.prune(orphan_shards=imagestore.SHARDS)["orphans_removed"] == 0
    assert len(_files(fs_store)) == 7

    # Bounded: a pass whose time is up stops after its first batch of keys (here: of the first
    # shard it reads, one that holds an orphan and no partial file).
    import time as clock

    shard = orphans[0].split("/")[1]
    if shard == kept.split("/")[1]:  # the partial file elsewhere
        elsewhere = fs_store / f"t{tenant.pk}" / ("ff" if shard == "00" else "00")
        elsewhere.mkdir(exist_ok=True)
        os.rename(partial, elsewhere / f"{imagestore.PARTIAL_PREFIX}x")
    first = imagestore.collect_orphans(
        grace=timedelta(hours=1), batch=2, deadline=clock.monotonic(), now=_later(), shards=[shard, *imagestore.SHARDS]
    )
    assert 1 <= first <= 2
    assert len(_files(fs_store)) == 7 - first and orphans[0] not in _files(fs_store)

    # The periodic pass reads one shard; the command reads them all when told.
    out = io.StringIO()
    call_command("prune_queries", "--all-shards", "--batch-size", "2", stdout=out)
    assert "0 orphaned images deleted" in out.getvalue()  # still within the grace period: now, not later
    counts = privacy.prune(now=_later(), batch=2, orphan_shards=imagestore.SHARDS)
    assert counts["orphans_removed"] == 6 - first
    assert _files(fs_store) == [kept]  # the referenced object stays
    assert not set(orphans) & set(_files(fs_store))
    response = _owner(tenant).get(f"/dashboard/queries/{QueryImage.objects.get(key=kept).query_id}/image/0")
    assert response.status_code == 200 and _body(response) == imagestore.read(kept)


def test_the_pruner_reads_one_shard_per_pass(fs_store, tenant):
    orphan = _orphan(tenant, media.png(12, 34))
    shard = orphan.split("/")[1]
    later = _later()
    other = next(s for s in imagestore.SHARDS if s != shard)
    assert privacy.prune(now=later, orphan_shards=[other])["orphans_removed"] == 0
    assert _files(fs_store) == [orphan]
    # The pass at `later` reads the shard its time names; some pass within 256 intervals reads this one.
    interval = 60.0
    passes = [later + timedelta(seconds=interval * n) for n in range(256)]
    assert {imagestore.shard_of_pass(at, interval) for at in passes} == set(imagestore.SHARDS)
    at = next(at for at in passes if imagestore.shard_of_pass(at, interval) == shard)
    this_pass = [imagestore.shard_of_pass(at, interval)]
    assert imagestore.collect_orphans(grace=timedelta(hours=1), now=at, shards=this_pass) == 1
    assert _files(fs_store) == []


def test_an_orphan_referenced_again_before_its_deletion_stays(fs_store, tenant, api_key):
    """The same image sent again after its first writer died: the new row refers to the old object,
    which is then no orphan."""
    from inference import services

    picture = media.png(44, 21)
    key = _orphan(tenant, picture)
    query = services.accept(
        api_key[0], services.check_input(prompt="again", images=[picture]), endpoint=Query.Endpoint.QUERIES
    )
    assert query.images.get().key == key
    assert privacy.prune(now=_later(), orphan_shards=imagestore.SHARDS)["orphans_removed"] == 0
    assert _files(fs_store) == [key]


def test_the_pruner_deletes_orphaned_images_in_an_s3_bucket(s3_store, api_client):
    endpoint, prefix = s3_store
    tenant = accounts.create_tenant("S3 orphans", slug="s3-orphans")
    plaintext = accounts.create_api_key(tenant, "k")[1]
    kept = QueryImage.objects.get(query_id=_ask(api_client, plaintext, [media.png(50, 20)])["query_id"]).key
    orphans = [_orphan(tenant, media.png(51 + k, 20)) for k in range(3)]
    # Another deployment's objects in the same bucket (outside this store's prefix) are not its own.
    stranger = f"other-{uuid.uuid4().hex[:6]}/images/{orphans[0]}"
    _s3_client(endpoint).put_object(Bucket=BUCKET, Key=stranger, Body=b"not ours")
    assert _s3_keys(endpoint, prefix) == sorted(f"{prefix}/{k}" for k in [kept, *orphans])

    assert privacy.prune(orphan_shards=imagestore.SHARDS)["orphans_removed"] == 0  # within the grace period
    assert len(_s3_keys(endpoint, prefix)) == 4
    assert privacy.prune(now=_later(), batch=2, orphan_shards=imagestore.SHARDS)["orphans_removed"] == 3
    assert _s3_keys(endpoint, prefix) == [f"{prefix}/{kept}"]
    assert imagestore_read_s3(endpoint, stranger) == b"not ours"
    assert imagestore.read(kept) == imagestore_read_s3(endpoint, f"{prefix}/{kept}")
