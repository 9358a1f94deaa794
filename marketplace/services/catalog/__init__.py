"""Writes of the catalog: offers and their reserved-term discounts."""
