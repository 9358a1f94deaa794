"""The portal's URLs, one module of views per subdomain."""

from django.contrib.auth import views as auth_views
from django.urls import path

from console.kernel.throttling import signin_throttled
from console.portal import api_keys, billing, catalog, endpoints, fleet, home, reservations, ssh_keys

urlpatterns = [
    path("", home.home, name="home"),
    path(
        "login/",
        signin_throttled(
            auth_views.LoginView.as_view(template_name="portal/login.html", redirect_authenticated_user=True)
        ),
        name="login",
    ),
    path("signed-in/", home.signed_in, name="signed-in"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("organization/", home.organization_switch, name="organization-switch"),
    path("catalog/", catalog.catalog, name="catalog"),
    path("offers/<int:offer_id>/reserve/", catalog.reserve, name="reserve"),
    path("reservations/", reservations.reservations, name="reservations"),
    path("reservations/<uuid:reservation_id>/", reservations.reservation_detail, name="reservation"),
    path("endpoints/", endpoints.endpoints, name="endpoints"),
    path("endpoints/new/", endpoints.endpoint_new, name="endpoint-new"),
    path("endpoints/<uuid:endpoint_id>/", endpoints.endpoint_detail, name="endpoint"),
    path("billing/", billing.billing, name="billing"),
    path("billing/alerts/<int:alert_id>/remove/", billing.spend_alert_remove, name="spend-alert-remove"),
    path("billing/invoices/<uuid:invoice_id>/", billing.invoice_detail, name="invoice"),
    path("billing/invoices/<uuid:invoice_id>/csv/", billing.invoice_csv, name="invoice-csv"),
    path("fleet/", fleet.fleet, name="fleet"),
    path("api-keys/", api_keys.api_keys, name="api-keys"),
    path("api-keys/<uuid:key_id>/revoke/", api_keys.api_key_revoke_view, name="api-key-revoke"),
    path("ssh-keys/", ssh_keys.ssh_keys, name="ssh-keys"),
    path("ssh-keys/<uuid:key_id>/remove/", ssh_keys.ssh_key_remove_view, name="ssh-key-remove"),
]
