"""Settings shared by every profile. Values come from the environment only."""

from pathlib import Path

import dj_database_url

from console.kernel.env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent.parent

SECRET_KEY = env_str("SECRET_KEY")  # each profile decides whether a default is acceptable
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django.contrib.postgres",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "django_celery_beat",
    "console",
    "provisioning",
    "marketplace",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "console.kernel.errors.RequestSizeMiddleware",  # before anything reads a body
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "console.portal.boundary.TenantMiddleware",
    "console.kernel.errors.DomainErrorMiddleware",
]

ROOT_URLCONF = "console.urls"
ASGI_APPLICATION = "console.asgi.application"
WSGI_APPLICATION = "console.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "console.portal.boundary.tenant_context",
            ],
        },
    },
]

# --- Data stores -------------------------------------------------------------------------------

DATABASE_URL = env_str("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/neocloud")
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

DATABASES = {
    "default": dj_database_url.parse(DATABASE_URL, conn_max_age=0, conn_health_checks=False),
}
if not DATABASES["default"]["ENGINE"].endswith("postgresql"):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured("DATABASE_URL must point at PostgreSQL (postgres://…).")
# A psycopg pool per process served DB-backed endpoints 2.2x faster than a connection per request
# (docs/MEASURED). Under ASGI, persistent per-thread connections leak; a pool is the supported way.
if env_bool("DATABASE_POOL", True):
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("DATABASE_POOL_MIN", 1),
        "max_size": env_int("DATABASE_POOL_MAX", 10),
        "timeout": 10,
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "marketplace.User"

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "neocloud",
    }
}

# Redis holds nothing that matters (ARCHITECTURE invariant 2): sessions live in PostgreSQL.
SESSION_ENGINE = "django.contrib.sessions.backends.db"

# The pub/sub layer held 5-6k group_send/s with nothing lost; the core layer silently dropped
# messages above its capacity (docs/MEASURED).
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL]},
    }
}

# --- Celery ------------------------------------------------------------------------------------

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None  # tasks report through PostgreSQL rows, not results
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# An unacknowledged task of a killed worker returns to the queue after this; the reconcilers usually
# re-enqueue the work sooner, from rows.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 600)}
CELERY_TIMEZONE = "UTC"

# --- Auth, i18n, static --------------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "portal:login"
LOGIN_REDIRECT_URL = "portal:signed-in"  # members: the catalog; operators of no organization: the fleet
LOGOUT_REDIRECT_URL = "portal:login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# --- Email -------------------------------------------------------------------------------------

EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "Neocloud Console <console@localhost>")
SERVER_EMAIL = env_str("SERVER_EMAIL", DEFAULT_FROM_EMAIL)

# --- REST API ----------------------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "marketplace.api.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "console.kernel.api.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "console.api_schema.AutoSchema",
    "EXCEPTION_HANDLER": "console.kernel.errors.api_exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # Budgets per API key (or per user of a browser session), console.kernel.throttling; "off" lifts one.
    "DEFAULT_THROTTLE_CLASSES": ["console.kernel.throttling.ReadThrottle", "console.kernel.throttling.WriteThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "api_read": env_str("API_THROTTLE_READ", "1200/min"),
        "api_write": env_str("API_THROTTLE_WRITE", "300/min"),
        "api_expensive": env_str("API_THROTTLE_EXPENSIVE", "120/min"),
    },
}

# Failed sign-ins (portal and admin) allowed per account and per client address in each window.
SIGNIN_FAILURES_PER_ACCOUNT = env_int("SIGNIN_FAILURES_PER_ACCOUNT", 10)
SIGNIN_FAILURES_PER_ADDRESS = env_int("SIGNIN_FAILURES_PER_ADDRESS", 100)
SIGNIN_THROTTLE_SECONDS = env_int("SIGNIN_THROTTLE_SECONDS", 900)
# Proxies of ours in front of the console: 0 takes REMOTE_ADDR as the client's address; N the address
# the outermost of N proxies saw, from X-Forwarded-For (console.kernel.throttling.client_address).
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0)

