"""Placement reads the live allocations of one site's nodes of one kind through an index on (offer,
period): each allocation carries its reservation's offer.

The database copies it on every insert (a BEFORE INSERT trigger), whatever the writer sends: the
services, the tests and benchmarks that write rows by hand, and any writer to come, so the copy cannot
be wrong or missing. Existing rows get theirs from their reservations before the column becomes NOT
NULL."""

import django.contrib.postgres.indexes
import django.db.models.deletion
from django.db import migrations, models

BACKFILL = """
    UPDATE marketplace_allocation a SET offer_id = r.offer_id
    FROM marketplace_reservation r WHERE r.id = a.reservation_id
"""
TRIGGER = """
    CREATE FUNCTION marketplace_allocation_offer() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        SELECT r.offer_id INTO NEW.offer_id FROM marketplace_reservation r WHERE r.id = NEW.reservation_id;
        RETURN NEW;
    END $$;
    CREATE TRIGGER allocation_offer_from_reservation
        BEFORE INSERT OR UPDATE OF reservation_id, offer_id ON marketplace_allocation
        FOR EACH ROW EXECUTE FUNCTION marketplace_allocation_offer();
"""
DROP_TRIGGER = """
    DROP TRIGGER allocation_offer_from_reservation ON marketplace_allocation;
    DROP FUNCTION marketplace_allocation_offer();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("marketplace", "0010_endpoints"),
    ]

    operations = [
        migrations.AddField(
            model_name="allocation",
            name="offer",
            field=models.ForeignKey(
                db_index=False,
                editable=False,
                help_text="The reservation's offer, set by the database on insert (read by placement).",
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="marketplace.offer",
            ),
        ),
        migrations.RunSQL(BACKFILL, reverse_sql=migrations.RunSQL.noop),
        migrations.RunSQL(TRIGGER, reverse_sql=DROP_TRIGGER),
        migrations.AlterField(
            model_name="allocation",
            name="offer",
            field=models.ForeignKey(
                db_index=False,
                editable=False,
                help_text="The reservation's offer, set by the database on insert (read by placement).",
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="marketplace.offer",
            ),
        ),
        migrations.AddIndex(
            model_name="allocation",
            index=django.contrib.postgres.indexes.GistIndex(
                condition=models.Q(("live", True)),
                fields=["offer", "period"],
                include=("node", "gpus"),
                name="allocation_pool_period_idx",
            ),
        ),
    ]
