"""The operators' live fleet view (staff only: tenants never see other tenants' nodes)."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from console.kernel.errors import Forbidden
from marketplace.selectors.capacity import gpus_held_now
from provisioning.selectors.fleet import fleet_overview


@login_required
def fleet(request):
    """The operators' live fleet view (staff only: tenants never see other tenants' nodes)."""
    if not request.user.is_staff:
        raise Forbidden("The fleet view is for operators.")
    return render(request, "portal/fleet.html", with_occupancy(fleet_overview(), gpus_held_now()))


def with_occupancy(overview: dict, held: dict[int, set[int]]) -> dict:
    """The fleet overview with each node's GPUs marked rented or free now (a node can be partly rented),
    and the GPUs rented per site and in all. The fleet is provisioning's; who rents it is marketplace's,
    so the two meet here, above both."""
    overview["totals"]["rented"] = 0
    for site in overview["sites"]:
        site["counts"]["rented"] = 0
        for rack in site["racks"]:
            for entry in rack["nodes"]:
                node = entry["node"]
                taken = held.get(node.pk, set())
                entry["gpus"] = [{"index": i, "rented": i in taken} for i in range(node.gpu_count)]
                entry["rented"] = sum(1 for i in taken if i < node.gpu_count)
                site["counts"]["rented"] += entry["rented"]
        overview["totals"]["rented"] += site["counts"]["rented"]
    return overview
