import uuid

import pytest

from console.kernel.errors import DomainError
from provisioning.choices import NodeState
from provisioning.models import Gpu
from provisioning.services.fleet import GpuSpec, node_set_inventory
from tests.factories import AcceleratorTypeFactory, make_node

pytestmark = pytest.mark.django_db


def test_inventory_reconciles_gpus_by_uuid_and_summarises_the_node():
    node = make_node(gpus=8)
    before = list(Gpu.objects.filter(node=node).order_by("index"))
    h100 = before[0].accelerator_type
    # GPU 7 failed and was replaced; GPUs 0 and 1 swapped slots.
    replacement = f"GPU-{uuid.uuid4()}"
    specs = [GpuSpec(index=i, uuid=g.uuid, accelerator_type=h100, memory_mib=81920) for i, g in enumerate(before[:7])]
    specs[0], specs[1] = (
        GpuSpec(index=0, uuid=before[1].uuid, accelerator_type=h100, memory_mib=81920),
        GpuSpec(index=1, uuid=before[0].uuid, accelerator_type=h100, memory_mib=81920),
    )
    specs.append(GpuSpec(index=7, uuid=replacement, accelerator_type=h100, memory_mib=81920))
    node_set_inventory(node=node, gpus=specs)

    after = {g.uuid: g for g in Gpu.objects.filter(node=node)}
    assert len(after) == 8 and replacement in after and before[7].uuid not in after
    assert after[before[0].uuid].index == 1 and after[before[1].uuid].index == 0
    assert after[before[0].uuid].pk == before[0].pk  # same row, moved
    node.refresh_from_db()
    assert (node.accelerator_type, node.gpu_count) == (h100, 8)


def test_mixed_or_duplicate_inventory_is_refused_and_changes_nothing():
    node = make_node(gpus=2, state=NodeState.ENROLLING)
    h100 = node.accelerator_type
    l40s = AcceleratorTypeFactory(slug="l40s-48gb", model="L40S", memory_gib=48)
    before = set(Gpu.objects.filter(node=node).values_list("uuid", flat=True))
    with pytest.raises(DomainError, match="mixes"):
        node_set_inventory(
            node=node,
            gpus=[
                GpuSpec(index=0, uuid="GPU-a", accelerator_type=h100, memory_mib=1),
                GpuSpec(index=1, uuid="GPU-b", accelerator_type=l40s, memory_mib=1),
            ],
        )
    with pytest.raises(DomainError, match="twice"):
        node_set_inventory(
            node=node,
            gpus=[
                GpuSpec(index=0, uuid="GPU-a", accelerator_type=h100, memory_mib=1),
                GpuSpec(index=0, uuid="GPU-b", accelerator_type=h100, memory_mib=1),
            ],
        )
    assert set(Gpu.objects.filter(node=node).values_list("uuid", flat=True)) == before
