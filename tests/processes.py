"""Running the project's own commands as separate processes, against this test's database."""

import os
import subprocess
import sys

from django.conf import settings


def manage(*args: str, db_name: str | None = None) -> subprocess.CompletedProcess:
    """``manage.py <args>`` in a separate process on the test database (or ``db_name``), as an
    operator's shell would run it."""
    database = settings.DATABASES["default"]
    url = f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{db_name or database['NAME']}"
    env = {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "console.settings.test"}
    return subprocess.run(  # noqa: S603 - our own interpreter and manage.py
        [sys.executable, "manage.py", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=settings.BASE_DIR,
        timeout=120,
    )
