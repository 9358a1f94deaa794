"""Sending Celery tasks from services: after the transaction commits (never before the row the task
speaks of exists), and without failing the request if the broker is briefly unreachable — the
reconcilers re-enqueue from rows (ARCHITECTURE invariant 2)."""

import logging

from django.db import transaction

logger = logging.getLogger(__name__)


def enqueue_on_commit(task, *args) -> None:
    def send():
        try:
            task.delay(*args)
        except Exception:  # noqa: BLE001 - the reconciler will find the work from its rows
            logger.exception("Could not enqueue %s%r; the reconciler will", task.name, args)

    transaction.on_commit(send)
