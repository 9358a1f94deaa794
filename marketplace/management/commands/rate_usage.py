"""Rate usage now (beat does it every BILLING_RATE_SECONDS), with a progress bar; with
--close-invoices, then finalize every ended month not yet invoiced.

    python manage.py rate_usage [--close-invoices]"""

from django.core.management.base import BaseCommand

from console.kernel.progress import Progress
from marketplace.selectors.billing import reservations_to_rate_count
from marketplace.services.billing.invoicing import invoices_close
from marketplace.services.billing.metering import usage_rate


class Command(BaseCommand):
    help = "Rate every active or just-ended reservation up to now (and optionally close invoices)."

    def add_arguments(self, parser):
        parser.add_argument("--close-invoices", action="store_true", help="Also finalize ended months.")

    def handle(self, *args, close_invoices=False, **options):
        bar = Progress("rating reservations", reservations_to_rate_count())
        totals = usage_rate(progress=bar.advance)
        bar.close()
        self.stdout.write(
            f"rated {totals['reservations']} reservations: {totals['records']} usage records, "
            f"{totals['settled']} settled"
        )
        if close_invoices:
            written = invoices_close()
            self.stdout.write(f"finalized {written} invoices")
