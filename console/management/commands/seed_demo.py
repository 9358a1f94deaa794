import json
from pathlib import Path

from django.core.management.base import BaseCommand

from console.demo import (
    demo_agent_tokens,
    demo_api_key_write,
    demo_credentials,
    seed_demo,
    seed_demo_access,
    seed_demo_endpoint,
    seed_demo_latencies,
    seed_past_month,
)
from console.kernel.errors import DomainError


class Command(BaseCommand):
    help = "Seed the demo fleet, catalog and tenants (does nothing if a fleet exists)."

    def add_arguments(self, parser):
        parser.add_argument("--agent-tokens", type=Path, help="Write the simulated fleet host's tokens file here.")
        parser.add_argument("--agent-state", type=Path, help="The fleet host's state directory (with --agent-tokens).")
        parser.add_argument(
            "--api-key-file", type=Path, help="Write an API key of Acme AI here (mode 0600), to call its endpoint."
        )
        parser.add_argument(
            "--ssh-key-file",
            type=Path,
            help="Write an SSH key pair of Acme AI's member here (private key 0600); reserve a slice it logs into.",
        )

    def handle(self, *args, agent_tokens=None, agent_state=None, api_key_file=None, ssh_key_file=None, **options):
        created = seed_demo()
        self.stdout.write("Seeded the demo world." if created else "The database already has a fleet; left as is.")
        if not created and seed_demo_latencies():  # an older demo database: its sites' round trips
            self.stdout.write("Seeded the round trips from the demo's regions to its sites (measured ones).")
        try:
            if seed_past_month():
                self.stdout.write("Seeded a finished past month for Acme AI: its invoice is on the billing page.")
        except DomainError as error:  # an older demo database whose history is in the way: go on without
            self.stdout.write(f"Left out the finished past month: {error.message}")
        try:
            endpoint, made = seed_demo_endpoint()
            if made:
                self.stdout.write(
                    f"Seeded Acme AI's inference endpoint {endpoint.name!r} ({endpoint.model}): its first replica "
                    "starts once the agents connect."
                )
        except DomainError as error:  # no room or no balance left in an older demo database: go on without
            self.stdout.write(f"Left out the demo's inference endpoint: {error.message}")
        if ssh_key_file:
            try:
                reservation = seed_demo_access(ssh_key_file)
                if reservation is not None:
                    self.stdout.write(
                        f"Acme AI's reservation {reservation.pk} lets the key {ssh_key_file} in: its connect command "
                        "is printed once it is active."
                    )
            except DomainError as error:  # no room or no balance left in an older demo database
                self.stdout.write(f"Left out the demo's SSH reservation: {error.message}")
        if api_key_file and demo_api_key_write(api_key_file):
            self.stdout.write(f"Wrote a new API key of Acme AI to {api_key_file}.")
        for who, email, password in demo_credentials():
            self.stdout.write(f"  {who:<24} {email:<26} {password}")
        if agent_tokens:
            state_dir = agent_state or agent_tokens.parent / "agents"
            tokens = demo_agent_tokens(state_dir=state_dir)
            if tokens.stale:
                self.stdout.write(
                    f"{len(tokens.stale)} node credentials in {state_dir} are not this database's (the demo ran "
                    "on another database before): deleted them; those agents enrol afresh."
                )
            entries = tokens.entries
            agent_tokens.parent.mkdir(parents=True, exist_ok=True)
            agent_tokens.touch(mode=0o600)
            agent_tokens.write_text(json.dumps(entries, indent=2))
            fresh = sum(1 for e in entries if e["token"])
            self.stdout.write(f"Agent tokens for {len(entries)} nodes ({fresh} to enrol) in {agent_tokens}.")
