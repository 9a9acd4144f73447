"""The Celery app. Workers: ``celery -A config worker -Q <model queue> --pool solo`` (one per GPU)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("sightline")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["inference"])
