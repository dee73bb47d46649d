"""StreamSpace settings: every value from the environment, read here and nowhere else.

With nothing set: SQLite under ./var, the in-memory channel layer, Celery on a
filesystem broker, DEBUG on. ``DATABASE_URL`` and ``REDIS_URL`` switch to PostgreSQL
and Redis. With DEBUG off the process refuses to start without SECRET_KEY.
"""

from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from agent_clients.protocol import TUNNEL_WINDOW
from streamspace.env import env_bool, env_choice, env_float, env_int, env_list, env_seconds, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("STREAMSPACE_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", True)
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
    SECRET_KEY = "insecure-development-key-only-used-with-DEBUG-on"  # noqa: S105

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "csp",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "agents_app",
    "sessions_app",
    "vnc_app",
    "axes",
]

MIDDLEWARE = [
    # Headers on every response, the 503 page of an outage too (neither touches the
    # database; see "Security headers" below).
    "csp.middleware.CSPMiddleware",
    "django.middleware.security.SecurityMiddleware",  # nosniff, Referrer-Policy, HSTS: the 503 page's too
    # A database outage anywhere below answers 503 (JSON for the API), never a 500 page.
    "streamspace.database_outage.DatabaseOutageMiddleware",
    # A NUL in an /api/ path or query parameter: 400 JSON before any view looks it up.
    "streamspace.api_input.QueryInputMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last: turns a login refused by the lockout into the 429 page (streamspace/login_throttle.py).
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "streamspace.urls"
# Django's database sessions, refusing keys no session of ours has (a NUL cookie was a 500).
SESSION_ENGINE = "streamspace.login_sessions"
ASGI_APPLICATION = "streamspace.asgi.application"
WSGI_APPLICATION = None

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
            ]
        },
    }
]

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    try:
        # conn_health_checks: with the pool, Django passes ConnectionPool.check_connection, so each
        # connection is checked as it leaves the pool and one PostgreSQL dropped (a restart,
        # pg_terminate_backend, a failover) is replaced instead of failing a request.
        DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0, conn_health_checks=True)}
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from None
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # Under ASGI every request runs in its own thread context, so Django's persistent
        # connections do not help; a psycopg pool saves ~20 ms of connecting per request.
        options = DATABASES["default"].setdefault("OPTIONS", {})
        # Parameters travel separately from the SQL: no quoting of literals in Python.
        options["server_side_binding"] = env_bool("DATABASE_SERVER_SIDE_BINDING", True)
        options["pool"] = {
            "min_size": env_int("DATABASE_POOL_MIN", 2, minimum=1),
            "max_size": env_int("DATABASE_POOL_MAX", 20, minimum=1),
            # Seconds a request waits for a connection (a reconnect storm may queue that long;
            # during an outage the request then answers 503).
            "timeout": env_seconds("DATABASE_POOL_TIMEOUT", 20),
        }
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "streamspace.sqlite3",
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    # The pub/sub layer on RESP2 with no socket timeout: see docs/ARCHITECTURE.md, "Channel layer".
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "protocol": 2, "socket_timeout": None}],
                "prefix": env_str("CHANNEL_PREFIX", "streamspace"),
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Celery: Redis when REDIS_URL is set; otherwise kombu's filesystem broker, which needs no server.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL or "filesystem://")
if CELERY_BROKER_URL == "filesystem://":
    _broker_dir = VAR_DIR / "celery-broker"
    for sub in ("out", "processed", "control"):
        (_broker_dir / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "out"),
        "data_folder_out": str(_broker_dir / "out"),
        "data_folder_processed": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),  # else kombu writes ./control in the working directory
    }
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_TIME_LIMIT = 60
CELERY_TASK_SOFT_TIME_LIMIT = 50
# Beat keeps its schedule in memory: every entry is a fixed interval and the sweeps compare
# database timestamps, so nothing needs to survive a restart, and beat needs no writable
# directory (a schedule file under var/ made beat die on a fresh PostgreSQL + Redis checkout).
CELERY_BEAT_SCHEDULER = "celery.beat:Scheduler"
CELERY_TIMEZONE = "UTC"

