"""Sightline settings, read from the environment.

With no environment set, Sightline runs the *embedded default*: SQLite in the project folder, an
in-memory channel layer, local quota counters and one in-process worker thread that owns the model
(the tiny random model built by ``manage.py build_tiny_model``). Setting ``DATABASE_URL`` and
``REDIS_URL`` switches to production parts (Postgres, Redis, Celery workers).

This module must never import torch or transformers: the web tier does not load them.
"""

import contextlib
from pathlib import Path

from django.core.checks.security.base import (
    SECRET_KEY_INSECURE_PREFIX,
    SECRET_KEY_MIN_LENGTH,
    SECRET_KEY_MIN_UNIQUE_CHARACTERS,
)
from django.core.exceptions import ImproperlyConfigured

from config.env import (
    env_bool,
    env_choice,
    env_currency,
    env_days,
    env_float,
    env_int,
    env_list,
    env_proxy_ssl_header,
    env_str,
    env_url,
    parse_database_url,
)
from config.models_registry import REPLACED_SETTINGS
from config.models_registry import parse as parse_models

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("SIGHTLINE_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", False)
# The embedded default (no DATABASE_URL, no REDIS_URL) and DEBUG may run on a fixed development key;
# anything else is a deployment, and a key everybody can read signs its sessions and CSRF tokens.
DEPLOYED = not DEBUG and bool(env_str("DATABASE_URL") or env_str("REDIS_URL"))
DEVELOPMENT_SECRET_KEY = "sightline-insecure-development-key-set-SECRET_KEY-in-production"
SECRET_KEY = env_str("SECRET_KEY", "") or DEVELOPMENT_SECRET_KEY
if DEPLOYED and (
    SECRET_KEY == DEVELOPMENT_SECRET_KEY
    # Django's own test of a weak key (check --deploy's security.W009), made fatal here
    or len(SECRET_KEY) < SECRET_KEY_MIN_LENGTH
    or len(set(SECRET_KEY)) < SECRET_KEY_MIN_UNIQUE_CHARACTERS
    or SECRET_KEY.startswith(SECRET_KEY_INSECURE_PREFIX)
):
    raise ImproperlyConfigured(
        f"SECRET_KEY is {'missing' if SECRET_KEY == DEVELOPMENT_SECRET_KEY else 'too weak'}: with DATABASE_URL or"
        f" REDIS_URL set and DEBUG off, Sightline wants a random SECRET_KEY of at least {SECRET_KEY_MIN_LENGTH}"
        f" characters ({SECRET_KEY_MIN_UNIQUE_CHARACTERS} or more different ones). Make one with:"
        " python3 -c 'import secrets; print(secrets.token_urlsafe(50))'"
    )

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# --- https ----------------------------------------------------------------------------------
# Off by default: the embedded default serves plain HTTP on localhost. A deployment behind TLS turns
# them on (README, Production); `manage.py check --deploy` is then clean.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
# Load balancers and orchestrators probe over plain HTTP: a redirect would read as a failed probe.
SECURE_REDIRECT_EXEMPT = [r"^health(/|$)"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", False)
# The header a trusted TLS-terminating proxy sets to "https" (e.g. X-Forwarded-Proto). Set it only
# behind a proxy that overwrites the header: else any client could claim HTTPS.
SECURE_PROXY_SSL_HEADER = env_proxy_ssl_header("SECURE_PROXY_SSL_HEADER")

# --- sign-in --------------------------------------------------------------------------------
# After SIGNIN_MAX_FAILURES failed passwords for one username, or from one client address, within
# SIGNIN_WINDOW_SECONDS, further sign-ins are refused (429) without checking the password.
SIGNIN_MAX_FAILURES = env_int("SIGNIN_MAX_FAILURES", 10)
SIGNIN_WINDOW_SECONDS = env_int("SIGNIN_WINDOW_SECONDS", 15 * 60)

# --- members --------------------------------------------------------------------------------
# An invitation link (dashboard, Members) may be accepted once, within this many hours.
INVITATION_TTL_HOURS = env_int("INVITATION_TTL_HOURS", 72)

INSTALLED_APPS = [
    # Only for developers' `runserver` (Daphne's, ASGI). `manage.py serve` (Uvicorn, config/server.py)
    # is what the embedded default, production and the tests run.
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "corsheaders",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "accounts",
    "inference",
    "dashboard",
]

MIDDLEWARE = [
    "corsheaders.middleware.CorsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # The ASGI server serves no static files: the admin's and dashboard's CSS/JS come from WhiteNoise, straight
    # from the apps' static folders (no collectstatic step needed; run it for far-future caching).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
# The HTTP API (/v1/) runs a chain of its own (config/api_handler.py says why): no session, CSRF,
# messages or static files, and the header middlewares inline on the event loop.
API_MIDDLEWARE = [
    "corsheaders.middleware.CorsMiddleware",
    "config.api_handler.InlineSecurityMiddleware",
    "config.api_handler.InlineCommonMiddleware",
    "config.api_handler.InlineXFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = None
ASGI_APPLICATION = "config.asgi.application"

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
            ],
        },
    },
]

