"""Where the images of queries live: Django's storage API, alias ``images`` in STORAGES.

Files under IMAGE_STORAGE_DIR (``var/images``) in the embedded default; any S3-compatible bucket
(django-storages + boto3) when IMAGE_S3_BUCKET is set. A ``QueryImage`` row holds the key, never the
bytes, so the database, its backups and its replicas stay small.

Content-addressed per tenant: the key of an image is ``t<tenant id>/<aa>/<SHA-256 of the stored
PNG>.png``. The same image sent again by the same tenant is one object, referenced by each row that
uses it; another tenant's copy is another object (a tenant's objects never serve another tenant,
and deleting a tenant deletes its own prefix only).

An object is deleted when the last row referring to it stops referring to it (pruning, privacy
modes, deletion). Writers and the deleter meet on a lock per key, so an image sent again at the
moment its last reference goes is never deleted under the new row:

* a writer (``accept``), inside the transaction that inserts its rows, takes the key's lock shared,
  writes the object when it is missing, and commits;
* the deleter, after the transaction that dropped the references committed, takes the key's lock
  exclusive, checks that no row refers to the key, and deletes the object.

On PostgreSQL the lock is an advisory transaction lock; on SQLite (the embedded default) the
database's IMMEDIATE transactions already run one writer at a time.

Orphans: an object is written before the transaction that inserts its rows commits. When that
transaction rolls back, ``accept`` deletes the object; when the process dies in between, nobody
does. ``collect_orphans`` (the pruner's pass) deletes objects older than a grace period
(ORPHAN_IMAGE_GRACE_SECONDS, far longer than any writer's transaction) that no row refers to,
through ``release`` (the key's lock, then the check), and a filesystem store's partial files
older than that. A pass reads one shard (the ``<aa>`` level of the keys) of every tenant's
prefix, the next pass the next shard: the whole store every 256 passes, each pass bounded.
"""

import hashlib
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta

from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, storages
from django.db import connection, transaction

ALIAS = "images"
PARTIAL_PREFIX = ".partial-"
SHARDS = [f"{n:02x}" for n in range(256)]
CONTENT_TYPE = "image/png"


