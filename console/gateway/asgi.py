"""The gateway's own processes: ``uvicorn console.gateway.asgi:application`` (the launcher runs one;
production runs several per region behind its host name, docs/gateway.md)."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings.development")
django.setup()  # before the gateway imports the marketplace's models

from console.gateway.app import Gateway  # noqa: E402

application = Gateway()
