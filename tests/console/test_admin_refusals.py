"""console.kernel.admin.ServiceAdmin on every write point of a page: a service that writes and then
refuses leaves nothing written, and the operator is told why -- the form again on a save (the page
and the list's editable rows), a message on a delete, a bulk delete and an action."""

import pytest
from django.contrib import admin
from django.contrib.messages import get_messages
from django.urls import path, reverse

from console.kernel.admin import ServiceAdmin
from console.kernel.errors import DomainError
from marketplace.models import Quota
from marketplace.services.tenancy.members import quota_remove, quota_set
from tests.factories import AcceleratorTypeFactory, make_quota, make_tenant

pytestmark = [pytest.mark.django_db, pytest.mark.urls(__name__)]
FROZEN = "Quotas are frozen this week."


class RefusingQuotaAdmin(ServiceAdmin):
    """Each hook writes through the service first, then refuses: the refusal must undo the write."""

    list_display = ["organization", "accelerator_type", "max_gpus"]
    list_editable = ["max_gpus"]
    actions = ["zero"]

    def update(self, request, obj, form):
        quota_set(organization=obj.organization, accelerator_type=obj.accelerator_type, max_gpus=0)
        raise DomainError(FROZEN, fields={"max_gpus": ["Frozen."]})

    def delete(self, request, obj):
        quota_remove(organization=obj.organization, accelerator_type=obj.accelerator_type)
        raise DomainError(FROZEN)

    @admin.action(description="Set to zero")
    def zero(self, request, queryset):
        for quota in queryset:
            quota_set(organization=quota.organization, accelerator_type=quota.accelerator_type, max_gpus=0)
        raise DomainError(FROZEN)


site = admin.AdminSite(name="refusing")
site.register(Quota, RefusingQuotaAdmin)
urlpatterns = [path("refusing/", site.urls)]


@pytest.fixture
def quota(db):
    return make_quota(organization=make_tenant().organization, accelerator_type=AcceleratorTypeFactory(), max_gpus=64)


def url(name: str, *args) -> str:
    return reverse(f"refusing:marketplace_quota_{name}", args=args)


def said(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def test_a_refused_save_shows_the_form_again_with_the_reason(operator_client, quota):
    data = {"organization": quota.organization_id, "accelerator_type": quota.accelerator_type_id, "max_gpus": "8"}
    response = operator_client.post(url("change", quota.pk), data)
    assert response.status_code == 200 and FROZEN in response.content.decode()
    assert response.context["adminform"].form.errors["max_gpus"] == ["Frozen."]
    assert Quota.objects.get(pk=quota.pk).max_gpus == 64


def test_a_refused_row_of_the_list_is_shown_on_that_row(operator_client, quota):
    data = {"form-TOTAL_FORMS": "1", "form-INITIAL_FORMS": "1", "form-0-id": str(quota.pk)}
    response = operator_client.post(url("changelist"), {**data, "form-0-max_gpus": "8", "_save": "Save"})
    assert response.status_code == 200 and FROZEN in response.content.decode()
    assert response.context["cl"].formset.forms[0].errors["max_gpus"] == ["Frozen."]
    assert Quota.objects.get(pk=quota.pk).max_gpus == 64


def test_a_refused_delete_keeps_the_row_and_says_why(operator_client, quota):
    response = operator_client.post(url("delete", quota.pk), {"post": "yes"})
    assert response.status_code == 302 and response["Location"] == url("change", quota.pk)
    assert said(response) == [f"Not deleted: {FROZEN}"]
    assert Quota.objects.filter(pk=quota.pk).exists()


def test_a_refused_bulk_delete_deletes_none(operator_client, quota):
    other = make_quota(organization=quota.organization, accelerator_type=AcceleratorTypeFactory(slug="l4"), max_gpus=8)
    data = {"action": "delete_selected", "_selected_action": [quota.pk, other.pk], "post": "yes"}
    response = operator_client.post(url("changelist"), data)
    (message,) = said(response)
    assert response.status_code == 302 and message.startswith("Nothing deleted.") and message.endswith(FROZEN)
    assert Quota.objects.count() == 2


def test_a_refused_action_undoes_what_it_did(operator_client, quota):
    response = operator_client.post(url("changelist"), {"action": "zero", "_selected_action": [quota.pk]})
    assert response.status_code == 302 and said(response) == [FROZEN]
    assert Quota.objects.get(pk=quota.pk).max_gpus == 64
