"""Money in templates, rounded by ``marketplace.money.cents`` like every other surface:
``{{ amount|usd }}`` as the portal writes it ($1,234.56, -$12.00), ``{{ price|cents }}`` the bare figure
(2.49) where the page writes the unit itself."""

from decimal import Decimal

from django import template

from console.portal.billing import money
from marketplace.money import cents as to_cents

register = template.Library()


@register.filter
def usd(value) -> str:
    return money(value)


@register.filter
def cents(value) -> str:
    return "" if value is None else str(to_cents(Decimal(value)))
