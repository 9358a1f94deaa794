from django.contrib import admin
from django.urls import include, path, re_path

from console.kernel.errors import api_not_found
from console.kernel.throttling import signin_throttled
from console.metrics import metrics
from console.portal.home import healthz
from provisioning.api.enroll import enroll

admin.site.site_header = "Neocloud Console — operations"
admin.site.site_title = "Neocloud operations"
admin.site.index_title = "Fleet, catalog and tenants"
admin.site.login = signin_throttled(admin.site.login)  # the admin's sign-in counts failures like the portal's

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include(("console.api_urls", "api"), namespace="api")),
    re_path(r"^api/", api_not_found),  # after the API: what it does not name is its JSON 404
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics, name="metrics"),
    path("agent/v1/enroll", enroll, name="agent-enroll"),
    path("", include(("console.portal.urls", "portal"), namespace="portal")),
]

handler400 = "console.kernel.errors.handler400"
handler403 = "console.kernel.errors.handler403"
handler404 = "console.kernel.errors.handler404"
handler500 = "console.kernel.errors.handler500"
