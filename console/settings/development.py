"""Local development and `make demo`: DEBUG on unless said otherwise, a throwaway secret."""

from console.kernel.env import env_bool, env_list, env_str

from .base import *  # noqa: F403
from .base import STORAGES

DEBUG = env_bool("DEBUG", True)
SECRET_KEY = env_str("SECRET_KEY") or "dev-insecure-only-for-local-use-never-in-production"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
WHITENOISE_USE_FINDERS = True
STATIC_ROOT = None  # served from the finders; collectstatic is for production
