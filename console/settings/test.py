"""The test suite: real PostgreSQL and Redis from DATABASE_URL / REDIS_URL, fast password hashing."""

from console.kernel.env import env_int, env_list, env_str

from .base import *  # noqa: F403
from .base import REST_FRAMEWORK, STORAGES

DEBUG = False
SECRET_KEY = env_str("SECRET_KEY") or "test-only-secret-key-not-for-any-real-deployment"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["testserver", "localhost", "127.0.0.1"])
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
WHITENOISE_USE_FINDERS = True
STATIC_ROOT = None  # served from the finders; collectstatic is for production
# Hashing speed only: tests create many users. Production keeps Django's default PBKDF2.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Limits no ordinary test comes near (the throttling tests set their own): the whole suite signs in
# from one address and may call the API thousands of times a minute with one key.
REST_FRAMEWORK = {
    **REST_FRAMEWORK,
    "DEFAULT_THROTTLE_RATES": {
        "api_read": env_str("API_THROTTLE_READ", "1000000/min"),
        "api_write": env_str("API_THROTTLE_WRITE", "1000000/min"),
        "api_expensive": env_str("API_THROTTLE_EXPENSIVE", "1000000/min"),
    },
}
SIGNIN_FAILURES_PER_ACCOUNT = env_int("SIGNIN_FAILURES_PER_ACCOUNT", 1_000_000)
SIGNIN_FAILURES_PER_ADDRESS = env_int("SIGNIN_FAILURES_PER_ADDRESS", 1_000_000)
