"""Each query stores the X-Request-ID of the request (or websocket connection) that created it."""

from django.db import migrations, models

import config.request_id


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0005_query_prompt_trigram"),
    ]

    operations = [
        migrations.AddField(
            model_name="query",
            name="request_id",
            field=models.CharField(
                blank=True, db_index=True, default=config.request_id.current, help_text="X-Request-ID", max_length=128
            ),
        ),
    ]
