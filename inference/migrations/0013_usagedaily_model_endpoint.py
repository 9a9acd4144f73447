"""The daily rollups gain the query's model and endpoint (a key's day becomes one row per model and
endpoint). Rows written before keep "" for both: unknown, shown as "(earlier)"."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0003_tenant_privacy_retention"),
        ("inference", "0012_images_to_storage"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="usagedaily",
            name="unique_usage_day",
        ),
        migrations.AddField(
            model_name="usagedaily",
            name="endpoint",
            field=models.CharField(blank=True, db_default="", default="", max_length=32),
        ),
        migrations.AddField(
            model_name="usagedaily",
            name="model",
            field=models.CharField(blank=True, db_default="", default="", max_length=200),
        ),
        migrations.AddConstraint(
            model_name="usagedaily",
            constraint=models.UniqueConstraint(
                fields=("date", "tenant", "api_key", "model", "endpoint"), name="unique_usage_day_dims"
            ),
        ),
    ]
