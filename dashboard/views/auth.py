"""Signing in (with the failed sign-in limit, the admin's too) and switching tenant."""

import math
from functools import wraps

from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from accounts import dashboard, signin


def limit_sign_in(login_view):
    """Wrap a login view (the dashboard's, the admin's) with the failed sign-in limit (accounts.signin):
    a limited username or address gets 429 without its password being checked."""

    @wraps(login_view)
    def view(request, *args, **kwargs):
        if request.method != "POST":
            return login_view(request, *args, **kwargs)
        who = {"username": request.POST.get("username", ""), "address": request.META.get("REMOTE_ADDR", "")}
        try:
            wait = signin.refused_for(**who)
            if wait:
                minutes = math.ceil(wait / 60)
                message = (
                    f"Too many failed sign-in attempts; wait {minutes} minute{'s' if minutes != 1 else ''}"
                    " before trying again."
                )
                return _refused(request, message, status=429, retry_after=wait)
            response = login_view(request, *args, **kwargs)
            # Django's LoginView redirects when it signs someone in and shows the form again otherwise.
            if response.status_code == 200:
                signin.record_failure(**who)
            return response
        except signin.CounterUnavailable:
            return _refused(
                request, "Sign-in is unavailable for a moment; try again shortly.", status=503, retry_after=5
            )

    return view


def _refused(request, message: str, *, status: int, retry_after: int):
    response = render(request, "dashboard/signin_refused.html", {"message": message}, status=status)
    response["Retry-After"] = str(retry_after)
    return response


@login_required
@require_POST
def switch(request):
    dashboard.switch_tenant(request, request.POST.get("tenant"))
    return redirect("dashboard:overview")


sign_in = limit_sign_in(auth_views.LoginView.as_view(template_name="dashboard/login.html"))