# --- database -------------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL", "")
# PostgreSQL connections come from a pool per process (the ASGI handler runs each sync request in a thread
# of its own, so without a pool a burst of requests opens a connection each and exhausts the
# server). A request waits up to DB_POOL_TIMEOUT seconds for a free connection. 0 turns it off.
DB_POOL_MAX_SIZE = env_int("DB_POOL_MAX_SIZE", 20)
DB_POOL_TIMEOUT = env_float("DB_POOL_TIMEOUT", 30.0)
if DATABASE_URL:
    DATABASES = {"default": parse_database_url(DATABASE_URL)}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and DB_POOL_MAX_SIZE > 0:
        DATABASES["default"]["OPTIONS"]["pool"] = {
            "min_size": 1,
            "max_size": DB_POOL_MAX_SIZE,
            "timeout": DB_POOL_TIMEOUT,
        }
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)  # the embedded default's SQLite file lives there
    DATABASES = {
        "default": {
            "ENGINE": "config.sqlite_pool",
            "NAME": str(VAR_DIR / "sightline.sqlite3"),
            # WAL with synchronous=NORMAL: a commit is not synced to disk (a checkpoint is). The
            # database stays consistent through any crash; a power loss or OS crash may undo the
            # last commits (the query log's last rows), a process crash loses nothing. FULL synced
            # every commit: ~5 fdatasync calls of 1.5-4 ms each per /v1/glm/infer request here.
            "OPTIONS": {
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # A connection is given back at the end of each request (and each query of a worker
            # thread) and reused by the next (config/sqlite_pool): the ASGI handler runs every
            # request in a new thread, which opened a connection of its own each time. Connections
            # are never closed for good meanwhile: the last one to close made SQLite checkpoint the
            # WAL and delete it, and the next one create it again (~12 fdatasync calls a request).
            "CONN_MAX_AGE": 0,
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- redis, channels, celery ----------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "")
EMBEDDED = not REDIS_URL

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "capacity": 1000, "expiry": 120, "prefix": "sightline-asgi:"},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "inference.layers.ThreadSafeInMemoryChannelLayer"}}

