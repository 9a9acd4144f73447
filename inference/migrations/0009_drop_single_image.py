"""Issue 10: the one-to-one image table and the query's single-image columns go; a query's images
are its ``QueryImage`` rows (copied by 0008)."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0008_conversations_data"),
    ]

    operations = [
        migrations.DeleteModel(name="LegacyQueryImage"),
        migrations.RemoveField(model_name="query", name="image_sha256"),
        migrations.RemoveField(model_name="query", name="image_format"),
        migrations.RemoveField(model_name="query", name="image_width"),
        migrations.RemoveField(model_name="query", name="image_height"),
        migrations.RemoveField(model_name="query", name="image_bytes"),
    ]
