"""The embedded default hands a query's images from the request to its worker thread in memory
(inference/handoff.py): the engine gets the very pixels that were stored, once; a query run again,
or one whose images were pushed out, reads them from storage; production leaves nothing behind."""

import pytest

from inference import handoff, runner, services
from inference.models import Query
from tests import media

pytestmark = pytest.mark.django_db(transaction=True)


def _query(api_key, *pngs) -> Query:
    data = services.check_input(prompt="What differs?", images=list(pngs), max_tokens=4)
    return services.accept(api_key, data, endpoint=Query.Endpoint.GLM_INFER)


def _pixels(images) -> list[tuple]:
    return [(image.mode, image.size, image.tobytes()) for image in images]


def test_the_worker_gets_the_stored_pixels_from_memory_once_then_from_storage(api_key):
    api_key, _ = api_key
    first, second = (
        media.encode(media.image(300, 200, seed=1), "JPEG"),
        media.encode(media.image(50, 90, seed=2), "PNG"),
    )
    query = _query(api_key, first, second)
    held = handoff.take(query.pk)
    assert held is not None and len(held) == 2
    handoff.give(query.pk, held)  # back, for the runner

    in_memory = runner.engine_request(query).images
    assert [id(image) for image in in_memory] == [id(image) for image in held]  # not read again
    from_storage = runner.engine_request(query).images  # taken once: a second run reads storage
    assert [id(image) for image in from_storage] != [id(image) for image in held]
    assert _pixels(from_storage) == _pixels(in_memory)  # the same pixels as stored (PNG is lossless)
    assert [image.size for image in in_memory] == [(300, 200), (50, 90)]


def test_images_pushed_out_are_read_from_storage(api_key, monkeypatch):
    api_key, _ = api_key
    picture = media.png(64, 48)
    monkeypatch.setattr(handoff, "HELD_BYTES", 64 * 48 * 3 * 2)  # room for two such images
    older, newer, newest = (_query(api_key, picture) for _ in range(3))
    assert handoff.take(older.pk) is None  # pushed out by the two after it
    assert handoff.take(newer.pk) is not None and handoff.take(newest.pk) is not None
    assert _pixels(runner.engine_request(older).images) == _pixels(runner.engine_request(newer).images)


def test_production_leaves_nothing_in_memory(api_key, settings):
    settings.EMBEDDED = False  # its workers are other processes
    api_key, _ = api_key
    query = _query(api_key, media.png())
    assert handoff.take(query.pk) is None
    assert len(runner.engine_request(query).images) == 1
