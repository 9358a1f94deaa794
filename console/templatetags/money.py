"""``{{ amount|usd }}``: money as the portal writes it everywhere ($1,234.56, -$12.00)."""

from django import template

register = template.Library()


@register.filter
def usd(value) -> str:
    from console.portal.billing import money

    return money(value)
