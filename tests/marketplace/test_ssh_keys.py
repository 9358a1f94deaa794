"""SSH public keys (issue 15, item 1): every accepted type, short RSA, garbage, private keys pasted by
mistake, duplicates, fingerprints as ssh-keygen shows them, who may add, see and remove what."""

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from django.test import Client

from console.kernel.errors import Conflict, DomainError, Forbidden
from marketplace.choices import Role
from marketplace.models import SshKey
from marketplace.selectors.tenancy import ssh_key_list
from marketplace.services.tenancy.members import membership_set
from marketplace.services.tenancy.ssh_keys import ssh_key_add, ssh_key_parse, ssh_key_remove
from marketplace.tenant_context import TenantContext
from tests.conftest import key_client
from tests.factories import PASSWORD, make_tenant

pytestmark = pytest.mark.django_db
URL = "/api/v1/ssh-keys/"


def openssh_public(private, comment: str = "me@laptop") -> str:
    line = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{line.decode()} {comment}"


def openssh_private(private) -> str:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()


def expected_fingerprint(line: str) -> str:
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("private", "key_type", "bits"),
    [
        (ed25519.Ed25519PrivateKey.generate(), "ssh-ed25519", 256),
        (ec.generate_private_key(ec.SECP256R1()), "ecdsa-sha2-nistp256", 256),
        (ec.generate_private_key(ec.SECP384R1()), "ecdsa-sha2-nistp384", 384),
        (ec.generate_private_key(ec.SECP521R1()), "ecdsa-sha2-nistp521", 521),
        (rsa.generate_private_key(public_exponent=65537, key_size=3072), "ssh-rsa", 3072),
    ],
    ids=["ed25519", "p256", "p384", "p521", "rsa3072"],
)
def test_every_accepted_type_is_read_with_its_fingerprint_and_comment(private, key_type, bits):
    line = openssh_public(private)
    parsed = ssh_key_parse(line)
    assert (parsed.key_type, parsed.bits, parsed.comment) == (key_type, bits, "me@laptop")
    assert parsed.fingerprint == expected_fingerprint(line)
    assert parsed.public_key == " ".join(line.split()[:2])


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "Paste a public key"),
        ("ssh-ed25519", "<type> <base64>"),
        ("ssh-ed25519 not-base64!!", "not an OpenSSH public key"),
        ("hello world how are you", "hello keys are not accepted"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA== x", "not an OpenSSH public key"),
    ],
)
def test_garbage_is_refused_with_what_would_be_taken(text, says):
    with pytest.raises(DomainError, match=says):
        ssh_key_parse(text)


