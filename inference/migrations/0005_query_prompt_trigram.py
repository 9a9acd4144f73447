"""A trigram index for the admin's search by prompt (`prompt__icontains`, which PostgreSQL runs as
``UPPER(prompt) LIKE UPPER('%term%')``): without it a search reads every prompt of the query log.
PostgreSQL only (pg_trgm is a trusted extension: the database's owner may create it); SQLite, the
embedded default, keeps the plain scan."""

from django.db import migrations

FORWARD = [
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE INDEX IF NOT EXISTS query_prompt_trgm ON inference_query USING gin (upper(prompt) gin_trgm_ops)",
]
BACKWARD = ["DROP INDEX IF EXISTS query_prompt_trgm"]


def _run(statements):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor != "postgresql":
            return
        for statement in statements:
            schema_editor.execute(statement)

    return run


class Migration(migrations.Migration):
    dependencies = [("inference", "0004_query_created_index")]

    operations = [migrations.RunPython(_run(FORWARD), _run(BACKWARD))]
