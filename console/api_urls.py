"""/api/v1/: the REST API, its OpenAPI schema and interactive docs."""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from marketplace.api.views.billing import BalanceView, BillingNoticeView, InvoiceViewSet, SpendAlertViewSet, UsageView
from marketplace.api.views.catalog import ImageViewSet, OfferViewSet
from marketplace.api.views.endpoints import EndpointViewSet, ServedModelViewSet
from marketplace.api.views.reservations import ReservationViewSet
from marketplace.api.views.tenancy import ApiKeyViewSet, MeView, SshKeyViewSet
from provisioning.api.views import AcceleratorTypeViewSet, SiteViewSet

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("sites", SiteViewSet, basename="site")
router.register("accelerator-types", AcceleratorTypeViewSet, basename="accelerator-type")
router.register("offers", OfferViewSet, basename="offer")
router.register("images", ImageViewSet, basename="image")
router.register("api-keys", ApiKeyViewSet, basename="api-key")
router.register("ssh-keys", SshKeyViewSet, basename="ssh-key")
router.register("reservations", ReservationViewSet, basename="reservation")
router.register("invoices", InvoiceViewSet, basename="invoice")
router.register("spend-alerts", SpendAlertViewSet, basename="spend-alert")
router.register("models", ServedModelViewSet, basename="served-model")
router.register("endpoints", EndpointViewSet, basename="endpoint")

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    path("me/", MeView.as_view(), name="me"),
    path("balance/", BalanceView.as_view(), name="balance"),
    path("usage/", UsageView.as_view(), name="usage"),
    path("billing-notices/", BillingNoticeView.as_view(), name="billing-notices"),
    path("", include(router.urls)),
]
