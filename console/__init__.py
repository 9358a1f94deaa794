"""The Django project and the portal: settings, URLs, ASGI routing, the Celery app, tenant
resolution at the boundary, error handling and the dev launcher."""

import os

# Importing the Celery app below sets a default DJANGO_SETTINGS_MODULE in this process's environment.
# Tools that start other programs (console.devservers) must not hand that default on: a test run
# started through them would otherwise run on the development settings instead of pytest's.
SETTINGS_MODULE_FROM_ENVIRONMENT = "DJANGO_SETTINGS_MODULE" in os.environ

from .celery import app as celery_app  # noqa: E402

__all__ = ["celery_app"]
