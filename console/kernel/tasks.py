"""Sending Celery tasks from services: after the transaction commits (never before the row the task
speaks of exists), and without failing the request if the broker is briefly unreachable -- the
reconcilers re-enqueue from rows (ARCHITECTURE invariant 2).

Tasks are named, not imported: a service sends ``"marketplace.tasks.provision_reservation"`` and never
imports the tasks module that calls it back (the layers stay one-way; `make lint`). Celery routes a
task sent by name exactly as one sent with ``delay`` (CELERY_TASK_ROUTES is keyed by name)."""

import logging

from celery import current_app
from django.db import transaction

logger = logging.getLogger(__name__)


def enqueue_on_commit(task: str, *args) -> None:
    """Send the task registered as ``task`` with ``args`` once the transaction commits."""

    def send():
        try:
            current_app.send_task(task, args=args)
        except Exception:  # noqa: BLE001 - the reconciler will find the work from its rows
            logger.exception("Could not enqueue %s%r; the reconciler will", task, args)

    transaction.on_commit(send)
