"""Writes of billing: the price book, the ledger, credits, metering, spend control and invoices (docs/billing.md)."""
