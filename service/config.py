"""Settings: defaults, then the environment, then explicit overrides."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("LOOKALIKE_VAR_DIR", PROJECT_ROOT / "var"))
SERVICES_STATE_FILE = "services.json"

DEFAULTS: dict[str, Any] = {
    "DATABASE_URL": None,
    "REDIS_URL": None,
    "STORAGE_DIR": str(VAR_DIR / "storage"),
    "MODEL_DIR": str(VAR_DIR / "models"),
    "DEFAULT_MODEL": "efficientnet-lite0",
    # Uploads above this are refused with 413 before the body is read.
    "MAX_UPLOAD_BYTES": 50 * 1024 * 1024,
    # Decompression-bomb guard: a tiny file may claim billions of pixels.
    "MAX_IMAGE_PIXELS": 64_000_000,
    # Memory one decode may allocate (pixels x Pillow's bytes per pixel: 4 for RGB(A), CMYK,
    # float; 2 for 16-bit grey), and decodes one process runs at once (API threads wait).
    "MAX_DECODED_BYTES": 256 * 1024 * 1024,
    "MAX_CONCURRENT_DECODES": 2,
    "MAX_METADATA_BYTES": 64 * 1024,
    "SEARCH_MAX_K": 1000,
    # Link each new image into the kNN graph as it is embedded (off: rebuild the graph later).
    "GRAPH_LINK_ON_EMBED": True,
    # After a job, collections up to this size get one exact graph rebuild (quadratic);
    # larger ones link the job's images one by one.
    "GRAPH_REBUILD_MAX_IMAGES": 50_000,
    # Filters estimated to match fewer rows than this are ranked exactly (docs/search.md).
    "SEARCH_EXACT_MAX_ROWS": 3000,
    "EMBED_BATCH_SIZE": 16,
    "ORT_INTRA_OP_THREADS": 0,
    # Issue 5, bulk ingestion (docs/ingestion.md). Server directories jobs may read; empty
    # refuses every server path.
    "INGEST_ROOTS": [],
    "JOB_BATCH_SIZE": 32,
    # Batch messages in flight per job; each finished batch enqueues the next.
    "JOB_PARALLELISM": 8,
    # Items running (or a job without progress) this long are re-enqueued by the sweeper.
    "JOB_ITEM_TIMEOUT": 600,
    "JOB_SWEEP_INTERVAL": 30,
    # Claims of one item before it fails (a file that kills the worker must not loop forever).
    "JOB_MAX_ATTEMPTS": 3,
    "MAX_ARCHIVE_BYTES": 4 * 1024**3,
    # Zip-bomb guards: entries, total uncompressed bytes, uncompressed/compressed ratio.
    "ARCHIVE_MAX_ENTRIES": 1_000_000,
    "ARCHIVE_MAX_TOTAL_BYTES": 20 * 1024**3,
    "ARCHIVE_MAX_RATIO": 100,
    # A JSON manifest is parsed in the request: its body and its item count are capped.
    "MANIFEST_MAX_BYTES": 64 * 1024 * 1024,
    "MANIFEST_MAX_ITEMS": 100_000,
    # Issue 9 (docs/security.md). "auto": API keys are required unless the API listens on a
    # loopback address; `lookalike run` passes its --host as BIND_HOST.
    "AUTH_REQUIRED": "auto",
    "BIND_HOST": None,
    # Per API key (per client address when the API runs open), counted in Redis.
    "RATE_LIMIT_ENABLED": True,
    "RATE_LIMIT_DEFAULT": "600/minute",
    "RATE_LIMIT_UPLOAD": "120/minute",
    # Signs cursors; empty: a key generated at first start and kept in the database.
    "SECRET_KEY": "",
    # Host names served besides loopback ones ("photos.lan", ".example.org" for a domain and
    # its subdomains); without keys, other Hosts are refused (DNS rebinding).
    "ALLOWED_HOSTS": [],
    # Proxies in front whose X-Forwarded-For/-Proto to believe (`lookalike run` sets 1 when
    # its nginx is the only way in); 0 when clients reach gunicorn directly.
    "TRUSTED_PROXIES": 0,
}

# Plain names that deployments conventionally set without a prefix.
UNPREFIXED = ("DATABASE_URL", "REDIS_URL")


def embedded_service_urls(var_dir: Path = VAR_DIR) -> dict[str, str]:
    """URLs of the embedded services that `lookalike services start` recorded, if any."""
    state = var_dir / SERVICES_STATE_FILE
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k in UNPREFIXED and isinstance(v, str)}


def load_settings(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge defaults, embedded-service URLs, plain DATABASE_URL/REDIS_URL and overrides."""
    settings = dict(DEFAULTS)
    settings.update(embedded_service_urls())
    for name in UNPREFIXED:
        if os.environ.get(name):
            settings[name] = os.environ[name]
    if overrides:
        settings.update(overrides)
    return settings


def settings_from_env(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`load_settings` plus LOOKALIKE_* variables, as the app reads them (for the CLI)."""
    settings = load_settings()
    prefix = "LOOKALIKE_"
    for key, value in os.environ.items():
        if key.startswith(prefix):
            try:
                settings[key[len(prefix):]] = json.loads(value)
            except ValueError:
                settings[key[len(prefix):]] = value
    settings.update(overrides or {})
    return settings
