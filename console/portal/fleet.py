"""The operators' live fleet view (staff only: tenants never see other tenants' nodes)."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from console.kernel.errors import Forbidden
from marketplace.selectors.capacity import fleet_occupancy


@login_required
def fleet(request):
    """The operators' live fleet view (staff only: tenants never see other tenants' nodes)."""
    if not request.user.is_staff:
        raise Forbidden("The fleet view is for operators.")
    return render(request, "portal/fleet.html", fleet_occupancy())