# Agents and commands
AGENT_BOOTSTRAP_TOKEN = env_str("AGENT_BOOTSTRAP_TOKEN")
# Bearer token for /metrics (streamspace/metrics.py); empty: the endpoint is disabled (403).
METRICS_TOKEN = env_str("METRICS_TOKEN")
AGENT_HEARTBEAT_INTERVAL = env_seconds("AGENT_HEARTBEAT_INTERVAL", 10)
AGENT_MISSED_HEARTBEATS = env_int("AGENT_MISSED_HEARTBEATS", 3, minimum=1)
COMMAND_ACK_TIMEOUT = env_seconds("COMMAND_ACK_TIMEOUT", 15)
COMMAND_TIMEOUT = env_seconds("COMMAND_TIMEOUT", 300)
# The largest request body accepted (bytes); larger ones are answered 413 before they are
# read (streamspace/body_limit.py). The API's requests are a few KiB; the admin's forms too.
MAX_REQUEST_BODY = env_int("MAX_REQUEST_BODY", 2 * 1024 * 1024, minimum=1024)
# The largest file one upload may carry (bytes); a larger one is answered 413 before a byte
# of it is read (vnc_app.file_transfer). Uploads stream: this bounds the desktop's disk, not memory.
FILE_TRANSFER_MAX_BYTES = env_int("FILE_TRANSFER_MAX_BYTES", 1024 * 1024 * 1024, minimum=1)
# A transfer whose client sends or takes nothing for this long is ended (seconds).
FILE_TRANSFER_STALL_TIMEOUT = env_int("FILE_TRANSFER_STALL_TIMEOUT", 60, minimum=1)
# Uploads and downloads of one session at once, per Daphne process (more: 429).
FILE_TRANSFER_MAX_PER_SESSION = env_int("FILE_TRANSFER_MAX_PER_SESSION", 4, minimum=1)
COMMAND_MAX_ATTEMPTS = env_int("COMMAND_MAX_ATTEMPTS", 3, minimum=1)
# A retryable failure is executed again after base x 2^(n-1) seconds (n: the failed execution), at most cap.
COMMAND_RETRY_BACKOFF_BASE = env_seconds("COMMAND_RETRY_BACKOFF_BASE", 2)
COMMAND_RETRY_BACKOFF_CAP = env_seconds("COMMAND_RETRY_BACKOFF_CAP", 60)
SESSION_STUCK_AFTER = env_seconds("SESSION_STUCK_AFTER", 120)
SWEEP_INTERVAL = env_seconds("SWEEP_INTERVAL", 5)
# /readyz reports the sweeps overdue after 3 of their periods without a run, never sooner than this.
SWEEP_OVERDUE_MIN = env_seconds("SWEEP_OVERDUE_MIN", 15)

