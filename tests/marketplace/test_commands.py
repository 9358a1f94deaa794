"""Operator commands, run as scripts would run them: a separate process, output captured."""

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from marketplace.models import ApiKey, Membership, Organization
from marketplace.services.tenancy.api_keys import api_key_authenticate
from tests.processes import manage


@pytest.mark.django_db(transaction=True)
def test_create_tenant_then_create_api_key_from_a_script():
    db_name = settings.DATABASES["default"]["NAME"]
    made = manage("create_tenant", "Initech Labs", "--owner", "boss@initech.example", db_name=db_name)
    assert made.returncode == 0, made.stderr
    slug, org_id = made.stdout.strip().split("\t")
    assert slug == "initech-labs" and Organization.objects.get(id=org_id).name == "Initech Labs"
    assert Membership.objects.get(organization_id=org_id).role == "owner"

    keyed = manage(
        "create_api_key",
        slug,
        "--user",
        "boss@initech.example",
        "--name",
        "ci",
        "--expires-in-days",
        "7",
        db_name=db_name,
    )
    assert keyed.returncode == 0, keyed.stderr
    plaintext = keyed.stdout.strip()
    assert plaintext.count("\n") == 0 and plaintext.startswith("nck_")
    key = api_key_authenticate(raw_key=plaintext)
    assert key.organization.slug == slug and key.expires_at is not None
    assert plaintext not in keyed.stderr  # printed once, to stdout only


@pytest.mark.django_db
def test_commands_refuse_clearly():
    call_command("create_tenant", "Acme", "--owner", "a@acme.example")
    with pytest.raises(CommandError, match="already exists"):
        call_command("create_tenant", "Acme", "--owner", "b@acme.example")
    with pytest.raises(CommandError, match="No organization"):
        call_command("create_api_key", "nope", "--user", "a@acme.example")
    with pytest.raises(CommandError, match="not a member"):
        call_command("create_api_key", "acme", "--user", "stranger@example.com")
    with pytest.raises(CommandError, match="positive"):
        call_command("create_api_key", "acme", "--user", "a@acme.example", "--expires-in-days", "0")
    assert not ApiKey.objects.exists()
