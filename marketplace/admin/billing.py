"""Operators' side of billing: credit grants, credit lines, the price book, and read-only views of
the ledger, usage and invoices. Every write goes through a billing service, never a bare save."""

from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Q, Sum
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from console.kernel.admin import ReadOnlyAdmin, ServiceInline
from console.kernel.errors import DomainError
from marketplace.models import (
    BillingNotice,
    BillingProfile,
    Invoice,
    InvoiceLine,
    LedgerEntry,
    LedgerTransaction,
    OfferPrice,
    Organization,
    SpendAlert,
    UsageRecord,
)
from marketplace.money import cents
from marketplace.selectors.billing import balance_of
from marketplace.services.billing.credits import credits_grant, ledger_reverse
from marketplace.services.billing.pricing import offer_price_set
from marketplace.services.billing.spend import credit_limit_set


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


# --- Organizations: balance, credit grants, credit line -------------------------------------------


class GrantCreditsForm(forms.Form):
    amount = forms.DecimalField(label="Amount (USD)", min_value=0.01, max_digits=13, decimal_places=2)
    memo = forms.CharField(max_length=200, required=False, help_text="Why; shown in the ledger.")


class CreditLineForm(forms.Form):
    credit_limit = forms.DecimalField(label="Credit line (USD)", min_value=0, max_digits=14, decimal_places=2)


class OrganizationBillingMixin:
    """Mixed into OrganizationAdmin: a balance column and the grant / credit line pages."""

    @admin.display(description="balance")
    def balance_display(self, obj):
        if obj is None or obj.pk is None:  # the add page: no balance before there is a tenant
            return "-"
        balance = balance_of(organization_id=obj.pk)
        url = reverse("admin:marketplace_organization_grant_credits", args=[obj.pk])
        return format_html(
            "${} (held ${}, credit line ${}) &nbsp; <a class='button' href='{}'>Grant credits / credit line</a>",
            f"{cents(balance['balance']):,}",
            f"{cents(balance['held']):,}",
            f"{balance['credit_limit']:,}",
            url,
        )

    def get_urls(self):
        return [
            path(
                "<uuid:organization_id>/grant-credits/",
                self.admin_site.admin_view(self.grant_credits_view),
                name="marketplace_organization_grant_credits",
            ),
            *super().get_urls(),
        ]

    def grant_credits_view(self, request, organization_id):
        organization = get_object_or_404(Organization, pk=organization_id)
        if not request.user.has_perm("marketplace.add_ledgertransaction"):
            raise PermissionDenied
        grant = GrantCreditsForm(request.POST if "grant" in request.POST else None)
        line = CreditLineForm(
            request.POST if "credit_line" in request.POST else None,
            initial={"credit_limit": balance_of(organization_id=organization.pk)["credit_limit"]},
        )
        try:
            if "grant" in request.POST and grant.is_valid():
                credits_grant(
                    organization=organization,
                    amount=grant.cleaned_data["amount"],
                    memo=grant.cleaned_data["memo"],
                    by=request.user,
                )
                messages.success(request, f"Granted ${grant.cleaned_data['amount']:,} to {organization}.")
                return redirect(request.path)
            if "credit_line" in request.POST and line.is_valid():
                credit_limit_set(organization=organization, limit=line.cleaned_data["credit_limit"])
                messages.success(
                    request, f"Credit line of {organization} set to ${line.cleaned_data['credit_limit']:,}."
                )
                return redirect(request.path)
        except DomainError as error:
            messages.error(request, error.message)
        return TemplateResponse(
            request,
            "admin/marketplace/grant_credits.html",
            {
                **self.admin_site.each_context(request),
                "title": f"Credit for {organization}",
                "organization": organization,
                "balance": balance_of(organization_id=organization.pk),
                "grant_form": grant,
                "line_form": line,
                "recent": LedgerTransaction.objects.filter(organization=organization)
                .select_related("created_by")
                .order_by("-created_at")[:20],
                "opts": Organization._meta,
            },
        )


# --- The price book ----------------------------------------------------------------------------


class OfferPriceHistoryInline(ReadOnlyInline):
    """The price book so far: past, current and scheduled prices (never edited)."""

    model = OfferPrice
    verbose_name_plural = "price book"
    fields = ["effective_from", "price_per_gpu_hour", "note", "created_by", "created_at"]
    readonly_fields = fields
    ordering = ["-effective_from"]


