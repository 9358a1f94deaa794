"""Small helpers shared by the apps' admin modules."""

from django.contrib import admin


def annotated_column(name: str, description: str):
    """A sortable list column showing an annotation the admin's get_queryset adds."""

    @admin.display(description=description, ordering=name)
    def column(self, obj):
        return getattr(obj, name)

    column.__name__ = name
    return column
