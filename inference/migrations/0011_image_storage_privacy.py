# ruff: noqa: E501
"""Images out of the database (0012 moves them), privacy modes and retention.

The columns are added with database defaults, so rows a process of the previous release writes
meanwhile are valid. The pruner's partial indexes are built CONCURRENTLY on PostgreSQL (the query
log keeps taking inserts while they build: this migration is not atomic), plainly elsewhere."""

import django.db.models.deletion
from django.db import migrations, models

INDEXES = {
    "query": [
        models.Index(
            condition=models.Q(("content_removed_at__isnull", True)),
            fields=["tenant", "created_at"],
            name="query_content_kept",
        ),
        models.Index(
            condition=models.Q(("stored_images__gt", 0)), fields=["tenant", "created_at"], name="query_images_stored"
        ),
        models.Index(
            condition=models.Q(("content_removed_at__isnull", True), ("privacy_mode", "metadata")),
            fields=["finished_at"],
            name="query_metadata_held",
        ),
    ],
    "queryimage": [
        models.Index(condition=models.Q(("key", ""), _negated=True), fields=["key"], name="queryimage_key"),
        models.Index(condition=models.Q(("content__isnull", False)), fields=["id"], name="queryimage_in_row"),
    ],
}


def _each_index(apps, schema_editor):
    for model_name, indexes in INDEXES.items():
        model = apps.get_model("inference", model_name)
        for index in indexes:
            yield model, index


def add_indexes(apps, schema_editor):
    postgres = schema_editor.connection.vendor == "postgresql"
    for model, index in _each_index(apps, schema_editor):
        if postgres:
            # A build that failed before leaves an invalid index of the name: start again.
            schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index.name}")
            schema_editor.add_index(model, index, concurrently=True)
        else:
            schema_editor.add_index(model, index)


def remove_indexes(apps, schema_editor):
    postgres = schema_editor.connection.vendor == "postgresql"
    for model, index in _each_index(apps, schema_editor):
        if postgres:
            schema_editor.remove_index(model, index, concurrently=True)
        else:
            schema_editor.remove_index(model, index)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("accounts", "0003_tenant_privacy_retention"),
        ("inference", "0010_query_reasoning_tool_calls_choices"),
    ]

    operations = [
        migrations.AddField(
            model_name="query",
            name="content_removed_at",
            field=models.DateTimeField(
                blank=True, help_text="when its prompt, conversation and answer were removed", null=True
            ),
        ),
        migrations.AddField(
            model_name="query",
            name="images_removed_at",
            field=models.DateTimeField(blank=True, help_text="when its images were removed", null=True),
        ),
        migrations.AddField(
            model_name="query",
            name="privacy_mode",
            field=models.CharField(
                choices=[
                    ("full", "full: prompts, answers and images are kept"),
                    ("no_images", "no_images: prompts and answers are kept, images are not"),
                    ("metadata", "metadata: only sizes, hashes, tokens, timings and the outcome are kept"),
                ],
                db_default="full",
                default="full",
                help_text="its tenant's privacy mode when it was accepted",
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="query",
            name="stored_images",
            field=models.PositiveSmallIntegerField(
                db_default=0, default=0, help_text="how many of its images are held in image storage"
            ),
        ),
        migrations.AddField(
            model_name="queryimage",
            name="key",
            field=models.CharField(
                blank=True,
                db_default="",
                default="",
                help_text="the normalised image the model saw, in image storage; empty when it is not kept",
                max_length=255,
            ),
        ),
        migrations.AddField(
            model_name="queryimage",
            name="stored_bytes",
            field=models.PositiveIntegerField(blank=True, help_text="of the normalised PNG", null=True),
        ),
        migrations.AlterField(
            model_name="queryimage",
            name="content",
            field=models.BinaryField(blank=True, null=True),
        ),
        migrations.AlterField(
            model_name="usagedaily",
            name="tenant",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="usage_days",
                to="accounts.tenant",
            ),
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddIndex(
                    model_name="query",
                    index=models.Index(
                        condition=models.Q(("content_removed_at__isnull", True)),
                        fields=["tenant", "created_at"],
                        name="query_content_kept",
                    ),
                ),
                migrations.AddIndex(
                    model_name="query",
                    index=models.Index(
                        condition=models.Q(("stored_images__gt", 0)),
                        fields=["tenant", "created_at"],
                        name="query_images_stored",
                    ),
                ),
                migrations.AddIndex(
                    model_name="query",
                    index=models.Index(
                        condition=models.Q(("content_removed_at__isnull", True), ("privacy_mode", "metadata")),
                        fields=["finished_at"],
                        name="query_metadata_held",
                    ),
                ),
                migrations.AddIndex(
                    model_name="queryimage",
                    index=models.Index(
                        condition=models.Q(("key", ""), _negated=True), fields=["key"], name="queryimage_key"
                    ),
                ),
                migrations.AddIndex(
                    model_name="queryimage",
                    index=models.Index(
                        condition=models.Q(("content__isnull", False)), fields=["id"], name="queryimage_in_row"
                    ),
                ),
            ],
            database_operations=[migrations.RunPython(add_indexes, remove_indexes, atomic=False)],
        ),
    ]