# Lifecycle policy defaults (a template's fields, then a group's, override them); 0 = off.
# README, "Lifecycle policies".
SESSION_IDLE_TIMEOUT = env_seconds("SESSION_IDLE_TIMEOUT", 0, minimum=0)
SESSION_IDLE_ACTION = env_choice("SESSION_IDLE_ACTION", "hibernate", ("hibernate", "terminate"))
SESSION_MAX_LIFETIME = env_seconds("SESSION_MAX_LIFETIME", 0, minimum=0)
SESSION_NO_VIEWER_TIMEOUT = env_seconds("SESSION_NO_VIEWER_TIMEOUT", 0, minimum=0)
# How long before an idle (or maximum lifetime) action the open viewer warns; at most half the timeout.
SESSION_IDLE_WARNING = env_seconds("SESSION_IDLE_WARNING", 60, minimum=0)
# The relay writes a session's last input at most this often (the first input at once); the
# idle timeout counts from the last write plus this, so input between writes is never missed.
SESSION_ACTIVITY_INTERVAL = env_seconds("SESSION_ACTIVITY_INTERVAL", 10, minimum=0.1)
# The most UTF-8 text one clipboard transfer carries, per direction (sessions_app.clipboard).
# A paste goes on to the desktop in one piece (vnc_app.rfb), and the agent closes a tunnel
# with more than TUNNEL_WINDOW bytes in flight: half the window leaves room for the rest.
CLIPBOARD_MAX_TO_DESKTOP_CEILING = TUNNEL_WINDOW // 2
CLIPBOARD_MAX_TO_DESKTOP = env_int("CLIPBOARD_MAX_TO_DESKTOP", 1024 * 1024, minimum=1)
if CLIPBOARD_MAX_TO_DESKTOP > CLIPBOARD_MAX_TO_DESKTOP_CEILING:
    raise ImproperlyConfigured(
        f"CLIPBOARD_MAX_TO_DESKTOP must be at most {CLIPBOARD_MAX_TO_DESKTOP_CEILING} bytes, got"
        f" {CLIPBOARD_MAX_TO_DESKTOP}: a paste goes to the desktop in one piece, and a tunnel carries"
        f" at most {TUNNEL_WINDOW} bytes in flight (agent_clients.protocol.TUNNEL_WINDOW)"
    )
CLIPBOARD_MAX_TO_BROWSER = env_int("CLIPBOARD_MAX_TO_BROWSER", 1024 * 1024, minimum=1)

# Per-user limits when no Quota row applies.
QUOTA_DEFAULT_MAX_SESSIONS = env_int("QUOTA_DEFAULT_MAX_SESSIONS", 5)
QUOTA_DEFAULT_MAX_CPU = float(env_int("QUOTA_DEFAULT_MAX_CPU", 8))
QUOTA_DEFAULT_MAX_MEMORY_MB = env_int("QUOTA_DEFAULT_MAX_MEMORY_MB", 16384)
SESSION_MAX_CPU = float(env_int("SESSION_MAX_CPU", 16, minimum=1))
SESSION_MAX_MEMORY_MB = env_int("SESSION_MAX_MEMORY_MB", 65536, minimum=64)
# The least a session may ask for: no request rounds to "no limit" (Docker NanoCpus=0,
# Kubernetes "0m") and the quota is never charged less. The agents check their own
# SESSION_MIN_CPU / SESSION_MIN_MEMORY_MB again (README, "Configuration").
SESSION_MIN_CPU = env_float("SESSION_MIN_CPU", 0.1, minimum=0.001, maximum=SESSION_MAX_CPU)
SESSION_MIN_MEMORY_MB = env_int("SESSION_MIN_MEMORY_MB", 64, minimum=6, maximum=SESSION_MAX_MEMORY_MB)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
# Login throttling (django-axes) on the portal, the admin and POST /api/v1/auth/token:
# LOGIN_FAILURE_LIMIT failures for one user name, or from one address, within LOGIN_COOLOFF
# lock that user name or address until LOGIN_COOLOFF after its last failure (a correct
# password is refused too; tries during the lock do not extend it). Staff clear locks in the
# admin (Axes > Access attempts) or with manage.py axes_reset_username / axes_reset_ip.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # first: refuses locked-out logins before any password check
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(seconds=env_seconds("LOGIN_COOLOFF", 300, minimum=1))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]  # either one: per user name OR per address
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_ENABLE_ACCESS_FAILURE_LOG = True  # every failure, kept for the admin (Axes > Access failures)
AXES_LOCKOUT_CALLABLE = "streamspace.login_throttle.lockout_response"
AXES_CLIENT_IP_CALLABLE = "streamspace.login_throttle.client_ip"
# 0: the address is the TCP peer's (X-Forwarded-For is ignored: any client can write it).
# Behind N reverse proxies that each append to X-Forwarded-For, set N: the address the
# outermost proxy saw is used.
LOGIN_TRUSTED_PROXY_COUNT = env_int("LOGIN_TRUSTED_PROXY_COUNT", 0, minimum=0, maximum=10)

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))
if DEBUG:  # WhiteNoise warns about a missing STATIC_ROOT; in production collectstatic makes it
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"]
NOVNC_DIR = BASE_DIR / "node_modules" / "@novnc" / "novnc"
if NOVNC_DIR.is_dir():
    STATICFILES_DIRS.append(("novnc", NOVNC_DIR))