# The engine a worker drives (inference/engine/backends.py): "transformers" loads the model in the
# worker's own process (batched by our scheduler); "openai" sends each query as a streaming chat
# completion to an OpenAI-compatible engine server beside the worker (vLLM, SGLang) at
# INFERENCE_ENGINE_URL, which does the batching. The embedded default runs "transformers".
INFERENCE_BACKEND = env_choice("INFERENCE_BACKEND", "transformers", ("transformers", "openai"))
INFERENCE_ENGINE_URL = env_url("INFERENCE_ENGINE_URL")  # e.g. http://127.0.0.1:8001 (a trailing /v1 is fine)
INFERENCE_ENGINE_API_KEY = env_str("INFERENCE_ENGINE_API_KEY", "")  # vLLM's --api-key, if it has one
# The model id the engine server serves (vLLM's --served-model-name); empty: INFERENCE_MODEL.
INFERENCE_ENGINE_MODEL = env_str("INFERENCE_ENGINE_MODEL", "")
if INFERENCE_BACKEND == "openai" and not INFERENCE_ENGINE_URL:
    raise ImproperlyConfigured(
        "INFERENCE_BACKEND=openai needs INFERENCE_ENGINE_URL: the engine server's address, e.g. http://127.0.0.1:8001"
    )
# Queries one worker has in flight at its engine server at once (the server batches them).
ENGINE_MAX_INFLIGHT = env_int("ENGINE_MAX_INFLIGHT", 64)
if ENGINE_MAX_INFLIGHT < 1:
    raise ImproperlyConfigured(f"ENGINE_MAX_INFLIGHT={ENGINE_MAX_INFLIGHT} is not valid: want 1 or more.")
# The worker asks its engine server's /health and /v1/models this often (heartbeat and readiness).
ENGINE_PROBE_SECONDS = env_float("ENGINE_PROBE_SECONDS", 2.0)
# A worker that starts before its engine server waits this long for it before taking work (logged).
ENGINE_START_TIMEOUT = env_float("ENGINE_START_TIMEOUT", 900.0)

# Celery (production): one queue per model, reliability as in DESIGN.md.
INFERENCE_SOFT_TIME_LIMIT = env_int("INFERENCE_SOFT_TIME_LIMIT", 300)
INFERENCE_HARD_TIME_LIMIT = env_int("INFERENCE_HARD_TIME_LIMIT", 330)
# Batching (inference/engine/batching.py): a worker decodes up to INFERENCE_MAX_BATCH queries
# together, waiting at most INFERENCE_BATCH_WAIT_MS for company, and at most
# INFERENCE_MAX_BATCH_TOKENS tokens of prompt and answer in one batch (GPU memory).
INFERENCE_MAX_BATCH = env_int("INFERENCE_MAX_BATCH", 16)
INFERENCE_BATCH_WAIT_MS = env_float("INFERENCE_BATCH_WAIT_MS", 5.0)
INFERENCE_MAX_BATCH_TOKENS = env_int("INFERENCE_MAX_BATCH_TOKENS", 65536)
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_TASK_IGNORE_RESULT = True  # the Query row is the record, not a result backend
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A worker holds a batch's worth of queries at once: one thread per query, all feeding the one
# engine thread (the batch scheduler). acks_late: a query is acknowledged only when it has ended,
# so a worker killed mid-batch leaves every query of the batch to be delivered again.
CELERY_WORKER_POOL = "threads"
# With an engine server, a thread per query in flight there (ENGINE_MAX_INFLIGHT). Set below, once
# the model registry has said which engine this process's model has.
CELERY_TASK_SOFT_TIME_LIMIT = INFERENCE_SOFT_TIME_LIMIT
CELERY_TASK_TIME_LIMIT = INFERENCE_HARD_TIME_LIMIT
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": INFERENCE_HARD_TIME_LIMIT + 60,
    # A reconnect to a Redis that is down or unreachable fails in seconds instead of hanging the
    # worker's consumer; idle broker connections are checked before use, so a Redis restarted
    # behind them is noticed at the next command rather than by a failed ack.
    "socket_connect_timeout": 5,
    "health_check_interval": 10,
}
# A query a worker takes while its engine server is down waits this long for it (still queued), then
# ends model_unavailable. Below the visibility timeout, so the message is not delivered twice meanwhile.
ENGINE_WAIT_SECONDS = env_float("ENGINE_WAIT_SECONDS", float(INFERENCE_SOFT_TIME_LIMIT))
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A worker reconnects to Redis for as long as Redis is away: Celery's default gives up after 100
# tries (~50 minutes) and exits, leaving no worker for the queue when Redis comes back.
CELERY_BROKER_CONNECTION_RETRY = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]

