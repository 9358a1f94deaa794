"""Billing documents for download, one rendering for every surface (the portal and the API)."""

import csv
import io

from django.http import HttpResponse

from marketplace.models import Invoice
from marketplace.money import cents

INVOICE_CSV_COLUMNS = [
    "reservation",
    "description",
    "gpu_count",
    "gpu_hours",
    "price_per_gpu_hour",
    "amount",
    "energy_kwh",
    "endpoint",
    "replica_hours",
    "requests",
    "input_tokens",
]


def invoice_csv(invoice: Invoice) -> str:
    """An invoice as CSV: a row per line and a total row (what accounting tools import); amounts in
    cents, rounded as on every surface. A reservation's line leaves the endpoint's columns empty, an
    endpoint's line the reservation (and the price, where its replicas ran at different prices)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(INVOICE_CSV_COLUMNS)
    for line in invoice.lines.all():
        writer.writerow(
            [
                _blank(line.reservation_id),
                _inert(line.description),
                line.gpu_count,
                line.gpu_hours,
                _blank(line.price_per_gpu_hour),
                cents(line.amount),
                line.energy_kwh,
                _blank(line.endpoint_id),
                _blank(line.replica_hours),
                _blank(line.requests),
                _blank(line.input_tokens),
            ]
        )
    writer.writerow(["", "Total", "", invoice.gpu_hours, "", cents(invoice.total), invoice.energy_kwh, "", "", "", ""])
    return out.getvalue()


def invoice_csv_response(invoice: Invoice) -> HttpResponse:
    response = HttpResponse(invoice_csv(invoice), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{invoice.number}.csv"'
    return response


def _blank(value) -> object:
    """What a line does not have (an endpoint's line names no reservation, a reservation's no endpoint)."""
    return "" if value is None else value


def _inert(text: str) -> str:
    """Text a spreadsheet would run as a formula (site names are operators' free text), made inert."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@") else text
