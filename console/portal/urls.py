from django.contrib.auth import views as auth_views
from django.urls import path

from console.kernel.throttling import signin_throttled
from console.portal import billing, views

urlpatterns = [
    path("", views.home, name="home"),
    path(
        "login/",
        signin_throttled(
            auth_views.LoginView.as_view(template_name="portal/login.html", redirect_authenticated_user=True)
        ),
        name="login",
    ),
    path("signed-in/", views.signed_in, name="signed-in"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("organization/", views.organization_switch, name="organization-switch"),
    path("catalog/", views.catalog, name="catalog"),
    path("offers/<int:offer_id>/reserve/", views.reserve, name="reserve"),
    path("reservations/", views.reservations, name="reservations"),
    path("reservations/<uuid:reservation_id>/", views.reservation_detail, name="reservation"),
    path("billing/", billing.billing, name="billing"),
    path("billing/alerts/<int:alert_id>/remove/", billing.spend_alert_remove, name="spend-alert-remove"),
    path("billing/invoices/<uuid:invoice_id>/", billing.invoice_detail, name="invoice"),
    path("billing/invoices/<uuid:invoice_id>/csv/", billing.invoice_csv, name="invoice-csv"),
    path("fleet/", views.fleet, name="fleet"),
    path("api-keys/", views.api_keys, name="api-keys"),
    path("api-keys/<uuid:key_id>/revoke/", views.api_key_revoke_view, name="api-key-revoke"),
]