# Workers announce themselves in Redis every WORKER_HEARTBEAT_SECONDS; a worker silent for
# WORKER_HEARTBEAT_TTL is dead, and the sweeper fails its running queries with worker_lost.
WORKER_HEARTBEAT_SECONDS = env_float("WORKER_HEARTBEAT_SECONDS", 2.0)
WORKER_HEARTBEAT_TTL = env_float("WORKER_HEARTBEAT_TTL", 10.0)
SWEEP_INTERVAL_SECONDS = env_float("SWEEP_INTERVAL_SECONDS", 5.0)
# A query still queued after this long (no worker took it) ends failed/worker_lost.
MAX_QUEUED_SECONDS = env_float("MAX_QUEUED_SECONDS", 900.0)
# A query queued this long whose message is neither in its queue nor held by a worker (its web
# process died between committing the row and sending the message) is dispatched again.
UNDISPATCHED_QUEUED_SECONDS = env_float("UNDISPATCHED_QUEUED_SECONDS", 30.0)
# A queued query whose message a worker took this long ago and never started (the worker died) goes
# back to the queue. Longer than a live worker on a loaded machine can take to start a task it took:
# a live holder would only see its query run by another (harmless, the claim decides), but why churn.
UNCLAIMED_REDELIVER_SECONDS = env_float("UNCLAIMED_REDELIVER_SECONDS", 30.0)
REDIS_KEY_PREFIX = env_str("REDIS_KEY_PREFIX", "sightline")
# An admitted request holds its concurrent slot this long until its Query row is committed (which
# extends the slot to the whole query); a web process that dies in between leaks it no longer, and
# the sweeper refunds the reservation of an admission still without a row after this long.
ADMISSION_LEASE_SECONDS = env_float("ADMISSION_LEASE_SECONDS", 30.0)

# --- inference ------------------------------------------------------------------------------
TINY_MODEL_DIR = Path(env_str("TINY_MODEL_DIR", str(VAR_DIR / "models" / "tiny-glm4v")))
# A Hugging Face id or a local path. Production: zai-org/GLM-4.6V-Flash.
INFERENCE_MODEL = env_str("INFERENCE_MODEL", str(TINY_MODEL_DIR))
# The name clients use for the model in requests and in /v1/models.
INFERENCE_MODEL_NAME = env_str("INFERENCE_MODEL_NAME", "glm-4.6v-flash")
INFERENCE_DEVICE = env_str("INFERENCE_DEVICE", "")  # "" = CUDA when present, else CPU
INFERENCE_DTYPE = env_str("INFERENCE_DTYPE", "")  # "" = bfloat16 on CUDA, float32 on CPU
# The Celery queue of the model; workers for this model consume it (`celery -A config worker -Q ...`).
INFERENCE_QUEUE = env_str("INFERENCE_QUEUE", f"infer.{INFERENCE_MODEL_NAME}")

MAX_IMAGE_BYTES = env_int("MAX_IMAGE_BYTES", 10 * 1024 * 1024)
MAX_IMAGE_PIXELS = env_int("MAX_IMAGE_PIXELS", 40_000_000)
MAX_IMAGE_SIDE = env_int("MAX_IMAGE_SIDE", 448)
MAX_PROMPT_CHARS = env_int("MAX_PROMPT_CHARS", 8000)  # all messages of a conversation together
# Prompt tokens of the whole conversation (template and images included). The web tier counts them
# with the model's tokenizer when it can load one without torch, else bounds them from characters.
MAX_PROMPT_TOKENS = env_int("MAX_PROMPT_TOKENS", 8192)
# Images one request (one conversation) may carry; 0 is fine: the model answers text-only questions.
MAX_IMAGES_PER_REQUEST = env_int("MAX_IMAGES_PER_REQUEST", 8)
MAX_NEW_TOKENS = env_int("MAX_NEW_TOKENS", 1024)
# The currency of every price, cost, spend and budget (config/money.py; README: Prices, spend and budgets).
CURRENCY = env_currency("CURRENCY", "USD")

