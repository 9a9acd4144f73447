"""Time-ordered ids (config/ids.py): the query log's primary key and request ids grow at the right
edge of their indexes, and keep 74 random bits."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from config.ids import uuid7, uuid7_time
from inference.models import Query


def test_uuid7_layout_time_and_randomness():
    at = datetime(2026, 12, 7, 3, 0, 0, 123000, tzinfo=UTC)
    ids = [uuid7(at) for _ in range(2000)]
    assert len(set(ids)) == 2000
    for value in ids:
        assert value.version == 7 and value.variant == uuid.RFC_4122
        assert uuid7_time(value) == int(at.timestamp() * 1000)
    # Every random bit varies across ids: 12 of rand_a, 62 of rand_b (74 in all).
    varying = 0
    for bit in range(128):
        values = {value.int >> bit & 1 for value in ids}
        varying += len(values) == 2
    assert varying == 74
    # Ordered by time: a later millisecond sorts after, whatever the random bits.
    later = [uuid7(at + timedelta(milliseconds=1)) for _ in range(200)]
    assert max(ids) < min(later)
    assert uuid7_time(uuid.uuid4()) is None


@pytest.mark.django_db(transaction=True)
def test_a_querys_id_is_its_admission_id_and_tells_its_creation_time(authed_client):
    response = authed_client.post("/v1/queries", {"prompt": "Which id is this?", "max_tokens": 2}, format="json")
    assert response.status_code in (200, 201, 202), response.content
    body = response.json()
    query = Query.objects.get(pk=body.get("id") or body.get("query_id"))
    assert query.pk.version == 7
    assert uuid7_time(query.pk) == int(query.created_at.timestamp() * 1000)  # the admission's time
    authed_client.post("/v1/queries", {"prompt": "And this one?", "max_tokens": 2}, format="json")
    assert Query.objects.exclude(pk=query.pk).get().pk > query.pk


def test_generated_request_ids_are_time_ordered_and_a_clients_is_kept():
    from config import request_id

    first, second = request_id.choose(None), request_id.choose(b"not valid!")
    assert uuid.UUID(first).version == uuid.UUID(second).version == 7 and first != second
    assert request_id.choose(b"client-id-1") == "client-id-1"
