from django.core.management.base import BaseCommand

from console.demo import demo_credentials, seed_demo


class Command(BaseCommand):
    help = "Seed the demo fleet, catalog and tenants (does nothing if a fleet exists)."

    def handle(self, *args, **options):
        created = seed_demo()
        self.stdout.write("Seeded the demo world." if created else "The database already has a fleet; left as is.")
        for who, email, password in demo_credentials():
            self.stdout.write(f"  {who:<24} {email:<26} {password}")