# Several models at once (config/models_registry.py): JSON, public name -> {"model", "queue"?,
# "backend"?, "engine_url"?, "engine_api_key"?, "engine_model"?, "max_images"?, "max_new_tokens"?}.
# Each model has its own queue and workers. Unset: the one model of the settings above.
INFERENCE_MODELS = parse_models(
    env_str("INFERENCE_MODELS", ""), max_images=MAX_IMAGES_PER_REQUEST, max_new_tokens=MAX_NEW_TOKENS
)
if INFERENCE_MODELS:
    _replaced = [name for name in REPLACED_SETTINGS if env_str(name, "").strip()]
    if _replaced:
        raise ImproperlyConfigured(
            f"{', '.join(_replaced)} cannot be set beside INFERENCE_MODELS: each model's entry says its model, "
            "queue and engine. Unset them, and pick a process's model with INFERENCE_MODEL_NAME."
        )
    if not env_str("INFERENCE_MODEL_NAME", "").strip():
        INFERENCE_MODEL_NAME = next(iter(INFERENCE_MODELS))
    if INFERENCE_MODEL_NAME not in INFERENCE_MODELS:
        raise ImproperlyConfigured(
            f"INFERENCE_MODEL_NAME={INFERENCE_MODEL_NAME!r} is not a model of INFERENCE_MODELS "
            f"({', '.join(INFERENCE_MODELS)})."
        )
    if EMBEDDED and len(INFERENCE_MODELS) > 1:
        raise ImproperlyConfigured(
            "INFERENCE_MODELS with several models needs REDIS_URL: each model has a queue and Celery workers of "
            "its own, and the embedded default's one in-process worker serves one model."
        )
    # This process's model (the one a worker serves; a request without "model" asks for it), as the
    # single-model settings that the worker's start-up, heartbeat and health check read.
    _own = INFERENCE_MODELS[INFERENCE_MODEL_NAME]
    INFERENCE_MODEL, INFERENCE_QUEUE, INFERENCE_BACKEND = _own.model, _own.queue, _own.backend
    INFERENCE_ENGINE_URL, INFERENCE_ENGINE_API_KEY = _own.engine_url, _own.engine_api_key
    INFERENCE_ENGINE_MODEL = _own.engine_model
