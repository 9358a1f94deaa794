"""Serializer fields the API shares: money as a decimal string of cents, rounded once by marketplace.money.cents."""

from decimal import Decimal

from rest_framework import serializers

from marketplace.money import cents


class MoneyField(serializers.DecimalField):
    """Dollars and cents, as a string, rounded by ``marketplace.money.cents`` as on every surface."""

    def __init__(self, *, max_digits: int = 14, **kwargs):
        super().__init__(max_digits=max_digits, decimal_places=2, **kwargs)

    def to_representation(self, value) -> str:
        amount = value if isinstance(value, Decimal) else Decimal(str(value).strip())
        return super().to_representation(cents(amount))
