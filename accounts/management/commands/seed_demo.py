"""A demo tenant with an owner, a key and a few hundred synthetic queries over 30 days, written
through the same models and rollups as real ones, so the dashboard and admin have something to
show. The synthetic answers are placeholders, not model output."""

import hashlib
import random
from datetime import UTC, datetime, timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from accounts import services
from accounts.models import Membership, Tenant
from inference import chat, imagestore, usage
from inference.models import Query, QueryImage
from inference.samples import sample_png

PROMPTS = [
    "What is in this picture?",
    "Describe the image.",
    "How many people are there?",
    "What colour is the house?",
    "Read the text in the image.",
    "Is it day or night?",
]


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("--queries", type=int, default=300)
        parser.add_argument("--password", default="demo-password-123")
        parser.add_argument("--seed", type=int, default=7)
        parser.add_argument("--if-empty", action="store_true", help="add no queries if the demo tenant has some")

    def handle(self, *args, queries, password, seed, if_empty, **options):
        rng = random.Random(seed)
        tenant = Tenant.objects.filter(slug="demo").first() or services.create_tenant("Demo", slug="demo")
        User = get_user_model()
        owner = User.objects.filter(username="demo").first() or services.create_user("demo", password=password)
        services.add_member(tenant, owner, Membership.Role.OWNER)
        if if_empty and Query.objects.filter(tenant=tenant).exists():
            self.stdout.write("dashboard: sign in at /dashboard/ as 'demo' (the demo tenant has queries already)")
            return
        api_key, plaintext = services.create_api_key(tenant, "seeded", created_by=owner)
        # A second key for a third of the queries, so the overview's breakdown by key has two.
        batch_key, _ = services.create_api_key(tenant, "seeded-batch", created_by=owner)
        png = sample_png()
        now = datetime.now(UTC)
        with transaction.atomic():
            for i in range(queries):
                created = now - timedelta(days=rng.uniform(0, 29.9))
                failed = rng.random() < 0.05
                prompt_tokens, completion_tokens = rng.randint(40, 300), rng.randint(5, 256)
                total = rng.lognormvariate(-0.5, 0.6)
                # Every tenth query asks about an image (every twentieth about two); the rest are text-only.
                images = 2 if i % 20 == 0 else 1 if i % 10 == 0 else 0
                prompt = rng.choice(PROMPTS)
                query = Query.objects.create(
                    tenant=tenant,
                    api_key=batch_key if i % 3 == 2 else api_key,
                    model="glm-4.6v-flash",
                    endpoint=rng.choice(Query.Endpoint.values),
                    status=Query.Status.FAILED if failed else Query.Status.SUCCEEDED,
                    prompt=prompt,
                    messages=chat.one_turn(prompt, images),
                    params={"max_tokens": 256, "temperature": 0.0, "top_p": 1.0},
                    answer="" if failed else f"(synthetic demo answer #{i})",
                    finish_reason="" if failed else "stop",
                    prompt_tokens=None if failed else prompt_tokens,
                    completion_tokens=None if failed else completion_tokens,
                    error_code="gpu_oom" if failed else "",
                    error_message="synthetic failure" if failed else "",
                    created_at=created,
                    started_at=created + timedelta(seconds=0.01),
                    first_token_at=created + timedelta(seconds=total / 3),
                    finished_at=created + timedelta(seconds=total),
                    settled_at=created + timedelta(seconds=total),
                )
                key = imagestore.key_for(tenant.pk, png)
                if images:
                    imagestore.put(key, png)  # one object: the same picture every time
                    Query.objects.filter(pk=query.pk).update(stored_images=images)
                for position in range(images):
                    QueryImage.objects.create(
                        query=query,
                        position=position,
                        sha256=hashlib.sha256(png).hexdigest(),
                        format="PNG",
                        size_bytes=len(png),
                        width=320,
                        height=240,
                        key=key,
                        stored_bytes=len(png),
                    )
                usage.record_outcome(query)
        self.stdout.write(
            f"dashboard: sign in at /dashboard/ as 'demo', password {password!r} ({queries} synthetic queries "
            f"seeded; key 'seeded', shown once: {plaintext})"
        )
