"""Query ids are UUIDv7 (config/ids.py), made in Python: the model's state changes, the database
does not (a plain AlterField would make SQLite copy the whole table to change nothing)."""

from django.db import migrations, models

import config.ids


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0014_money"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="query",
                    name="id",
                    field=models.UUIDField(default=config.ids.uuid7, editable=False, primary_key=True, serialize=False),
                ),
            ],
            database_operations=[],
        ),
    ]
