"""The playground: try the model with the signed-in member's own session key."""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from accounts import dashboard
from dashboard.views.common import page_context
from inference import services


@login_required
def playground(request):
    membership = dashboard.current_membership(request)
    return render(
        request,
        "dashboard/playground.html",
        page_context(
            request, membership, tiny_model=services.serves_tiny_model(), max_images=settings.MAX_IMAGES_PER_REQUEST
        ),
    )
