"""The Django project and the portal: settings, URLs, ASGI routing, the Celery app, tenant
resolution at the boundary, error handling and the dev launcher."""

from .celery import app as celery_app

__all__ = ["celery_app"]
