"""The test suite: real PostgreSQL and Redis from DATABASE_URL / REDIS_URL, fast password hashing."""

from console.env import env_list, env_str

from .base import *  # noqa: F403
from .base import STORAGES

DEBUG = False
SECRET_KEY = env_str("SECRET_KEY") or "test-only-secret-key-not-for-any-real-deployment"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["testserver", "localhost", "127.0.0.1"])
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
WHITENOISE_USE_FINDERS = True
STATIC_ROOT = None  # served from the finders; collectstatic is for production
# Hashing speed only: tests create many users. Production keeps Django's default PBKDF2.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
