"""A way into what was rented: SSH access to a reservation (``params.access``, the ``access`` command;
docs/agent-protocol.md, "Access (SSH)"), set up the same way by both host drivers. ``manager`` keeps
the records and the order of things, ``accounts`` whom the tenant logs in as, ``keys`` what it logs in
with, ``servers`` the server that lets it in (OpenSSH's sshd, or ``asyncssh_server`` where sshd cannot
run)."""

from provisioning.agent.drivers.access.keys import Keys, access_of
from provisioning.agent.drivers.access.manager import SshAccess

__all__ = ["Keys", "SshAccess", "access_of"]
