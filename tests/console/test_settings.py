"""The settings profiles, each loaded in a fresh process from nothing but the environment."""

import os
import subprocess
import sys

import pytest
from django.conf import settings

REAL_SECRET = "k3J9x!pQ2vL8zR4wT6yB1nM5cF7hD0gS-aE3uI9oP2lK8jH4qW7eR5tY1uI3oP"  # 60 random characters


OURS = {"SECRET_KEY", "ALLOWED_HOSTS", "DEBUG", "CSRF_TRUSTED_ORIGINS", "DJANGO_ALLOW_ASYNC_UNSAFE"}


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in OURS}


def run(profile: str, code: str, **env) -> subprocess.CompletedProcess:
    base = clean_environ()
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); from django.conf import settings as s; {code}"],
        env={**base, "DJANGO_SETTINGS_MODULE": f"console.settings.{profile}", **env},
        capture_output=True,
        text=True,
        cwd=settings.BASE_DIR,
        timeout=60,
    )


def test_production_requires_a_secret_and_hosts():
    missing = run("production", "pass")
    assert missing.returncode != 0 and "SECRET_KEY must be set" in missing.stderr
    weak = run("production", "pass", SECRET_KEY="short", ALLOWED_HOSTS="console.example.com")
    assert weak.returncode != 0 and "at least 50 characters" in weak.stderr
    no_hosts = run("production", "pass", SECRET_KEY=REAL_SECRET)
    assert no_hosts.returncode != 0 and "ALLOWED_HOSTS" in no_hosts.stderr
    debug = run("production", "pass", SECRET_KEY=REAL_SECRET, ALLOWED_HOSTS="c.example.com", DEBUG="true")
    assert debug.returncode != 0 and "DEBUG must be false" in debug.stderr


def test_production_reads_everything_from_the_environment():
    result = run(
        "production",
        "print(s.DEBUG, s.ALLOWED_HOSTS, s.CSRF_TRUSTED_ORIGINS, s.DATABASES['default']['HOST'], "
        "s.CHANNEL_LAYERS['default']['CONFIG']['hosts'], s.CELERY_BROKER_URL, s.EMAIL_HOST, s.SESSION_COOKIE_SECURE)",
        SECRET_KEY=REAL_SECRET,
        ALLOWED_HOSTS="console.example.com,api.example.com",
        DATABASE_URL="postgres://app:pw@db.internal:5432/neocloud",
        REDIS_URL="redis://cache.internal:6379/1",
        EMAIL_HOST="smtp.example.com",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == (
        "False ['console.example.com', 'api.example.com'] ['https://console.example.com', 'https://api.example.com'] "
        "db.internal ['redis://cache.internal:6379/1'] redis://cache.internal:6379/1 smtp.example.com True"
    )


def test_check_deploy_reports_nothing_under_production():
    env = clean_environ()
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env={
            **env,
            "DJANGO_SETTINGS_MODULE": "console.settings.production",
            "SECRET_KEY": REAL_SECRET,
            "ALLOWED_HOSTS": "console.example.com",
        },
        capture_output=True,
        text=True,
        cwd=settings.BASE_DIR,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_development_defaults_are_for_a_laptop():
    result = run("development", "print(s.DEBUG, 'localhost' in s.ALLOWED_HOSTS, s.SESSION_COOKIE_SECURE)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True True False"


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_a_malformed_boolean_is_refused_with_its_name(value):
    result = run("development", "pass", DEBUG=value)
    assert result.returncode != 0 and f"DEBUG={value!r} is not a boolean" in result.stderr


def test_only_postgresql_is_accepted():
    result = run("development", "pass", DATABASE_URL="sqlite:///db.sqlite3")
    assert result.returncode != 0 and "must point at PostgreSQL" in result.stderr


def test_the_test_profile_runs_on_real_postgresql_and_redis():
    assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels_redis.pubsub.RedisPubSubChannelLayer"
    assert settings.CELERY_BROKER_URL.startswith("redis://")


def test_the_suite_runs_on_the_test_profile():
    """`make test` starts pytest through console.devservers; importing the console package sets a
    default settings module, which must not reach pytest (it once ran the suite on development)."""
    assert settings.SETTINGS_MODULE == "console.settings.test"


def test_devservers_hands_on_no_settings_module_of_its_own():
    env = {k: v for k, v in clean_environ().items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "console.devservers",
            "--",
            sys.executable,
            "-c",
            "import os; print(os.environ.get('DJANGO_SETTINGS_MODULE'))",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=settings.BASE_DIR,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
