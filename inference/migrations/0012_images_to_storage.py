"""Moves the images still held in the database (``QueryImage.content``) to image storage, in
batches of their own transactions (inference/imagestore.py: ``move_rows_to_storage``). Resumable:
an interrupted run leaves moved rows moved, and the next run goes on with the rest.

A large installation runs ``manage.py migrate inference 0011`` first, then ``manage.py
move_images_to_storage`` (the same function, as long as it takes, while the service runs), then
``manage.py migrate``: this migration then finds little or nothing left to move. The column stays
(empty) for one release: a process of the previous release may still write it during a rolling
deploy, and the worker's pruning pass moves what it writes."""

from django.db import migrations


def forward(apps, schema_editor):
    from inference import imagestore

    imagestore.move_rows_to_storage(apps.get_model("inference", "Query"), apps.get_model("inference", "QueryImage"))


def backward(apps, schema_editor):
    from inference import imagestore

    imagestore.move_rows_back(apps.get_model("inference", "QueryImage"))


class Migration(migrations.Migration):
    # Each batch commits on its own: the move never holds one long transaction.
    atomic = False

    dependencies = [("inference", "0011_image_storage_privacy")]

    operations = [migrations.RunPython(forward, backward, atomic=False)]