SPECTACULAR_SETTINGS = {
    "TITLE": "Neocloud Console API",
    "DESCRIPTION": (
        "Rent GPU nodes, whole racks and inference endpoints. Authenticate with "
        "`Authorization: Bearer <api key>`. Every error has the shape "
        '`{"error": {"code", "message", "fields"?}}`.'
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "SiteKindEnum": "provisioning.choices.SiteKind",
        "CommandKindEnum": "provisioning.choices.CommandKind",
        "CommandStateEnum": "provisioning.choices.CommandState",
        "ReservationStateEnum": "marketplace.choices.ReservationState",
        "OfferShapeEnum": "marketplace.choices.OfferShape",
        "OfferKindEnum": "marketplace.choices.OfferKind",
        "EndpointStateEnum": "marketplace.models.endpoints.EndpointState",
        "ReplicaStateEnum": "marketplace.choices.ReplicaState",
        "AccessStatusEnum": "marketplace.choices.AccessStatus",
        "InvoiceStatusEnum": "marketplace.models.billing.InvoiceStatus",
        "ApiKeyStatusEnum": ["active", "expired", "revoked"],
    },
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Logging -----------------------------------------------------------------------------------

LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# --- Domain knobs ------------------------------------------------------------------------------

API_KEY_PREFIX = "nck"
# GPUs of one accelerator type a tenant may hold at once when operators set no quota for it.
DEFAULT_GPU_QUOTA = env_int("DEFAULT_GPU_QUOTA", 256)
# How often beat moves reservations along their timeline (start, end).
RESERVATION_TICK_SECONDS = env_int("RESERVATION_TICK_SECONDS", 10)
CELERY_BEAT_SCHEDULE = {
    "reservations-tick": {
        "task": "marketplace.tasks.reservations_tick",
        "schedule": float(RESERVATION_TICK_SECONDS),
        "options": {"expires": float(RESERVATION_TICK_SECONDS)},
    },
    "idempotency-records-expire": {
        "task": "marketplace.tasks.idempotency_records_expire",
        "schedule": 3600.0,
    },
}

# --- Live feeds to browsers (console.kernel.consumers.FeedConsumer) -------------------------------------
# A feed closes at once on sign-out and on removal from the organization; besides, the first message
# after this many seconds re-reads the session and membership before it is forwarded.
FEED_RECHECK_SECONDS = env_int("FEED_RECHECK_SECONDS", 60)

# --- Node agents (docs/agent-protocol.md) ------------------------------------------------------
AGENT_HEARTBEAT_SECONDS = env_int("AGENT_HEARTBEAT_SECONDS", 10)
AGENT_MISSED_BEATS = env_int("AGENT_MISSED_BEATS", 3)  # then the node is marked offline
AGENT_MAX_FRAME_BYTES = env_int("AGENT_MAX_FRAME_BYTES", 256 * 1024)
BOOTSTRAP_TOKEN_HOURS = env_int("BOOTSTRAP_TOKEN_HOURS", 24)
PROVISION_TIMEOUT_SECONDS = env_int("PROVISION_TIMEOUT_SECONDS", 600)
# A reservation's new key list: an agent applies it in milliseconds; one offline longer gets the next list.
ACCESS_TIMEOUT_SECONDS = env_int("ACCESS_TIMEOUT_SECONDS", 120)
RELEASE_TIMEOUT_SECONDS = env_int("RELEASE_TIMEOUT_SECONDS", 300)
RECONCILE_SECONDS = env_int("RECONCILE_SECONDS", 15)
CELERY_BEAT_SCHEDULE["provisioning-reconcile"] = {
    "task": "provisioning.tasks.provisioning_reconcile",
    "schedule": float(RECONCILE_SECONDS),
    "options": {"expires": float(RECONCILE_SECONDS)},
}
CELERY_BEAT_SCHEDULE["reservations-reconcile"] = {
    "task": "marketplace.tasks.reservations_reconcile",
    "schedule": float(RECONCILE_SECONDS),
    "options": {"expires": float(RECONCILE_SECONDS)},
}
CELERY_TASK_ROUTES = {
    "marketplace.tasks.provision_reservation": {"queue": "provisioning"},
    "marketplace.tasks.release_reservation": {"queue": "provisioning"},
    "provisioning.tasks.*": {"queue": "provisioning"},
}

# --- Telemetry ------------------------------------------------------------------------------------
TELEMETRY_SECONDS = env_int("TELEMETRY_SECONDS", 1)
ROLLUP_FLUSH_SECONDS = env_int("ROLLUP_FLUSH_SECONDS", 10)
ROLLUP_RETENTION_DAYS = env_int("ROLLUP_RETENTION_DAYS", 90)
METRICS_TOKEN = env_str("METRICS_TOKEN", "")  # /metrics answers only requests bearing it
CELERY_BEAT_SCHEDULE["telemetry-rollups-expire"] = {
    "task": "provisioning.tasks.telemetry_rollups_expire",
    "schedule": 3600.0,
}

# --- Billing (docs/billing.md) --------------------------------------------------------------------
# How often beat rates active reservations (they are also rated the moment they are released).
BILLING_RATE_SECONDS = env_int("BILLING_RATE_SECONDS", 60)
# Reservations a rating run rates per PostgreSQL transaction (a killed worker loses only its open batch).
BILLING_RATE_BATCH = env_int("BILLING_RATE_BATCH", 500)
# How often the live cost ticker is pushed to tenants with something active (the issue asks <= 5 s).
BILLING_TICK_SECONDS = env_int("BILLING_TICK_SECONDS", 5)
# After a balance runs out, how long before active on-demand reservations are released.
BILLING_GRACE_MINUTES = env_int("BILLING_GRACE_MINUTES", 60)
# A month's invoices are finalized this long after it ends (late releases are rated by then).
INVOICE_CLOSE_DELAY_MINUTES = env_int("INVOICE_CLOSE_DELAY_MINUTES", 60)
CELERY_BEAT_SCHEDULE.update(
    {
        "usage-rate": {
            "task": "marketplace.tasks.usage_rate",
            "schedule": float(BILLING_RATE_SECONDS),
            "options": {"expires": float(BILLING_RATE_SECONDS)},
        },
        "billing-tick": {
            "task": "marketplace.tasks.billing_tick",
            "schedule": float(BILLING_TICK_SECONDS),
            "options": {"expires": float(BILLING_TICK_SECONDS)},
        },
        "invoices-close": {"task": "marketplace.tasks.invoices_close", "schedule": 600.0},
        "prices-apply": {"task": "marketplace.tasks.prices_apply", "schedule": 60.0},
    }
)
CELERY_TASK_ROUTES.update(
    {
        f"marketplace.tasks.{name}": {"queue": "billing"}
        for name in (
            "usage_rate",
            "rate_reservation",
            "invoices_close",
            "prices_apply",
        )
    }
)
# The live cost push is a fan-out like telemetry's: it must not wait behind a month's rating run.
CELERY_TASK_ROUTES["marketplace.tasks.billing_tick"] = {"queue": "telemetry"}

# --- Inference endpoints (marketplace.services.endpoints) ---------------------------------------------
# A replica's GPU slice is a reservation leased for this long and renewed while its endpoint lives (its
# balance hold covers one lease at a time).
REPLICA_LEASE_HOURS = env_int("REPLICA_LEASE_HOURS", 2)
# How often beat reconciles endpoints: starts missing replicas, stops extra ones, renews leases.
ENDPOINT_RECONCILE_SECONDS = env_int("ENDPOINT_RECONCILE_SECONDS", 5)
# The autoscaler (services.endpoints.autoscaling, docs/autoscaling.md): how often it decides, its windows, the
# share of target_concurrency a replica is run at, and how long a replica chosen for removal drains.
AUTOSCALE_TICK_SECONDS = env_float("AUTOSCALE_TICK_SECONDS", 2.0)
AUTOSCALE_STABLE_SECONDS = env_int("AUTOSCALE_STABLE_SECONDS", 60)
AUTOSCALE_PANIC_SECONDS = env_int("AUTOSCALE_PANIC_SECONDS", 6)
AUTOSCALE_TARGET_UTILIZATION = env_float("AUTOSCALE_TARGET_UTILIZATION", 0.7)
ENDPOINT_DRAIN_SECONDS = env_int("ENDPOINT_DRAIN_SECONDS", 30)
CELERY_BEAT_SCHEDULE["endpoints-autoscale"] = {
    "task": "marketplace.tasks.endpoints_autoscale",
    "schedule": AUTOSCALE_TICK_SECONDS,
    "options": {"expires": AUTOSCALE_TICK_SECONDS},
}
# The URL OpenAI clients are given (an endpoint's base_url is this + "/v1"): the gateway's (console.gateway,
# its own processes; the launcher sets it). The console's own ASGI server answers /v1/ with the same app too.
GATEWAY_URL = env_str("GATEWAY_URL", "http://127.0.0.1:8000")
# The gateway (console.gateway): how long an API key's check is trusted (a revoked or expired key is refused
# within this), and how long the caller's endpoints and ready replicas are.
GATEWAY_AUTH_CACHE_SECONDS = env_float("GATEWAY_AUTH_CACHE_SECONDS", 2.0)
GATEWAY_ROUTES_CACHE_SECONDS = env_float("GATEWAY_ROUTES_CACHE_SECONDS", 1.0)
# Per API key, per gateway process: requests a second, and the burst above it (a token bucket).
GATEWAY_KEY_REQUESTS_PER_SECOND = env_float("GATEWAY_KEY_REQUESTS_PER_SECOND", 200.0)
GATEWAY_KEY_BURST = env_int("GATEWAY_KEY_BURST", 400)
# And requests in flight per API key, per gateway process (held for a cold start or a slow replica included).
GATEWAY_KEY_MAX_IN_FLIGHT = env_int("GATEWAY_KEY_MAX_IN_FLIGHT", 512)
# Other replicas tried for a request that failed before any byte of the answer came back.
GATEWAY_RETRIES = env_int("GATEWAY_RETRIES", 2)
GATEWAY_CONNECT_TIMEOUT_SECONDS = env_float("GATEWAY_CONNECT_TIMEOUT_SECONDS", 2.0)
GATEWAY_UPSTREAM_TIMEOUT_SECONDS = env_float("GATEWAY_UPSTREAM_TIMEOUT_SECONDS", 300.0)
# How long a request for an idle endpoint is held while a replica starts (then 503 with Retry-After).
GATEWAY_COLD_START_TIMEOUT_SECONDS = env_float("GATEWAY_COLD_START_TIMEOUT_SECONDS", 120.0)
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 4 * 1024 * 1024)
# How often a gateway hands its request counts over (Redis), and beat merges them (EndpointTraffic).
GATEWAY_FLUSH_SECONDS = env_float("GATEWAY_FLUSH_SECONDS", 1.0)
TRAFFIC_COLLECT_SECONDS = env_int("TRAFFIC_COLLECT_SECONDS", 5)
CELERY_BEAT_SCHEDULE["traffic-collect"] = {
    "task": "marketplace.tasks.traffic_collect",
    "schedule": float(TRAFFIC_COLLECT_SECONDS),
    "options": {"expires": float(TRAFFIC_COLLECT_SECONDS)},
}
CELERY_BEAT_SCHEDULE["endpoints-reconcile"] = {
    "task": "marketplace.tasks.endpoints_reconcile",
    "schedule": float(ENDPOINT_RECONCILE_SECONDS),
    "options": {"expires": float(ENDPOINT_RECONCILE_SECONDS)},
}