class OfferPriceForm(forms.ModelForm):
    class Meta:
        model = OfferPrice
        fields = ["effective_from", "price_per_gpu_hour", "note"]

    def clean_effective_from(self):
        moment = self.cleaned_data["effective_from"]
        if moment < timezone.now() - timedelta(minutes=1):
            raise forms.ValidationError("Prices cannot be changed in the past; choose now or later.")
        return moment


class OfferPriceAddInline(ServiceInline, admin.TabularInline):
    """A new price from a moment on (now or later), scheduled through the pricing service; a refusal
    (e.g. a price from that very moment already exists) saves nothing of the page."""

    model = OfferPrice
    form = OfferPriceForm
    verbose_name = "new price"
    verbose_name_plural = "schedule a new price"
    fields = ["effective_from", "price_per_gpu_hour", "note"]
    extra = 1
    can_delete = False

    def get_queryset(self, request):
        return super().get_queryset(request).none()

    def create(self, request, parent, form):
        data = form.cleaned_data
        return offer_price_set(
            offer=parent,
            price_per_gpu_hour=data["price_per_gpu_hour"],
            effective_from=data["effective_from"],
            note=data.get("note") or "",
            by=request.user,
        )


# --- Ledger, usage, invoices: read-only --------------------------------------------------------


class LedgerEntryInline(ReadOnlyInline):
    model = LedgerEntry
    fields = ["account", "amount", "reservation"]
    readonly_fields = fields


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "kind", "organization", "amount", "memo", "created_by", "reverses"]
    list_filter = ["kind"]
    search_fields = ["organization__name", "organization__slug", "memo", "id"]
    list_select_related = ["organization", "created_by"]
    date_hierarchy = "created_at"
    inlines = [LedgerEntryInline]
    actions = ["reverse"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(moved=Sum("entries__amount", filter=Q(entries__amount__gt=0)))

    @admin.display(description="amount moved", ordering="moved")
    def amount(self, obj):
        return cents(obj.moved) if obj.moved is not None else None

    def has_reverse_permission(self, request):
        return request.user.has_perm("marketplace.add_ledgertransaction")

    @admin.action(description="Reverse selected credit grants", permissions=["reverse"])
    def reverse(self, request, queryset):
        done = 0
        for txn in queryset:
            try:
                ledger_reverse(txn=txn, memo=f"Reversed by {request.user.email}", by=request.user)
                done += 1
            except DomainError as error:
                messages.error(request, f"{txn}: {error.message}")
        if done:
            messages.success(request, f"Reversed {done} grant(s).")


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = ["reservation", "organization", "period", "seconds", "amount", "created_at"]
    search_fields = ["organization__slug", "reservation__id"]
    list_select_related = ["organization", "reservation__offer__site", "reservation__offer__accelerator_type"]
    date_hierarchy = "created_at"


class InvoiceLineInline(ReadOnlyInline):
    model = InvoiceLine
    fields = [
        "description",
        "gpu_hours",
        "price_per_gpu_hour",
        "amount",
        "energy_kwh",
        "replica_hours",
        "requests",
        "input_tokens",
    ]
    readonly_fields = fields


@admin.register(Invoice)
class InvoiceAdmin(ReadOnlyAdmin):
    list_display = ["number", "organization", "month", "total", "gpu_hours", "energy_kwh", "finalized_at"]
    list_filter = ["month"]
    search_fields = ["number", "organization__name", "organization__slug"]
    list_select_related = ["organization"]
    inlines = [InvoiceLineInline]


@admin.register(SpendAlert)
class SpendAlertAdmin(ReadOnlyAdmin):
    list_display = ["organization", "threshold", "last_notified_month", "created_at"]
    search_fields = ["organization__slug"]


@admin.register(BillingNotice)
class BillingNoticeAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "organization", "kind", "message"]
    list_filter = ["kind"]
    search_fields = ["organization__slug", "message"]


@admin.register(BillingProfile)
class BillingProfileAdmin(ReadOnlyAdmin):
    list_display = ["organization", "credit_limit", "depleted_at"]
    list_filter = [("depleted_at", admin.EmptyFieldListFilter)]
    search_fields = ["organization__slug", "organization__name"]
