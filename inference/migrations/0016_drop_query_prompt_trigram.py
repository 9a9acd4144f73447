"""Drop the prompt trigram index of 0005. A trigram search reads the posting lists of every trigram
of the term, and a term with a common word ("number 123456") reads lists as long as the log: 1,740
index pages at 1 M rows, and the admin's search page took 597 ms at 10 M. The admin's prompt search now
reads a bounded window of the newest queries instead (inference/admin.py,
ADMIN_PROMPT_SEARCH_ROWS), which needs no index; every insert no longer writes ~40 trigram
entries, and the index's size (~8% of the query log's) is gone. PostgreSQL only; on SQLite (the
embedded default) there was no index and this does nothing."""

from django.db import migrations

FORWARD = ["DROP INDEX IF EXISTS query_prompt_trgm"]
# The extension stays (other databases' objects may use it); the way back rebuilds the index.
BACKWARD = [
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE INDEX IF NOT EXISTS query_prompt_trgm ON inference_query USING gin (upper(prompt) gin_trgm_ops)",
]


def _run(statements):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor != "postgresql":
            return
        for statement in statements:
            schema_editor.execute(statement)

    return run


class Migration(migrations.Migration):
    dependencies = [("inference", "0015_query_time_ordered_id")]

    operations = [migrations.RunPython(_run(FORWARD), _run(BACKWARD))]
