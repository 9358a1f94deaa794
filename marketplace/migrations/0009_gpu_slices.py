"""GPU slices: an allocation holds a range of its node's GPUs, an offer rents instances of some GPUs.

Existing allocations held whole nodes, so they get the node's full range; existing offers rented whole
nodes, so an instance is their node. The exclusion constraint is replaced in the same transaction, so
no moment exists without one."""

import django.contrib.postgres.constraints
import django.contrib.postgres.fields.ranges
import django.core.validators
from django.db import migrations, models

WHOLE_RANGES = """
    UPDATE marketplace_allocation a SET gpus = int4range(0, n.gpu_count)
    FROM provisioning_node n WHERE n.id = a.node_id
"""


class Migration(migrations.Migration):
    dependencies = [
        ("marketplace", "0008_released_early"),
        ("provisioning", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="offer",
            name="gpus_per_instance",
            field=models.PositiveSmallIntegerField(
                default=8,
                help_text="GPUs one instance holds: 1, 2, 4 or 8 of a node, or the whole node (gpus per node).",
                validators=[django.core.validators.MinValueValidator(1)],
            ),
        ),
        migrations.RunSQL(
            "UPDATE marketplace_offer SET gpus_per_instance = gpus_per_node", reverse_sql=migrations.RunSQL.noop
        ),
        migrations.AlterField(
            model_name="offer",
            name="gpus_per_node",
            field=models.PositiveSmallIntegerField(
                default=8,
                help_text="GPUs of the nodes it runs on (exactly).",
                validators=[django.core.validators.MinValueValidator(1)],
            ),
        ),
        migrations.RemoveConstraint(model_name="offer", name="offer_unique_shape_per_site"),
        migrations.AddConstraint(
            model_name="offer",
            constraint=models.UniqueConstraint(
                fields=("site", "accelerator_type", "shape", "gpus_per_node", "gpus_per_instance"),
                name="offer_unique_shape_per_site",
            ),
        ),
        migrations.AddConstraint(
            model_name="offer",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("gpus_per_instance", models.F("gpus_per_node")),
                    models.Q(
                        ("gpus_per_instance__in", (1, 2, 4, 8)),
                        ("shape", "node"),
                        ("gpus_per_instance__lt", models.F("gpus_per_node")),
                        ("gpus_per_node__lte", 32),
                    ),
                    _connector="OR",
                ),
                name="offer_instance_fits_node",
            ),
        ),
        migrations.AddField(
            model_name="allocation",
            name="gpus",
            field=django.contrib.postgres.fields.ranges.IntegerRangeField(
                null=True, help_text="The node's GPU indices held, half-open [first, last + 1)."
            ),
        ),
        migrations.RunSQL(WHOLE_RANGES, reverse_sql=migrations.RunSQL.noop),
        migrations.AlterField(
            model_name="allocation",
            name="gpus",
            field=django.contrib.postgres.fields.ranges.IntegerRangeField(
                help_text="The node's GPU indices held, half-open [first, last + 1)."
            ),
        ),
        migrations.RemoveConstraint(model_name="allocation", name="allocation_no_overlap"),
        migrations.AddConstraint(
            model_name="allocation",
            constraint=django.contrib.postgres.constraints.ExclusionConstraint(
                condition=models.Q(("live", True)),
                expressions=[("node", "="), ("gpus", "&&"), ("period", "&&")],
                name="allocation_no_overlap",
            ),
        ),
        migrations.AddConstraint(
            model_name="allocation",
            constraint=models.CheckConstraint(
                condition=models.Q(("gpus__isempty", False), ("gpus__startswith__gte", 0)),
                name="allocation_gpus_valid",
            ),
        ),
    ]
