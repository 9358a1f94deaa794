"""``{{ amount|usd }}``: money as the portal writes it everywhere ($1,234.56, -$12.00)."""

from django import template

from console.portal.billing import money

register = template.Library()


@register.filter
def usd(value) -> str:
    return money(value)
