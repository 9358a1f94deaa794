"""Who may see a portal page."""

from functools import wraps

from django.contrib.auth.decorators import login_required
from django.shortcuts import render


def tenant_required(view):
    """A signed-in member of some organization; others see why they cannot go on."""

    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if request.tenant is None:
            return render(request, "portal/no_organization.html", status=403)
        return view(request, *args, **kwargs)

    return wrapper
