"""The portal's forms (times are UTC), and ``refused_field``: a refusal naming a field is shown on it."""

from decimal import Decimal

from django import forms

from console.kernel.errors import DomainError
from marketplace.choices import Role
from marketplace.models import PlacementPreference, ServedModel
from marketplace.models.endpoints import MAX_REPLICAS
from marketplace.services.reservations.lifecycle import MAX_DURATION_HOURS
from provisioning.models import AcceleratorType, Site

MIN_HOURS = Decimal("0.02")


def hours_field(**kwargs) -> forms.DecimalField:
    """A number of hours, bounded by value and refused in hours (never in digits); the service then
    holds it to what the offer allows."""
    return forms.DecimalField(
        min_value=MIN_HOURS,
        max_value=Decimal(MAX_DURATION_HOURS),
        required=False,
        error_messages={
            "invalid": "A number of hours, e.g. 1.5.",
            "min_value": f"At least {MIN_HOURS} hours.",
            "max_value": f"At most {MAX_DURATION_HOURS:,} hours.",
        },
        **kwargs,
    )


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100, widget=forms.TextInput(attrs={"placeholder": "e.g. CI pipeline"}))
    role = forms.ChoiceField(choices=Role.choices, initial=Role.MEMBER, required=False)
    expires_in_days = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=3650,
        label="Expires in (days)",
        help_text="Leave empty for a key that does not expire.",
    )


class ReserveForm(forms.Form):
    """Reserve from an offer. Times are UTC (the console shows every time in UTC)."""

    quantity = forms.IntegerField(min_value=1, max_value=10_000, initial=1, label="Nodes")
    start = forms.DateTimeField(
        required=False,
        label="Start (UTC)",
        help_text="Leave empty to start now.",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"],
    )
    duration_hours = hours_field(
        initial=1, label="Duration (hours)", help_text="On demand only: a reserved term lasts its months."
    )
    # Choices are the offer's terms, set by the view; empty is on demand.
    term_months = forms.TypedChoiceField(
        choices=[("", "On demand")],
        coerce=int,
        empty_value=None,
        required=False,
        label="Pricing",
        widget=forms.Select(attrs={"data-term-select": ""}),
    )
    idempotency_key = forms.CharField(widget=forms.HiddenInput, required=False)
    # Choices set by the view: the images suiting the offer, the keys the tenant may install.
    image = forms.ChoiceField(choices=[], required=False, label="Image")
    ssh_keys = forms.MultipleChoiceField(
        choices=[], required=False, label="SSH keys", widget=forms.CheckboxSelectMultiple
    )

    def clean(self):
        data = super().clean()
        on_demand = data.get("term_months") is None
        if on_demand and data.get("duration_hours") is None and "duration_hours" not in self.errors:
            self.add_error("duration_hours", "How many hours? (Or choose a reserved term.)")
        return data


class SpendAlertForm(forms.Form):
    """A monthly spend threshold; the service checks it again (and for duplicates)."""

    threshold = forms.DecimalField(
        min_value=Decimal("0.01"),
        max_digits=13,
        decimal_places=2,
        label="Alert at ($ this month)",
        widget=forms.NumberInput(attrs={"step": "0.01", "min": "0.01", "placeholder": "e.g. 5000"}),
    )


class ExtendForm(forms.Form):
    """A new end, or hours more after the current end."""

    end = forms.DateTimeField(
        required=False,
        label="New end (UTC)",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"],
    )
    duration_hours = hours_field(initial=1, label="or hours more", help_text="Added to the current end.")

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        if (data.get("end") is None) == (data.get("duration_hours") is None):
            self.add_error("end", "Give either a new end or the hours to add.")
        return data


def _replicas_field(label: str, initial: int, least: int = 1) -> forms.IntegerField:
    return forms.IntegerField(min_value=least, max_value=MAX_REPLICAS, initial=initial, label=label)


def _concurrency_field() -> forms.IntegerField:
    return forms.IntegerField(
        min_value=1, max_value=1000, initial=8, label="Target concurrency", help_text="Requests in flight per replica."
    )


class EndpointForm(forms.Form):
    """Deploy a served model as an endpoint. The choices (models, regions, sites, accelerator types)
    are set by the view from their selectors; the service checks every rule again."""

    name = forms.SlugField(
        max_length=64,
        help_text="What clients send as model; unique in your organization.",
        widget=forms.TextInput(attrs={"placeholder": "e.g. embed"}),
    )
    model = forms.ModelChoiceField(queryset=ServedModel.objects.none(), to_field_name="slug", empty_label=None)
    region = forms.ChoiceField(choices=[], help_text="Where the endpoint's users are.")
    placement = forms.ChoiceField(
        choices=PlacementPreference.choices,
        initial=PlacementPreference.NEAREST,
        widget=forms.Select(attrs={"data-placement-select": ""}),
    )
    pinned_sites = forms.ModelMultipleChoiceField(
        queryset=Site.objects.none(), to_field_name="slug", required=False, help_text="Pinned placement only."
    )
    accelerator_types = forms.ModelMultipleChoiceField(
        queryset=AcceleratorType.objects.none(),
        to_field_name="slug",
        required=False,
        label="Allowed accelerator types",
        help_text="None chosen: any the model runs on.",
    )
    min_replicas = _replicas_field("Min replicas", 1, least=0)
    max_replicas = _replicas_field("Max replicas", 1)
    target_concurrency = _concurrency_field()
    idempotency_key = forms.CharField(widget=forms.HiddenInput, required=False)


class EndpointScaleForm(forms.Form):
    """New scaling bounds; the service holds min to max and places or stops replicas."""

    min_replicas = _replicas_field("Min replicas", 1, least=0)
    max_replicas = _replicas_field("Max replicas", 1)
    target_concurrency = _concurrency_field()


def refused_field(form: forms.Form, error: DomainError) -> str | None:
    """The form's field a refusal names, so it is shown there; None (the whole form) if none."""
    return next((name for name in error.fields or {} if name in form.fields), None)


class SshKeyForm(forms.Form):
    public_key = forms.CharField(
        label="Public key",
        max_length=20_000,
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": "ssh-ed25519 AAAA… you@laptop"}),
        help_text="The one line of your .pub file (cat ~/.ssh/id_ed25519.pub).",
    )
    name = forms.CharField(label="Name", max_length=100, required=False, help_text="Default: the key's comment.")
    shared = forms.BooleanField(label="Shared by the organization", required=False)
