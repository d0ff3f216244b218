"""One typed settings object: defaults, then the embedded services' URLs, then the environment.

Every setting is read from `LOOKALIKE_<NAME>` (JSON for lists, as for any complex value);
DATABASE_URL and REDIS_URL are also read without the prefix, as deployments conventionally set
them. docs/settings.md is generated from this class (`python -m service.config`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("LOOKALIKE_VAR_DIR", PROJECT_ROOT / "var"))
SERVICES_STATE_FILE = "services.json"
PREFIX = "LOOKALIKE_"
MiB = 1024 * 1024
STORAGE_URL_FORM = re.compile(
    r"|file://(/.*)?|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?")
# A list given as JSON or as comma-separated words ("photos.lan, .example.org").
Words = Annotated[list[str], NoDecode]


def _plain(name: str) -> Any:
    return Field(default=None, validation_alias=AliasChoices(PREFIX + name, name),
                 description=f"{name} (also read without the prefix); unset: the embedded "
                             "service that `lookalike services start` runs under ./var")


class EmbeddedServices(PydanticBaseSettingsSource):
    """The URLs that `lookalike services start` recorded, below the environment."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: `__call__` reads the whole state file at once."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        try:
            data = json.loads((VAR_DIR / SERVICES_STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items()
                if k in ("DATABASE_URL", "REDIS_URL") and isinstance(v, str)}


class Settings(BaseSettings):
    """Every setting of the API, the workers and the CLI."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", populate_by_name=True)

    DATABASE_URL: str | None = _plain("DATABASE_URL")
    REDIS_URL: str | None = _plain("REDIS_URL")
    STORAGE_DIR: str = Field(str(VAR_DIR / "storage"),
                             description="Originals, thumbnails and job files")
    STORAGE_URL: str = Field("", description="Where originals and thumbnails live: empty or "
                             "file:// (STORAGE_DIR), file:///path, or s3://bucket/prefix "
                             "(credentials and region: the standard AWS variables and files; "
                             "docs/operations.md)")
    STORAGE_S3_ENDPOINT_URL: str = Field(
        "", validation_alias=AliasChoices(PREFIX + "STORAGE_S3_ENDPOINT_URL",
                                          "STORAGE_S3_ENDPOINT_URL"),
        description="S3 endpoint of another provider (MinIO, moto), also read without the "
                    "prefix; empty: AWS (or AWS_ENDPOINT_URL_S3)")
    STORAGE_MAX_OBJECT_BYTES: int = Field(256 * MiB, ge=1, description="Largest stored "
                                          "object read into memory; a bigger one under an "
                                          "original's key is refused, not loaded")
    MODEL_DIR: str = Field(str(VAR_DIR / "models"), description="Installed ONNX models")
    DEFAULT_MODEL: str = Field("efficientnet-lite0", description="Model of a fresh database "
                               "(`lookalike models default` switches it for every process)")
    SECRET_KEY: str = Field("", description="Signs cursors; empty: a key generated at first "
                            "start and kept in the database")
    MAX_UPLOAD_BYTES: int = Field(50 * MiB, ge=1, description="Bodies above this are refused "
                                  "with 413 before they are read")
    MAX_IMAGE_PIXELS: int = Field(64_000_000, ge=1, description="Decompression-bomb guard: "
                                  "a tiny file may claim billions of pixels")
    MAX_DECODED_BYTES: int = Field(256 * MiB, ge=1, description="Memory one decode may "
                                   "allocate (pixels x Pillow's bytes per pixel)")
    MAX_CONCURRENT_DECODES: int = Field(2, ge=1, description="Decodes one process runs at "
                                        "once; other threads wait")
    MAX_METADATA_BYTES: int = Field(64 * 1024, ge=1, description="Size of one image's "
                                    "metadata JSON")
    SEARCH_MAX_K: int = Field(1000, ge=1, description="Largest k a search may ask for")
    SEARCH_EXACT_MAX_ROWS: int = Field(3000, ge=0, description="Filters estimated to match "
                                       "fewer rows are ranked exactly (docs/search.md)")
    GRAPH_LINK_ON_EMBED: bool = Field(True, description="Link each new image into the kNN "
                                      "graph as it is embedded (off: rebuild the graph later)")
    GRAPH_REBUILD_MAX_IMAGES: int = Field(50_000, ge=0, description="After a job, collections "
                                          "up to this size get one exact graph rebuild "
                                          "(quadratic); larger ones link the job's images")
    ORT_INTRA_OP_THREADS: int = Field(0, ge=0, description="ONNX Runtime threads per process "
                                      "(0: one per core)")
    INGEST_ROOTS: Words = Field(default_factory=list, description="Server directories "
                                    "jobs may read; empty refuses every server path")
    JOB_BATCH_SIZE: int = Field(32, ge=1, description="Items one batch task claims")
    JOB_PARALLELISM: int = Field(8, ge=1, description="Batch messages in flight per job; "
                                 "each finished batch enqueues the next")
    JOB_ITEM_TIMEOUT: float = Field(600, gt=0, description="Seconds after which running "
                                    "items, a stalled job or a pending upload are recovered "
                                    "by the sweeper")
    JOB_SWEEP_INTERVAL: float = Field(30, gt=0, description="Seconds between sweeps (beat)")
    JOB_MAX_ATTEMPTS: int = Field(3, ge=1, description="Claims of one item, or starts of an "
                                  "expansion, before it fails")
    MAX_ARCHIVE_BYTES: int = Field(4 * 1024 * MiB, ge=1, description="Size of an archive "
                                   "uploaded to /api/v1/jobs")
    ARCHIVE_MAX_ENTRIES: int = Field(1_000_000, ge=1, description="Entries of one archive")
    ARCHIVE_MAX_TOTAL_BYTES: int = Field(20 * 1024 * MiB, ge=1, description="Uncompressed "
                                         "bytes of one archive")
    ARCHIVE_MAX_RATIO: float = Field(100, gt=0, description="Uncompressed / compressed size "
                                     "(zip bombs)")
    MANIFEST_MAX_BYTES: int = Field(64 * MiB, ge=1, description="A JSON manifest is parsed "
                                    "in the request: its body is capped")
    MANIFEST_MAX_ITEMS: int = Field(100_000, ge=1, description="Items of one manifest")
    AUTH_REQUIRED: bool | Literal["auto"] = Field("auto", description="API keys; auto: "
                                                  "required unless the API listens on "
                                                  "loopback (docs/security.md)")
    BIND_HOST: str | None = Field(None, description="The address the API listens on "
                                  "(`lookalike run` sets its --host)")
    ALLOWED_HOSTS: Words = Field(default_factory=list, description="Host names served "
                                     "besides loopback ones without keys ('.example.org': a "
                                     "domain and its subdomains)")
    TRUSTED_PROXIES: int = Field(0, ge=0, description="Proxies in front whose "
                                 "X-Forwarded-For/-Proto to believe (`lookalike run` sets 1 "
                                 "behind its nginx)")
    RATE_LIMIT_ENABLED: bool | Literal["auto"] = Field(
        "auto", description="Per-key request limits, counted in Redis; auto: on where keys "
                            "are required (a single local user is not throttled), true: also "
                            "per address when open")
    RATE_LIMIT_DEFAULT: str = Field("600/minute", description="Limit over all routes")
    RATE_LIMIT_UPLOAD: str = Field("120/minute", description="Limit over uploads and jobs")
    CELERY: dict[str, Any] = Field(default_factory=dict, description="Extra Celery settings "
                                   "(JSON), e.g. another default queue")
    LOG_FORMAT: Literal["auto", "json", "text"] = Field(
        "auto", description="Log lines as JSON objects or readable text; auto: JSON from the "
                            "servers (gunicorn, Celery worker and beat), text from the CLI")
    WORKER_METRICS_PORT: int | None = Field(None, ge=1, le=65535, description="A Celery "
                                            "worker serves its own /metrics on this port "
                                            "(unset: its values reach the API's /metrics "
                                            "through PROMETHEUS_MULTIPROC_DIR on one machine)")
    METRICS_EXACT_COUNT_MAX_ROWS: int = Field(200_000, ge=0, description="/metrics counts "
                                              "images and vectors exactly up to this many "
                                              "rows; larger tables are estimated from "
                                              "PostgreSQL's statistics (docs/operations.md)")

    @field_validator("INGEST_ROOTS", "ALLOWED_HOSTS", mode="before")
    @classmethod
    def _words(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [
                w.strip() for w in text.split(",") if w.strip()]
        return value

    @field_validator("STORAGE_URL")
    @classmethod
    def _storage_url(cls, value: str) -> str:
        # Checked at start-up: a typo must not send originals somewhere unexpected.
        if not STORAGE_URL_FORM.fullmatch(value.strip()):
            raise ValueError("STORAGE_URL must be empty, file://, file:///path or "
                             "s3://bucket[/prefix] (prefix: letters, digits, . _ - /)")
        return value.strip()

    @classmethod
    def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Overrides, then the environment, then the embedded services' URLs, then defaults."""
        return init_settings, env_settings, EmbeddedServices(settings_cls)


DEFAULTS: dict[str, Any] = Settings.model_construct().model_dump()


def load_settings(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings as a plain mapping (Flask's config, the CLI), validated and typed.

    Keys of `overrides` that are not settings (Flask's own, such as TESTING) pass through.
    """
    overrides = overrides or {}
    known = {k: v for k, v in overrides.items() if k in Settings.model_fields}
    values = Settings(**known).model_dump()
    values.update({k: v for k, v in overrides.items() if k not in Settings.model_fields})
    return values


def settings_table() -> str:
    """The Markdown table of every setting, for docs/settings.md."""
    rows = ["| setting | type | default | what it does |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, str) and default.startswith(str(VAR_DIR)):
            default = "./var" + default[len(str(VAR_DIR)):]
        kind = getattr(field.annotation, "__name__", None) or str(field.annotation)
        kind = kind.replace("typing.", "").replace("|", "or")
        if field.metadata and NoDecode in field.metadata:
            kind = "list of words (JSON or comma-separated)"
        rows.append(f"| `{PREFIX}{name}` | {kind} | `{json.dumps(default)}` "
                    f"| {field.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(settings_table())
