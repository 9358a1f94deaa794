"""The admin as one more caller of the services (ARCHITECTURE invariant 5: operators' writes go through
the services like everyone else's).

``ServiceAdmin`` sends every save and delete of a model's admin pages (add, change, the list's editable
columns, delete, bulk delete) to three hooks, ``create``, ``update`` and ``delete``, each calling one
service; ``ServiceInline`` does the same for an inline's rows. A refusal (``DomainError``) rolls the
whole request back -- nothing is saved, nothing published (events leave after commit) -- and is shown:
a save renders its form again with the operator's input and the refusal on it, a delete or an action
says it in a message."""

from django.contrib import admin, messages
from django.core.exceptions import ImproperlyConfigured
from django.db import router, transaction
from django.http import HttpResponseRedirect
from django.urls import reverse

from console.kernel.errors import DomainError

_REFUSAL = "_service_refusal"  # on the request: the refusal of its first pass, and the row it was for
_EVERY_ROW = object()


def stored(obj):
    """The row as the database holds it: the admin's instance already carries the form's values."""
    return type(obj)._default_manager.get(pk=obj.pk)


def adopt(obj, saved) -> None:
    """Give the admin's instance what the service saved: the admin goes on with its own instance
    (inline rows point at it, the log and the redirect read it)."""
    for field in obj._meta.concrete_fields:
        setattr(obj, field.attname, getattr(saved, field.attname))
    obj._state.adding, obj._state.db = False, saved._state.db


def values(obj, form, names) -> dict:
    """The ``names`` a service takes: what the form says, else what the row ``obj`` holds (a field the
    page shows read-only, a column the list does not edit); with ``obj`` None (a new row), the form's."""
    data = form.cleaned_data
    return {name: data[name] if obj is None or name in data else getattr(obj, name) for name in names}


def _show(form, refusal: DomainError) -> None:
    form.add_error(None, refusal.message)
    for name, problems in (refusal.fields or {}).items():
        if name in form.fields and name in form.cleaned_data:
            form.add_error(name, problems)


def _refusing(form_class, refusal: DomainError, row=_EVERY_ROW):
    """``form_class``, failing its validation with ``refusal`` (for the one ``row`` of a list)."""

    class Refused(form_class):
        def clean(self):
            cleaned = super().clean()
            if row is _EVERY_ROW or self.instance.pk == row:
                _show(self, refusal)
            return cleaned

    Refused.__name__ = form_class.__name__
    return Refused


