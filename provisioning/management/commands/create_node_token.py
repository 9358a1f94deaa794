"""Create one-time bootstrap tokens for node agents to enrol with.

    python manage.py create_node_token fra-hall-1-r01-n01            # prints the token
    python manage.py create_node_token --unenrolled --json > tokens.json   # every node without a secret

The JSON form is what `neocloud-agent fleet --tokens FILE` reads."""

import json as jsonlib

from django.core.management.base import BaseCommand, CommandError

from provisioning.models import Node
from provisioning.selectors.fleet import node_hardware_hints
from provisioning.services.agents import bootstrap_token_create


class Command(BaseCommand):
    help = "Create one-time bootstrap tokens for node agents."

    def add_arguments(self, parser):
        parser.add_argument("hostnames", nargs="*", help="Nodes to create tokens for.")
        parser.add_argument("--unenrolled", action="store_true", help="Every node that has no agent secret yet.")
        parser.add_argument("--hours", type=int, help="Validity in hours (default BOOTSTRAP_TOKEN_HOURS).")
        parser.add_argument("--json", action="store_true", help='Print [{"hostname", "token"}, ...].')

    def handle(self, *args, hostnames, unenrolled, hours=None, **options):
        if hours is not None and hours <= 0:
            raise CommandError("--hours must be positive.")
        nodes = list(Node.objects.filter(hostname__in=[h.lower() for h in hostnames]).select_related("rack"))
        missing = set(h.lower() for h in hostnames) - {n.hostname for n in nodes}
        if missing:
            raise CommandError(f"No such node: {', '.join(sorted(missing))}.")
        if unenrolled:
            nodes += list(Node.objects.filter(credential__isnull=True).exclude(pk__in=[n.pk for n in nodes]))
        if not nodes:
            raise CommandError("Name at least one node, or use --unenrolled.")
        tokens = [
            {
                "hostname": node.hostname,
                "token": bootstrap_token_create(node=node, actor="manage.py", hours=hours),
                **node_hardware_hints(node),
            }
            for node in sorted(nodes, key=lambda n: n.hostname)
        ]
        if options["json"]:
            self.stdout.write(_dumps(tokens))
        else:
            for entry in tokens:
                self.stdout.write(f"{entry['hostname']}\t{entry['token']}")


def _dumps(value) -> str:
    return jsonlib.dumps(value, indent=2)
