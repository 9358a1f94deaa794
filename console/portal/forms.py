from django import forms

from marketplace.choices import Role


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
