"""State machines kept as one transition table per model, next to the model (MAAS style).

A move is a compare-and-set ``UPDATE … WHERE pk = … AND state = <current>``: two concurrent moves
from the same state cannot both win, and the loser gets the same IllegalTransition as an illegal move.
"""

from collections.abc import Mapping

from django.db import models
from django.utils import timezone

from console.kernel.errors import Conflict


class IllegalTransition(Conflict):
    """A lifecycle move the model's transition table does not allow. Answered 409 everywhere."""

    code = "illegal_transition"


def check_transition(*, table: Mapping[str, frozenset[str]], noun: str, current: str, target: str) -> None:
    if target not in table.get(current, frozenset()):
        allowed = ", ".join(sorted(table.get(current, ()))) or "none"
        raise IllegalTransition(
            f"A {noun} cannot move from {current} to {target} (allowed from {current}: {allowed}).",
            current_state=current,
            requested_state=target,
        )


def transition(
    instance: models.Model,
    *,
    table: Mapping[str, frozenset[str]],
    target: str,
    field: str = "state",
    changed_at_field: str | None = "state_changed_at",
    **also_set,
) -> str:
    """Move ``instance`` to ``target`` if the table allows it; returns the state it left."""
    noun = instance._meta.verbose_name
    current = getattr(instance, field)
    check_transition(table=table, noun=noun, current=current, target=target)
    values = {field: target, **also_set}
    if changed_at_field:
        values[changed_at_field] = timezone.now()
    moved = type(instance).objects.filter(pk=instance.pk, **{field: current}).update(**values)
    if not moved:
        fresh = type(instance).objects.filter(pk=instance.pk).values_list(field, flat=True).first()
        raise IllegalTransition(
            f"The {noun} is no longer {current} (now {fresh}); refresh and try again.",
            current_state=fresh,
            requested_state=target,
        )
    for name, value in values.items():
        setattr(instance, name, value)
    return current