class ImageFileStorage(FileSystemStorage):
    """Files under a folder, one per key, each written whole (a temporary file, then a rename): a
    reader never sees half an image, and writing a key again replaces it with the same bytes
    instead of inventing another name."""

    def get_available_name(self, name, max_length=None):
        return name  # a content address: the same name is the same bytes

    def _save(self, name, content):
        full_path = self.path(name)
        directory = os.path.dirname(full_path)
        os.makedirs(directory, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=PARTIAL_PREFIX)
        try:
            with os.fdopen(descriptor, "wb") as out:
                for chunk in content.chunks():
                    out.write(chunk if isinstance(chunk, bytes) else chunk.encode())
            os.chmod(temporary, self.file_permissions_mode or 0o644)
            os.replace(temporary, full_path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        return name


def store():
    return storages[ALIAS]


def is_remote() -> bool:
    """Whether images live in a bucket (the views then hand out signed URLs) rather than in files."""
    return not isinstance(store(), FileSystemStorage)


def key_for(tenant_id, png: bytes) -> str:
    digest = hashlib.sha256(png).hexdigest()
    return f"t{tenant_id}/{digest[:2]}/{digest}.png"


def _lock_id(key: str) -> int:
    return int.from_bytes(hashlib.sha256(b"sightline-image:" + key.encode()).digest()[:8], "big", signed=True)


def lock_keys(keys: Iterable[str], *, exclusive: bool) -> None:
    """Inside a transaction: lock each key until it ends (see the module's docstring)."""
    if connection.vendor != "postgresql":
        return
    function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    with connection.cursor() as cursor:
        for key in sorted(set(keys)):  # one order for everyone: no deadlock between two writers
            cursor.execute(f"SELECT {function}(%s)", [_lock_id(key)])


def put(key: str, png: bytes) -> bool:
    """Write the object unless it is there; True when written. The caller holds the key's lock
    (shared) in the transaction that writes the rows referring to it."""
    files = store()
    if files.exists(key):
        return False
    files.save(key, ContentFile(png))
    return True


def read(key: str) -> bytes:
    with store().open(key, "rb") as stored:
        return stored.read()


def url(key: str) -> str:
    """A short-lived signed URL of the object (a bucket's; IMAGE_URL_EXPIRE_SECONDS)."""
    from django.conf import settings

    return store().url(key, expire=settings.IMAGE_URL_EXPIRE_SECONDS)


def release(keys: Iterable[str], *, image_model=None, batch: int = 100) -> int:
    """Delete the objects of ``keys`` that no row refers to any more; returns how many. Call it once
    the transaction that dropped the references has committed (``release_on_commit``)."""
    if image_model is None:
        from inference.models import QueryImage as image_model
    keys = sorted({key for key in keys if key})
    deleted = 0
    for start in range(0, len(keys), batch):
        chunk = keys[start : start + batch]
        with transaction.atomic():
            lock_keys(chunk, exclusive=True)
            used = set(image_model.objects.filter(key__in=chunk).values_list("key", flat=True))
            for key in chunk:
                if key not in used:
                    store().delete(key)
                    deleted += 1
    return deleted


def release_on_commit(keys: Iterable[str]) -> None:
    keys = [key for key in keys if key]
    if keys:
        transaction.on_commit(lambda: release(keys))


def move_rows_to_storage(query_model, image_model, *, batch: int = 200, log=None) -> int:
    """Move images still held in rows (``content``, written before 0011 or by a process of the
    previous release) to storage, ``batch`` rows per transaction; returns how many moved.
    Resumable: a moved row has its key and no content, and is not looked at again; rows another
    runner holds are skipped (SKIP LOCKED), so two runners share the work."""
    moved = 0
    while True:
        with transaction.atomic():
            pending = (
                image_model.objects.select_for_update(skip_locked=True, of=("self",))
                .filter(key="", content__isnull=False)
                .order_by("pk")
                .values_list("pk", "query_id", "query__tenant_id", "content")[:batch]
            )
            rows = list(pending)
            if not rows:
                return moved
            keys = {pk: key_for(tenant_id, bytes(content)) for pk, _, tenant_id, content in rows}
            lock_keys(keys.values(), exclusive=False)
            for pk, _query_id, _tenant_id, content in rows:
                png = bytes(content)
                put(keys[pk], png)
                image_model.objects.filter(pk=pk).update(key=keys[pk], stored_bytes=len(png), content=None)
            for query_id in {query_id for _, query_id, _, _ in rows}:
                held = image_model.objects.filter(query_id=query_id).exclude(key="").count()
                query_model.objects.filter(pk=query_id).update(stored_images=held)
        moved += len(rows)
        if log:
            log(f"moved {moved} images to storage")


def move_rows_back(image_model, *, batch: int = 200) -> int:
    """The way back (unapplying 0012): each stored image's bytes into its row again."""
    moved = 0
    while True:
        with transaction.atomic():
            rows = list(
                image_model.objects.filter(content__isnull=True).order_by("pk").values_list("pk", "key")[:batch]
            )
            if not rows:
                return moved
            for pk, key in rows:
                try:
                    content = read(key) if key else b""
                except FileNotFoundError:
                    content = b""
                image_model.objects.filter(pk=pk).update(content=content)
        moved += len(rows)


# --- orphans ---------------------------------------------------------------------------------------
def _listing(prefix: str) -> Iterator[tuple[str, datetime]]:
    """(name, last modified) of every object under ``prefix`` (a folder: "t3/ab/"), in pages as the
    store lists them: a bucket's listing carries the times (no request per object)."""
    files = store()
    if isinstance(files, FileSystemStorage):
        folder = files.path(prefix)
        for root, _dirs, names in os.walk(folder):
            for name in names:
                full = os.path.join(root, name)
                try:
                    modified = os.stat(full).st_mtime
                except FileNotFoundError:  # deleted meanwhile
                    continue
                yield os.path.relpath(full, files.location).replace(os.sep, "/"), datetime.fromtimestamp(modified, UTC)
        return
    bucket = getattr(files, "bucket", None)
    if bucket is not None:  # django-storages' S3Storage
        location = files.location.strip("/")
        start = f"{location}/" if location else ""
        for item in bucket.objects.filter(Prefix=start + prefix):
            yield item.key[len(start) :], item.last_modified
        return
    directories, names = files.listdir(prefix)  # any other storage: one request per object
    for name in names:
        yield prefix + name, files.get_modified_time(prefix + name)
    for directory in directories:
        yield from _listing(f"{prefix}{directory}/")


def _tenant_prefixes() -> list[str]:
    try:
        directories, _names = store().listdir("")
    except FileNotFoundError:  # nothing stored yet
        return []
    return sorted(f"{d}/" for d in directories if d.startswith("t"))


def shard_of_pass(now: datetime, interval: float) -> str:
    """The shard a pass at ``now`` reads: the next one every ``interval`` seconds."""
    return SHARDS[int(now.timestamp() // max(interval, 1.0)) % len(SHARDS)]


def collect_orphans(
    *,
    grace: timedelta,
    shards: Iterable[str] = SHARDS,
    batch: int = 500,
    deadline: float | None = None,
    now: datetime | None = None,
    image_model=None,
) -> int:
    """Delete the objects of ``shards`` (every tenant's) that were written over ``grace`` ago and
    that no row refers to, ``batch`` keys per check; stop when ``deadline`` (monotonic) passed.
    Returns how many objects were deleted."""
    now = now or datetime.now(UTC)
    cutoff = now - grace
    deleted = 0
    for tenant_prefix in _tenant_prefixes():
        for shard in shards:
            candidates = []
            for name, modified in _listing(f"{tenant_prefix}{shard}/"):
                if modified >= cutoff:
                    continue
                if os.path.basename(name).startswith(PARTIAL_PREFIX):  # a writer died mid-file
                    store().delete(name)
                    deleted += 1
                    continue
                candidates.append(name)
                if len(candidates) >= batch:
                    deleted += _release_orphans(candidates, image_model)
                    candidates = []
                    if deadline is not None and time.monotonic() >= deadline:
                        return deleted
            deleted += _release_orphans(candidates, image_model)
            if deadline is not None and time.monotonic() >= deadline:
                return deleted
    return deleted


def _release_orphans(names: list[str], image_model) -> int:
    if image_model is None:
        from inference.models import QueryImage as image_model
    referenced = set(image_model.objects.filter(key__in=names).values_list("key", flat=True))
    unreferenced = [name for name in names if name not in referenced]
    # release() takes each key's lock and checks again: a row committed since is seen.
    return release(unreferenced, image_model=image_model) if unreferenced else 0