WHITENOISE_USE_FINDERS = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework_simplejwt.authentication.JWTAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "streamspace.api_schema.StreamSpaceAutoSchema",
    "EXCEPTION_HANDLER": "streamspace.api_errors.exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["streamspace.api_input.StrictJSONParser"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(seconds=env_seconds("JWT_ACCESS_LIFETIME", 900)),
    "REFRESH_TOKEN_LIFETIME": timedelta(seconds=env_seconds("JWT_REFRESH_LIFETIME", 86400)),
    "SIGNING_KEY": env_str("JWT_SIGNING_KEY", SECRET_KEY),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "StreamSpace API",
    "DESCRIPTION": "Containerized desktops streamed to the browser.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # No validator badge: an image from validator.swagger.io (refused by the CSP's img-src)
    # that would hand the schema's URL to a third party.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
}

# Security headers. Every page (portal, viewer, admin, API docs) runs only our own static
# scripts: no inline script, no eval, no inline <style> (the Swagger UI page is
# SpectacularSwaggerSplitView, its start-up script served as a static-like URL, with our
# own template for its styles). The viewer's socket is same-origin (connect-src 'self'
# covers ws:/wss: to our own host), noVNC draws through blob:/data: images. Kept by
# tests/portal/test_headers.py (each page's header) and tests/browser/test_csp.py (no
# violation in Chromium).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'none'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "blob:", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "manifest-src": ["'self'"],
        "form-action": ["'self'"],
        "base-uri": ["'none'"],
        "object-src": ["'none'"],
        "frame-ancestors": ["'none'"],
    }
}
SECURE_CONTENT_TYPE_NOSNIFF = True  # X-Content-Type-Options: nosniff (Django's default, stated)
SECURE_REFERRER_POLICY = "same-origin"  # no path (nor query) of ours leaves in a Referer
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"

# Production hardening, on whenever DEBUG is off.
if not DEBUG:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)

X_FRAME_OPTIONS = "DENY"  # for browsers without CSP frame-ancestors

# text (the default) or json: one object per line with the request, agent, command and
# session ids that apply (agent_clients/runtime/logfmt.py, shared with the agents).
LOG_FORMAT = env_str("LOG_FORMAT", "text").strip().lower()
if LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be text or json, got {LOG_FORMAT!r}")
_LOG_FORMATTER = "json" if LOG_FORMAT == "json" else "plain"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "agent_clients.runtime.logfmt.JsonFormatter"},
    },
    "filters": {
        "one_line": {"()": "streamspace.logs.ExceptionAsOneLine"},
        # ?token=... in a logged URL: its value is never written (streamspace/log_redaction.py).
        "redact_tokens": {"()": "streamspace.log_redaction.RedactQueryTokens"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": _LOG_FORMATTER, "filters": ["redact_tokens"]},
        "console_one_line": {
            "class": "logging.StreamHandler",
            "formatter": _LOG_FORMATTER,
            "filters": ["one_line", "redact_tokens"],
        },
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        # No handler of Django's own: its console handler (DEBUG on) printed every django.*
        # line a second time, as plain text and unredacted. INFO whatever LOG_LEVEL says:
        # django.db.backends' DEBUG lines are SQL with its parameters (VNC passwords, session keys).
        "django": {"level": "INFO"},
        # Daphne's access log with LOG_FORMAT=json (streamspace/structured_logs.py).
        "streamspace.access": {"level": "INFO"},
        "django.channels.server": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        # Redis unreachable: one line a second from channels-redis, not a traceback (see streamspace/logs.py).
        "channels_redis": {"handlers": ["console_one_line"], "propagate": False},
    },
}
