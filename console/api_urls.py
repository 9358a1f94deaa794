"""/api/v1/: the REST API, its OpenAPI schema and interactive docs."""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from marketplace.api.views import ApiKeyViewSet, MeView, OfferViewSet, ReservationViewSet
from provisioning.api.views import AcceleratorTypeViewSet, SiteViewSet

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("sites", SiteViewSet, basename="site")
router.register("accelerator-types", AcceleratorTypeViewSet, basename="accelerator-type")
router.register("offers", OfferViewSet, basename="offer")
router.register("api-keys", ApiKeyViewSet, basename="api-key")
router.register("reservations", ReservationViewSet, basename="reservation")

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    path("me/", MeView.as_view(), name="me"),
    path("", include(router.urls)),
]
