"""The Celery app. Workers: ``celery -A config worker -Q <model queue>`` (one per GPU; a thread pool
of INFERENCE_MAX_BATCH, from settings)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("sightline")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["inference"])