def test_a_short_rsa_key_is_refused_and_says_how_to_make_a_good_one():
    with pytest.raises(DomainError, match="2048 bits; at least 3072") as refused:
        ssh_key_parse(openssh_public(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    assert refused.value.code == "ssh_key_too_short" and "ssh-keygen -t ed25519" in refused.value.message


def test_a_dsa_key_is_refused_by_type():
    private = dsa.generate_private_key(key_size=1024)  # noqa: S505 - the only size OpenSSH wrote; refused
    with pytest.raises(DomainError, match="not accepted"):
        ssh_key_parse(openssh_public(private))


def test_a_mislabelled_key_is_refused():
    line = openssh_public(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(DomainError):
        ssh_key_parse(line.replace("ssh-ed25519", "ssh-rsa", 1))


@pytest.mark.parametrize(
    "private",
    [
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(public_exponent=65537, key_size=3072),
    ],
    ids=["openssh-ed25519", "openssh-rsa"],
)
def test_a_private_key_pasted_by_mistake_is_refused_and_nothing_is_kept(private, caplog):
    tenant = make_tenant(role=Role.MEMBER)
    pasted = openssh_private(private)
    with pytest.raises(DomainError, match="That is a private key") as refused:
        ssh_key_add(tenant=tenant, public_key=pasted)
    assert refused.value.code == "private_key_pasted"
    assert not SshKey.objects.exists()
    secret_line = pasted.splitlines()[1]
    assert secret_line not in caplog.text


def test_a_key_is_added_once_per_owner_and_shared_keys_are_the_admins():
    member = make_tenant(role=Role.MEMBER)
    line = openssh_public(ed25519.Ed25519PrivateKey.generate(), "laptop")
    key = ssh_key_add(tenant=member, public_key=line)
    assert (key.name, key.owner, key.key_type) == ("laptop", member.user, "ssh-ed25519")
    with pytest.raises(Conflict, match="already added as laptop"):
        ssh_key_add(tenant=member, public_key=line, name="again")
    with pytest.raises(Forbidden):
        ssh_key_add(tenant=member, public_key=line, shared=True)
    viewer = make_tenant(role=Role.VIEWER)
    with pytest.raises(Forbidden):
        ssh_key_add(tenant=viewer, public_key=line)


def test_members_see_their_own_and_shared_keys_and_remove_only_their_own():
    owner = make_tenant(role=Role.OWNER)
    shared = ssh_key_add(tenant=owner, public_key=openssh_public(ed25519.Ed25519PrivateKey.generate()), shared=True)
    member = make_tenant(role=Role.MEMBER)
    membership_set(organization=owner.organization, user=member.user, role=Role.MEMBER)
    member = TenantContext(organization=owner.organization, user=member.user, role=Role.MEMBER)
    mine = ssh_key_add(tenant=member, public_key=openssh_public(ed25519.Ed25519PrivateKey.generate(), "mine"))
    owners_own = ssh_key_add(tenant=owner, public_key=openssh_public(ed25519.Ed25519PrivateKey.generate(), "boss"))
    assert set(ssh_key_list(tenant=member)) == {shared, mine}
    assert set(ssh_key_list(tenant=owner)) == {shared, mine, owners_own}
    with pytest.raises(Forbidden):
        ssh_key_remove(tenant=member, key=shared)
    ssh_key_remove(tenant=member, key=mine)
    ssh_key_remove(tenant=owner, key=shared)
    assert list(SshKey.objects.all()) == [owners_own]


def test_the_api_adds_lists_and_removes_keys_sealed_per_organization():
    tenant = make_tenant(role=Role.MEMBER)
    api = key_client(tenant)
    line = openssh_public(ec.generate_private_key(ec.SECP256R1()), "work")
    created = api.post(URL, {"public_key": line}, format="json")
    assert created.status_code == 201, created.json()
    body = created.json()
    assert (body["name"], body["key_type"], body["shared"]) == ("work", "ecdsa-sha2-nistp256", False)
    assert body["fingerprint"] == expected_fingerprint(line) and body["owner"] == tenant.user.email
    assert [k["id"] for k in api.get(URL).json()["results"]] == [body["id"]]
    duplicate = api.post(URL, {"public_key": line}, format="json")
    assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "ssh_key_exists"
    short = api.post(URL, {"public_key": openssh_public(rsa.generate_private_key(65537, 2048))}, format="json")
    assert short.status_code == 400 and "public_key" in short.json()["error"]["fields"]
    stranger = key_client(make_tenant())
    assert stranger.get(URL).json()["results"] == []
    assert stranger.delete(f"{URL}{body['id']}/").status_code == 404
    assert api.delete(f"{URL}{body['id']}/").status_code == 204
    assert api.get(URL).json()["results"] == []


def test_the_portal_page_adds_shows_and_removes_a_key():
    tenant = make_tenant(role=Role.MEMBER)
    browser = Client()
    assert browser.login(username=tenant.user.email, password=PASSWORD)
    line = openssh_public(ed25519.Ed25519PrivateKey.generate(), "desk")
    page = browser.post("/ssh-keys/", {"public_key": line}, follow=True).content.decode()
    assert expected_fingerprint(line) in page and "desk" in page
    refused = browser.post("/ssh-keys/", {"public_key": openssh_private(ed25519.Ed25519PrivateKey.generate())})
    assert refused.status_code == 400 and "That is a private key" in refused.content.decode()
    key = SshKey.objects.get()
    assert "No SSH keys yet" in browser.post(f"/ssh-keys/{key.id}/remove/", follow=True).content.decode()