class ServiceAdmin(admin.ModelAdmin):
    """A ModelAdmin whose writes are services' (see the module). Override the hooks a model needs; one
    left alone refuses loudly. A model whose rows are not deleted says so with has_delete_permission."""

    def create(self, request, form):
        """Make the row ``form.cleaned_data`` describes through its service; return it."""
        raise NotImplementedError(f"{type(self).__name__} has no create() through a service")

    def update(self, request, obj, form):
        """Change ``obj`` (the row as stored) as ``form.cleaned_data`` asks, through its service; return it."""
        raise NotImplementedError(f"{type(self).__name__} has no update() through a service")

    def delete(self, request, obj) -> None:
        """Delete ``obj`` (or refuse) through its service."""
        raise NotImplementedError(f"{type(self).__name__} has no delete() through a service")

    # --- Django's write points, sent to the hooks ---

    def save_model(self, request, obj, form, change):
        try:
            saved = self.update(request, stored(obj), form) if change else self.create(request, form)
        except DomainError:
            setattr(request, _REFUSAL + "_row", obj.pk)
            raise
        adopt(obj, saved)

    def get_deleted_objects(self, objs, request):
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        # Rows the admin shows read-only (a node's GPUs) go with their row the way its service says;
        # deleting it takes the permission to delete it, not one the read-only admin never grants.
        read_only = {
            str(model._meta.verbose_name)
            for model, model_admin in self.admin_site._registry.items()
            if isinstance(model_admin, ReadOnlyAdmin)
        }
        return deleted, counts, perms_needed - read_only, protected

    def delete_model(self, request, obj):
        self.delete(request, stored(obj))

    def delete_queryset(self, request, queryset):
        # One by one through the service; a refusal of any undoes them all (the changelist says why).
        for obj in queryset:
            try:
                self.delete(request, obj)
            except DomainError as refusal:
                raise DomainError(f"Nothing deleted. {obj}: {refusal.message}", code=refusal.code) from refusal

    def save_formset(self, request, form, formset, change):
        inline = getattr(formset, "service_inline", None)
        if inline is not None:
            inline.save_rows(request, form.instance, formset)
        elif any(f.has_changed() for f in formset.forms) or (formset.can_delete and formset.deleted_forms):
            name = formset.model.__name__
            raise ImproperlyConfigured(f"{name} rows would be saved by the admin itself: make it a ServiceInline")
        else:  # a read-only inline: nothing to save, nothing for the change message
            formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []

    # --- Refusals: roll back, then show them ---

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change, **kwargs)
        refusal = getattr(request, _REFUSAL, None)
        return form if refusal is None else _refusing(form, refusal)

    def get_changelist_form(self, request, **kwargs):
        form = super().get_changelist_form(request, **kwargs)
        refusal = getattr(request, _REFUSAL, None)
        return form if refusal is None else _refusing(form, refusal, row=getattr(request, _REFUSAL + "_row", None))

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except DomainError as refusal:
            if request.method != "POST" or hasattr(request, _REFUSAL):
                raise
            # Django ran the save in one transaction, which the refusal undid. The page again, the
            # operator's input kept, with the refusal on the form (so it is not valid and saves nothing).
            setattr(request, _REFUSAL, refusal)
            return super().changeform_view(request, object_id, form_url, extra_context)

    def changelist_view(self, request, extra_context=None):
        if request.method != "POST":
            return super().changelist_view(request, extra_context)
        try:
            with transaction.atomic(using=router.db_for_write(self.model)):  # an action, too, is all or nothing
                return super().changelist_view(request, extra_context)
        except DomainError as refusal:
            if hasattr(request, _REFUSAL):
                raise
            if "_save" in request.POST and self.list_editable:  # the list's edits: shown on the row
                setattr(request, _REFUSAL, refusal)
                return super().changelist_view(request, extra_context)
            self.message_user(request, refusal.message, messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())

    def delete_view(self, request, object_id, extra_context=None):
        try:
            return super().delete_view(request, object_id, extra_context)
        except DomainError as refusal:
            self.message_user(request, f"Not deleted: {refusal.message}", messages.ERROR)
            opts = self.opts
            url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[object_id])
            return HttpResponseRedirect(url)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written only by services, agents and the lifecycle (and, for the ledger, immutable): look,
    never save -- a save from a page read a while ago would write its stale state back."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class ServiceInline:
    """Mixed into an inline of a ServiceAdmin (before TabularInline): its rows, too, are made, changed
    and deleted by hooks that call services. ``parent`` is the object the page is about."""

    def create(self, request, parent, form):
        raise NotImplementedError(f"{type(self).__name__} has no create() through a service")

    def update(self, request, obj, form):
        raise NotImplementedError(f"{type(self).__name__} has no update() through a service")

    def delete(self, request, obj) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no delete() through a service")

    def get_formset(self, request, obj=None, **kwargs):
        formset = super().get_formset(request, obj, **kwargs)
        formset.service_inline = self  # a fresh class per request: ServiceAdmin.save_formset reads it
        return formset

    def save_rows(self, request, parent, formset) -> None:
        deleted = set(formset.deleted_forms) if formset.can_delete else set()
        # The admin's change message reads these three.
        formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []
        for form in formset.initial_forms:
            if form in deleted:
                self.delete(request, stored(form.instance))
                formset.deleted_objects.append(form.instance)
            elif form.has_changed():
                adopt(form.instance, self.update(request, stored(form.instance), form))
                formset.changed_objects.append((form.instance, form.changed_data))
        for form in formset.extra_forms:
            if form.has_changed() and form not in deleted:
                adopt(form.instance, self.create(request, parent, form))
                formset.new_objects.append(form.instance)