CELERY_WORKER_CONCURRENCY = ENGINE_MAX_INFLIGHT if INFERENCE_BACKEND == "openai" else INFERENCE_MAX_BATCH
# A worker started without -Q consumes its model's queue.
CELERY_TASK_DEFAULT_QUEUE = INFERENCE_QUEUE
DEFAULT_MAX_TOKENS = env_int("DEFAULT_MAX_TOKENS", 256)
# Remote image URLs are refused unless their host is listed here (no server-side fetching by default).
IMAGE_URL_ALLOWED_HOSTS = env_list("IMAGE_URL_ALLOWED_HOSTS", [])
SYNC_TIMEOUT = env_float("SYNC_TIMEOUT", 30.0)
# GET /metrics: open when METRICS_TOKEN is unset (like vLLM's and LiteLLM's); else it wants
# `Authorization: Bearer <METRICS_TOKEN>`. Recent-latency quantiles cover METRICS_WINDOW_SECONDS.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
METRICS_WINDOW_SECONDS = env_int("METRICS_WINDOW_SECONDS", 300)
# Token reservations (quotas) bound a query's prompt tokens from above: the conversation's UTF-8
# bytes, plus at most IMAGE_TOKEN_BOUND per image (GLM: one token per 28x28 pixels after scaling to
# MAX_IMAGE_SIDE) and TEMPLATE_TOKEN_BOUND for the chat template.
IMAGE_TOKEN_BOUND = env_int("IMAGE_TOKEN_BOUND", (MAX_IMAGE_SIDE // 28 + 1) ** 2 + 2)
TEMPLATE_TOKEN_BOUND = env_int("TEMPLATE_TOKEN_BOUND", 32)
STREAM_COALESCE_SECONDS = env_float("STREAM_COALESCE_SECONDS", 0.02)
# Choices one chat request may ask for (`n`): they are decoded together, each costs its tokens.
MAX_N = env_int("MAX_N", 4)
# GLM-4.6V thinks before it answers unless told not to. Chat completions, the Responses API and the
# websocket follow the model (on, as vLLM does); /v1/glm/infer's `result` is the answer alone, so
# it asks without thinking unless the request says otherwise.
CHAT_THINKING_DEFAULT = env_bool("CHAT_THINKING_DEFAULT", True)
GLM_INFER_THINKING_DEFAULT = env_bool("GLM_INFER_THINKING_DEFAULT", False)

# --- images, privacy and retention ----------------------------------------------------------
# Each query's normalised images (PNG) live in object storage through Django's storage API, content-
# addressed per tenant (inference/imagestore.py): files under IMAGE_STORAGE_DIR in the embedded default,
# or any S3-compatible bucket (django-storages + boto3) when IMAGE_S3_BUCKET is set. Credentials:
# IMAGE_S3_ACCESS_KEY_ID and IMAGE_S3_SECRET_ACCESS_KEY together, or neither (boto3's own chain:
# AWS_* variables, an instance or pod role). A half-set S3 configuration fails at start.
IMAGE_S3_BUCKET = env_str("IMAGE_S3_BUCKET", "").strip()
IMAGE_S3_SETTINGS = {
    name: env_str(name, "").strip()
    for name in (
        "IMAGE_S3_PREFIX",
        "IMAGE_S3_ENDPOINT_URL",
        "IMAGE_S3_REGION",
        "IMAGE_S3_ACCESS_KEY_ID",
        "IMAGE_S3_SECRET_ACCESS_KEY",
        "IMAGE_S3_ADDRESSING_STYLE",
        "IMAGE_S3_SERVE",
    )
}
IMAGE_STORAGE_DIR = env_str("IMAGE_STORAGE_DIR", "").strip()
# The image views redirect to a signed URL of the object (S3), valid this many seconds.
IMAGE_URL_EXPIRE_SECONDS = env_int("IMAGE_URL_EXPIRE_SECONDS", 60)
if IMAGE_S3_BUCKET:
    if IMAGE_STORAGE_DIR:
        raise ImproperlyConfigured(
            "IMAGE_S3_BUCKET and IMAGE_STORAGE_DIR are both set: images go to one store; unset one of them."
        )
    if bool(IMAGE_S3_SETTINGS["IMAGE_S3_ACCESS_KEY_ID"]) != bool(IMAGE_S3_SETTINGS["IMAGE_S3_SECRET_ACCESS_KEY"]):
        raise ImproperlyConfigured(
            "IMAGE_S3_ACCESS_KEY_ID and IMAGE_S3_SECRET_ACCESS_KEY go together: set both, or neither (boto3 then"
            " finds credentials itself: AWS_* variables, an instance or pod role)."
        )
    IMAGE_S3_ENDPOINT_URL = env_url("IMAGE_S3_ENDPOINT_URL")
    IMAGE_S3_SERVE = env_choice("IMAGE_S3_SERVE", "redirect", ("redirect", "stream"))
    _s3 = {
        "bucket_name": IMAGE_S3_BUCKET,
        # Keys are content addresses: writing one again writes the same bytes.
        "file_overwrite": True,
        "default_acl": None,
        "querystring_auth": True,
        "querystring_expire": IMAGE_URL_EXPIRE_SECONDS,
        "signature_version": "s3v4",
        "location": IMAGE_S3_SETTINGS["IMAGE_S3_PREFIX"].strip("/"),
    }
    for option, name in (
        ("endpoint_url", "IMAGE_S3_ENDPOINT_URL"),
        ("region_name", "IMAGE_S3_REGION"),
        ("access_key", "IMAGE_S3_ACCESS_KEY_ID"),
        ("secret_key", "IMAGE_S3_SECRET_ACCESS_KEY"),
    ):
        if IMAGE_S3_SETTINGS[name]:
            _s3[option] = IMAGE_S3_ENDPOINT_URL if option == "endpoint_url" else IMAGE_S3_SETTINGS[name]
    if IMAGE_S3_SETTINGS["IMAGE_S3_ADDRESSING_STYLE"]:
        _s3["addressing_style"] = env_choice("IMAGE_S3_ADDRESSING_STYLE", "auto", ("auto", "path", "virtual"))
    IMAGE_STORAGE = {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": _s3}
else:
    _half = [name for name, value in IMAGE_S3_SETTINGS.items() if value]
    if _half:
        raise ImproperlyConfigured(
            f"{', '.join(_half)} set without IMAGE_S3_BUCKET: set the bucket too, or unset them (images then"
            " go to files under IMAGE_STORAGE_DIR)."
        )
    IMAGE_S3_SERVE = "stream"
    IMAGE_STORAGE = {
        "BACKEND": "inference.imagestore.ImageFileStorage",
        "OPTIONS": {"location": IMAGE_STORAGE_DIR or str(VAR_DIR / "images")},
    }
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    "images": IMAGE_STORAGE,
}

# What a new tenant keeps (its owners change it in the dashboard, staff in the admin):
# "full" (prompts, answers, images), "no_images", or "metadata" (sizes, hashes, tokens, timings,
# outcome). And for how long, in days ("" or "forever": kept until deleted).
DEFAULT_PRIVACY_MODE = env_choice("DEFAULT_PRIVACY_MODE", "full", ("full", "no_images", "metadata"))
RETENTION_CONTENT_DAYS = env_days("RETENTION_CONTENT_DAYS")
RETENTION_IMAGE_DAYS = env_days("RETENTION_IMAGE_DAYS")
# In "metadata" mode a query's conversation and images are blanked when it ends (settles); its answer
# stays this long after, for the client that waits for it (or polls /v1/queries after a 504), then
# the pruner blanks it.
METADATA_HOLD_SECONDS = env_float("METADATA_HOLD_SECONDS", 300.0)
# Every worker (and the embedded default's worker thread) prunes expired content this often, one at
# a time across workers; each pass works in transactions of PRUNE_BATCH_SIZE rows and stops after
# PRUNE_PASS_SECONDS (the next pass goes on). 0 turns the workers' pruning off (cron: prune_queries).
PRUNE_INTERVAL_SECONDS = env_float("PRUNE_INTERVAL_SECONDS", 60.0)
PRUNE_BATCH_SIZE = env_int("PRUNE_BATCH_SIZE", 500)
PRUNE_PASS_SECONDS = env_float("PRUNE_PASS_SECONDS", 20.0)
# A stored image no row refers to is deleted by the pruner once it is this old (a web process died
# between writing it and committing its row; inference/imagestore.py, collect_orphans). Far longer
# than any writer's transaction.
ORPHAN_IMAGE_GRACE_SECONDS = env_float("ORPHAN_IMAGE_GRACE_SECONDS", 3600.0)
# The admin's search by prompt text reads the newest this many queries of the log (of the year,
# month or day picked in its calendar), never the whole log: its time is bounded at any size.
ADMIN_PROMPT_SEARCH_ROWS = env_int("ADMIN_PROMPT_SEARCH_ROWS", 20_000)

# --- http -----------------------------------------------------------------------------------
# A request body may be at most MAX_REQUEST_BYTES: the images a request may carry as base64 (4/3
# of their bytes) plus 1 MiB for the text. Larger bodies are refused with 413 payload_too_large
# from their Content-Length (or the bytes streamed so far), before authentication and unbuffered.
MAX_REQUEST_BYTES = env_int("MAX_REQUEST_BYTES", -(-MAX_IMAGE_BYTES * MAX_IMAGES_PER_REQUEST * 4 // 3) + 1024 * 1024)
# A websocket frame may carry what one MAX_IMAGE_BYTES image needs in base64, plus the frame's text.
MAX_WS_FRAME_BYTES = env_int("MAX_WS_FRAME_BYTES", -(-MAX_IMAGE_BYTES * 4 // 3) + 64 * 1024)
MAX_SOCKETS_PER_KEY = env_int("MAX_SOCKETS_PER_KEY", 32)  # open websockets per API key
# A socket's place in that count is a lease its web process renews; a dead process's places free within it.
WS_SOCKET_LEASE_SECONDS = env_float("WS_SOCKET_LEASE_SECONDS", 60.0)
WS_AUTH_TIMEOUT_SECONDS = env_float("WS_AUTH_TIMEOUT_SECONDS", 10.0)  # unauthenticated sockets are closed
# /health/ready wants a live worker with the model loaded on the queue. Off (0), it wants only
# PostgreSQL and Redis: for workers that scale to zero when idle (platform/k8s/overlays/example-vllm),
# where web pods must stay ready to queue the async jobs that bring a worker back.
READY_REQUIRES_WORKER = env_bool("READY_REQUIRES_WORKER", True)
# SIGTERM: a web process stops accepting, answers or ends (503) what it holds, and exits within this.
SHUTDOWN_GRACE_SECONDS = env_float("SHUTDOWN_GRACE_SECONDS", 30.0)
# X-Forwarded-For/-Proto are believed only from these addresses (the load balancer), comma-separated.
FORWARDED_ALLOW_IPS = env_str("FORWARDED_ALLOW_IPS", "127.0.0.1")
CORS_ALLOWED_ORIGINS = env_list("CORS_ALLOWED_ORIGINS", [])
CORS_URLS_REGEX = r"^/v1/.*$"
CORS_ALLOW_HEADERS = ("authorization", "content-type", "x-api-key", "x-request-id")
# Response headers a browser client may read: the request id, the quota headers, and Retry-After.
CORS_EXPOSE_HEADERS = (
    "x-request-id",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "retry-after",
)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_IMAGE_BYTES * 2 + 1024 * 1024  # base64 JSON bodies are ~4/3 the image
FILE_UPLOAD_MAX_MEMORY_SIZE = MAX_IMAGE_BYTES + 1024 * 1024

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["accounts.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "inference.parsers.JSONObjectParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "config.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Sightline API",
    "DESCRIPTION": "A multi-tenant API for the GLM-4.6V-Flash vision-language model.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
}

# --- the rest -------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
# Django's hashers (PBKDF2 first: ~0.5 s a password on a small CPU, on purpose). The test suite, and
# only it, sets this loud flag for itself and the servers it starts: it creates and signs in
# hundreds of users, and half a second each was minutes of CI. Hashes made under it are MD5: never
# set it where real passwords live.
if env_bool("INSECURE_FAST_PASSWORD_HASHING_FOR_TESTS"):
    PASSWORD_HASHERS = [
        "django.contrib.auth.hashers.MD5PasswordHasher",
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",  # still checks a hash made without the flag
    ]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
LOGIN_URL = "dashboard:login"
LOGIN_REDIRECT_URL = "dashboard:overview"
LOGOUT_REDIRECT_URL = "dashboard:login"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "static")))  # `collectstatic` writes here
with contextlib.suppress(OSError):  # WhiteNoise warns about a missing folder; empty, it serves from the apps
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)
WHITENOISE_USE_FINDERS = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # Every line names its request (X-Request-ID; "-" outside one): config/request_id.py.
    "filters": {"request_id": {"()": "config.request_id.RequestIdFilter"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["request_id"]}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
