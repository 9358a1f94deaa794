"""Writes to the catalog of models operators serve."""

from django.db import transaction

from console.kernel.errors import clean_or_refuse, delete_or_refuse
from marketplace.models import ServedModel


@transaction.atomic
def served_model_create(*, accelerator_types=(), **fields) -> ServedModel:
    """A model operators offer to serve (``fields``: ServedModel's), on ``accelerator_types``."""
    model = ServedModel(**fields)
    clean_or_refuse(model)
    model.save()
    model.accelerator_types.set(accelerator_types)
    return model


@transaction.atomic
def served_model_update(*, model: ServedModel, accelerator_types=None, **fields) -> ServedModel:
    """Endpoints already deployed keep their running replicas; new replicas start the model as it is now."""
    for name, value in fields.items():
        setattr(model, name, value)
    clean_or_refuse(model)
    model.save()
    if accelerator_types is not None:
        model.accelerator_types.set(accelerator_types)
    return model


def served_model_delete(*, model: ServedModel) -> None:
    """Only a model no endpoint ever used; one that was is made inactive instead."""
    delete_or_refuse(model, noun="model")
