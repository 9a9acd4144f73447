"""Issue 10, the data: each query's conversation into ``Query.messages``, each image into a
``QueryImage`` row of position 0 with the facts the query's image columns held.

A chat completion's conversation moves out of ``params["messages"]``; any other query was one
question about one image, which is the conversation ``[{"role": "user", "content": [{"type":
"image"}, {"type": "text", "text": prompt}]}]``. On PostgreSQL both steps are single statements (the
log may hold millions of rows); elsewhere (SQLite, the embedded default) rows go in batches.
"""

from django.db import migrations

BATCH = 2000


def _one_turn(prompt: str) -> list:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def move_messages_in_batches(Query) -> None:
    """Any database: read the rows in primary-key order, write them back in batches."""
    rows = Query.objects.filter(messages=[]).only("id", "prompt", "params").order_by("pk")
    batch = []
    for query in rows.iterator(chunk_size=BATCH):
        params = dict(query.params or {})
        stored = params.pop("messages", None)
        query.messages = stored if isinstance(stored, list) and stored else _one_turn(query.prompt)
        query.params = params
        batch.append(query)
        if len(batch) >= BATCH:
            Query.objects.bulk_update(batch, ["messages", "params"])
            batch = []
    if batch:
        Query.objects.bulk_update(batch, ["messages", "params"])


def move_messages(apps, schema_editor):
    Query = apps.get_model("inference", "Query")
    if schema_editor.connection.vendor != "postgresql":
        move_messages_in_batches(Query)
        return
    table = schema_editor.quote_name(Query._meta.db_table)
    schema_editor.execute(
        f"UPDATE {table} SET messages = params->'messages', params = params - 'messages' "
        "WHERE jsonb_typeof(params->'messages') = 'array' AND jsonb_array_length(params->'messages') > 0"
    )
    schema_editor.execute(
        f"UPDATE {table} SET messages = jsonb_build_array(jsonb_build_object('role', 'user', 'content', "
        "jsonb_build_array(jsonb_build_object('type', 'image'), jsonb_build_object('type', 'text', 'text', prompt)))), "
        "params = params - 'messages' "
        "WHERE messages = '[]'::jsonb"
    )


def restore_messages(apps, schema_editor):
    """Back to params["messages"] for chat completions; the others' conversation was their prompt."""
    Query = apps.get_model("inference", "Query")
    batch = []
    for query in Query.objects.only("id", "endpoint", "params", "messages").iterator(chunk_size=BATCH):
        if query.endpoint == "chat_completions" and query.messages:
            query.params = {**(query.params or {}), "messages": query.messages}
        query.messages = []
        batch.append(query)
        if len(batch) >= BATCH:
            Query.objects.bulk_update(batch, ["messages", "params"])
            batch = []
    if batch:
        Query.objects.bulk_update(batch, ["messages", "params"])


def copy_images(apps, schema_editor):
    q = schema_editor.quote_name
    query = q(apps.get_model("inference", "Query")._meta.db_table)
    legacy = q(apps.get_model("inference", "LegacyQueryImage")._meta.db_table)
    images = q(apps.get_model("inference", "QueryImage")._meta.db_table)
    schema_editor.execute(
        f"INSERT INTO {images} (query_id, position, sha256, format, size_bytes, width, height, content, content_type) "
        f"SELECT l.query_id, 0, COALESCE(qr.image_sha256, ''), COALESCE(qr.image_format, ''), "
        f"COALESCE(qr.image_bytes, 0), COALESCE(qr.image_width, l.width), COALESCE(qr.image_height, l.height), "
        f"l.content, l.content_type FROM {legacy} l JOIN {query} qr ON qr.id = l.query_id"
    )


def restore_images(apps, schema_editor):
    """Position 0 back to the one-to-one table and the query's columns (the others are lost)."""
    q = schema_editor.quote_name
    query = q(apps.get_model("inference", "Query")._meta.db_table)
    legacy = q(apps.get_model("inference", "LegacyQueryImage")._meta.db_table)
    images = q(apps.get_model("inference", "QueryImage")._meta.db_table)
    schema_editor.execute(
        f"INSERT INTO {legacy} (query_id, content, content_type, width, height) "
        f"SELECT query_id, content, content_type, width, height FROM {images} WHERE position = 0"
    )
    for column, source in (
        ("image_sha256", "sha256"),
        ("image_format", "format"),
        ("image_bytes", "size_bytes"),
        ("image_width", "width"),
        ("image_height", "height"),
    ):
        schema_editor.execute(
            f"UPDATE {query} SET {column} = (SELECT i.{source} FROM {images} i "
            f"WHERE i.query_id = {query}.id AND i.position = 0)"
        )
    schema_editor.execute(f"DELETE FROM {images}")


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0007_conversations"),
    ]

    operations = [
        migrations.RunPython(move_messages, restore_messages),
        migrations.RunPython(copy_images, restore_images),
    ]
