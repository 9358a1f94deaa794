"""Celery tasks of provisioning. Thin; safe to run twice."""

from celery import shared_task
from django.conf import settings

from provisioning.services.agents import node_commands_expire, node_commands_repush, nodes_mark_silent_offline
from provisioning.services.telemetry import rollups_expire


@shared_task(acks_late=True, ignore_result=True)
def provisioning_reconcile() -> dict[str, int]:
    """Fail commands past their deadline, push again the ones no agent acknowledged, and mark nodes
    whose agent went silent offline."""
    return {
        "expired": node_commands_expire(),
        "repushed": node_commands_repush(),
        "offline": nodes_mark_silent_offline(),
    }


@shared_task(ignore_result=True)
def telemetry_rollups_expire() -> int:
    return rollups_expire(days=settings.ROLLUP_RETENTION_DAYS)
