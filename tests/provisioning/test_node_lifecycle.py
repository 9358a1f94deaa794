import threading

import pytest
from django.db import connection
from rest_framework.test import APIRequestFactory

from console.kernel.errors import api_exception_handler
from console.kernel.lifecycle import IllegalTransition
from provisioning.choices import NodeState
from provisioning.models import NODE_TRANSITIONS, Node, NodeStateChange
from provisioning.services.fleet import node_transition
from tests.factories import make_node

ALL_MOVES = [(a, b) for a in NodeState.values for b in NodeState.values]
LEGAL = [(a, b) for a, b in ALL_MOVES if b in NODE_TRANSITIONS[a]]
ILLEGAL = [(a, b) for a, b in ALL_MOVES if b not in NODE_TRANSITIONS[a]]


def test_the_table_matches_the_architecture():
    """enrolling → available ⇄ draining → maintenance; offline when heartbeats stop; back to available."""
    assert set(LEGAL) == {
        ("enrolling", "available"),
        ("enrolling", "offline"),
        ("available", "draining"),
        ("available", "offline"),
        ("draining", "available"),
        ("draining", "maintenance"),
        ("draining", "offline"),
        ("maintenance", "available"),
        ("maintenance", "offline"),
        ("offline", "available"),
        ("offline", "maintenance"),
    }
    assert ("available", "maintenance") in ILLEGAL  # drain first: running work must finish
    assert all((s, s) in ILLEGAL for s in NodeState.values)


@pytest.mark.django_db
@pytest.mark.parametrize("source,target", LEGAL)
def test_every_legal_move_happens_and_is_recorded(source, target):
    node = make_node(state=source)
    node_transition(node=node, target=target, actor="ops@example.com", reason="test")
    node.refresh_from_db()
    assert node.state == target
    change = NodeStateChange.objects.filter(node=node).first()
    assert (change.from_state, change.to_state, change.actor) == (source, target, "ops@example.com")


@pytest.mark.django_db
@pytest.mark.parametrize("source,target", ILLEGAL)
def test_every_illegal_move_is_refused_and_changes_nothing(source, target):
    node = make_node(state=source)
    history = NodeStateChange.objects.filter(node=node).count()
    with pytest.raises(IllegalTransition) as refused:
        node_transition(node=node, target=target)
    assert refused.value.status_code == 409
    assert source in refused.value.message and target in refused.value.message
    node.refresh_from_db()
    assert node.state == source
    assert NodeStateChange.objects.filter(node=node).count() == history


@pytest.mark.django_db
def test_a_stale_copy_cannot_move_a_node_that_moved_meanwhile():
    node = make_node(state=NodeState.AVAILABLE)
    stale = Node.objects.get(pk=node.pk)
    node_transition(node=node, target=NodeState.DRAINING)
    node_transition(node=node, target=NodeState.MAINTENANCE)
    with pytest.raises(IllegalTransition, match="no longer available"):
        node_transition(node=stale, target=NodeState.OFFLINE)  # legal from available, but it is not


@pytest.mark.django_db(transaction=True)
def test_concurrent_moves_from_one_state_have_one_winner():
    node = make_node(state=NodeState.AVAILABLE)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def move(target):
        try:
            copy = Node.objects.get(pk=node.pk)  # every racer saw the node available
            barrier.wait()
            node_transition(node=copy, target=target)
            outcomes.append("won")
        except IllegalTransition:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=move, args=(t,)) for t in [NodeState.DRAINING, NodeState.OFFLINE] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]
    assert NodeStateChange.objects.filter(node=node, from_state=NodeState.AVAILABLE).count() == 1


def test_the_api_answers_an_illegal_transition_with_409_in_the_error_shape():
    request = APIRequestFactory().post("/api/v1/anything/")
    response = api_exception_handler(
        IllegalTransition("A node cannot move from available to maintenance.", current_state="available"),
        {"request": request},
    )
    assert response.status_code == 409
    assert response.data["error"]["code"] == "illegal_transition"
    assert response.data["error"]["message"] == "A node cannot move from available to maintenance."
