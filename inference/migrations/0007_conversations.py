"""Issue 10: a query is a conversation with 0..MAX_IMAGES_PER_REQUEST images.

``Query.messages`` holds the conversation (until now chat completions kept theirs in
``params["messages"]``); ``QueryImage`` becomes one row per image (position, SHA-256, format, size,
dimensions, content). The old one-to-one table is renamed aside here, its rows copied by 0008 and
it is dropped by 0009 with the query's single-image columns (made nullable here so that the
removal can be reversed). Three migrations, three transactions: PostgreSQL refuses to alter a
table in the transaction that has just written rows with deferred foreign-key checks into it.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0006_query_request_id"),
    ]

    operations = [
        migrations.AddField(
            model_name="query",
            name="messages",
            field=models.JSONField(blank=True, default=list),
        ),
        migrations.AlterField(
            model_name="query",
            name="prompt",
            field=models.TextField(blank=True, help_text="the last user turn's text"),
        ),
        migrations.AlterField(
            model_name="query", name="image_sha256", field=models.CharField(max_length=64, null=True)
        ),
        migrations.AlterField(
            model_name="query", name="image_format", field=models.CharField(max_length=16, null=True)
        ),
        migrations.AlterField(model_name="query", name="image_width", field=models.PositiveIntegerField(null=True)),
        migrations.AlterField(model_name="query", name="image_height", field=models.PositiveIntegerField(null=True)),
        migrations.AlterField(model_name="query", name="image_bytes", field=models.PositiveIntegerField(null=True)),
        migrations.RenameModel(old_name="QueryImage", new_name="LegacyQueryImage"),
        migrations.CreateModel(
            name="QueryImage",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                (
                    "position",
                    models.PositiveSmallIntegerField(help_text="0 for the conversation's first image part"),
                ),
                ("sha256", models.CharField(db_index=True, help_text="of the bytes sent", max_length=64)),
                (
                    "format",
                    models.CharField(help_text="JPEG, PNG, WEBP, GIF or BMP, read from the content", max_length=16),
                ),
                ("size_bytes", models.PositiveIntegerField(help_text="of the upload")),
                ("width", models.PositiveIntegerField(help_text="of the upload")),
                ("height", models.PositiveIntegerField(help_text="of the upload")),
                ("content", models.BinaryField(help_text="the normalised image the model saw")),
                ("content_type", models.CharField(default="image/png", max_length=32)),
                (
                    "query",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="images", to="inference.query"
                    ),
                ),
            ],
            options={
                "ordering": ["query", "position"],
                "constraints": [
                    models.UniqueConstraint(fields=("query", "position"), name="unique_query_image_position")
                ],
            },
        ),
    ]
