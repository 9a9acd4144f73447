"""The playground: try the model with the signed-in member's own session key (the websocket
authenticates with the dashboard session; accounts.dashboard.playground_key). The page builds one
OpenAI-style chat request per question (the conversation so far, each image in the turn that added
it), sends it as the websocket's ``infer`` frame, and shows the same request as curl and Python."""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from accounts import dashboard
from config import models_registry
from dashboard.views.common import page_context
from inference import services


def _models(tenant) -> list[dict]:
    """The served models this tenant may use, each with its own limits."""
    models = []
    for name in services.served_models():
        served = models_registry.get(name)
        if served is None or not tenant.may_use(name):
            continue
        models.append(
            {
                "name": name,
                "max_images": min(settings.MAX_IMAGES_PER_REQUEST, served.max_images),
                "max_tokens": min(settings.MAX_NEW_TOKENS, served.max_new_tokens),
            }
        )
    return models


@login_required
def playground(request):
    membership = dashboard.current_membership(request)
    models = _models(membership.tenant)
    names = [m["name"] for m in models]
    # the model a request without one gets (services.check_model's rule)
    default = settings.INFERENCE_MODEL_NAME if settings.INFERENCE_MODEL_NAME in names else (names or [""])[0]
    chosen = next((m for m in models if m["name"] == default), None)
    return render(
        request,
        "dashboard/playground.html",
        page_context(
            request,
            membership,
            tiny_model=services.serves_tiny_model(),
            models=models,
            default_model=default,
            max_images=chosen["max_images"] if chosen else settings.MAX_IMAGES_PER_REQUEST,
            max_tokens=chosen["max_tokens"] if chosen else settings.MAX_NEW_TOKENS,
            default_max_tokens=min(settings.DEFAULT_MAX_TOKENS, chosen["max_tokens"] if chosen else 1),
            thinking_default=settings.CHAT_THINKING_DEFAULT,
            playground_config={
                "models": models,
                "maxImageSide": settings.MAX_IMAGE_SIDE,
                "queryUrl": "/dashboard/queries/",
            },
        ),
    )
