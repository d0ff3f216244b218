"""API keys: create, revoke, list and authenticate, storing only salted hashes of the secrets.

A token is `lk_<prefix>_<secret>`. The prefix is public (it names the key in listings and
logs); the secret is 32 random bytes shown once at creation. The secret has 256 bits of
entropy, so one HMAC-SHA256 under a per-key salt is as strong as a slow KDF would be (slow
hashes protect guessable passwords) and keeps authentication cheap on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.auth.models import SCOPES, ApiKey
from service.errors import ApiError, NotFound, Unauthorized
from service.images.validation import validate_collection

log = logging.getLogger(__name__)
TOKEN_PREFIX = "lk"
PREFIX_BYTES = 6  # 12 hex characters: unique enough to find the row, not a secret
SECRET_BYTES = 32
# last_used_at is written at most this often per key, so reads do not all become writes.
LAST_USED_RESOLUTION = timedelta(seconds=60)
SCOPE_RANK = {scope: rank for rank, scope in enumerate(SCOPES)}


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key (or nobody, when the API runs open on loopback)."""

    key_id: uuid.UUID | None
    prefix: str | None
    scope: str
    # None: every collection.
    collections: frozenset[str] | None

    def allows(self, scope: str) -> bool:
        """Whether this principal's scope includes `scope`."""
        return SCOPE_RANK[self.scope] >= SCOPE_RANK[scope]

    def sees(self, collection: str) -> bool:
        """Whether this principal may see `collection`."""
        return self.collections is None or collection in self.collections


# The principal of an API that runs without keys (loopback only, see docs/security.md).
OPEN = Principal(key_id=None, prefix=None, scope="admin", collections=None)


@dataclass(frozen=True)
class CreatedKey:
    """A new key's row and its token (the only time the token exists in clear)."""

    key: ApiKey
    token: str


def _digest(salt: bytes, secret: str) -> bytes:
    return hmac.new(salt, secret.encode(), hashlib.sha256).digest()


def create_key(*, session: Session, scope: str, collections: Iterable[str] | None,
               name: str = "") -> CreatedKey:
    """Create a key; admin keys see every collection, others only the ones named."""
    if scope not in SCOPES:
        raise ApiError("invalid_scope", f"scope must be one of {', '.join(SCOPES)}")
    allowed = None if collections is None else sorted(
        {validate_collection(c.strip()) for c in collections})
    if scope == "admin":
        allowed = None  # admin means everything, every collection included
    elif allowed is not None and not allowed:
        raise ApiError("invalid_collections", "name at least one collection")
    if len(name) > 128:
        raise ApiError("invalid_name", "name must be at most 128 characters")
    for _ in range(5):  # a prefix collision is astronomically rare; retry rather than fail
        prefix = secrets.token_hex(PREFIX_BYTES)
        secret = secrets.token_urlsafe(SECRET_BYTES)
        salt = secrets.token_bytes(16)
        key = ApiKey(id=uuid.uuid4(), prefix=prefix, salt=salt, hash=_digest(salt, secret),
                     name=name, scope=scope, collections=allowed)
        try:
            with session.begin_nested():
                session.add(key)
        except IntegrityError:
            continue
        session.flush()
        session.refresh(key)
        log.info("api key %s created (scope %s)", prefix, scope)
        return CreatedKey(key=key, token=f"{TOKEN_PREFIX}_{prefix}_{secret}")
    raise RuntimeError("could not draw an unused key prefix")


def find_key(id_or_prefix: str, *, session: Session) -> ApiKey:
    """A key by its id or its prefix, or 404."""
    value = id_or_prefix.strip()
    if value.startswith(f"{TOKEN_PREFIX}_"):
        value = value.split("_")[1]  # a pasted token: only its public part is used
    try:
        key = session.get(ApiKey, uuid.UUID(value))
    except ValueError:
        key = session.scalar(select(ApiKey).where(ApiKey.prefix == value))
    if key is None:
        raise NotFound("not_found", f"no api key {id_or_prefix!r}")
    return key


def revoke_key(id_or_prefix: str, *, session: Session) -> ApiKey:
    """Revoke a key (idempotent): it authenticates nothing from now on."""
    key = find_key(id_or_prefix, session=session)
    if key.revoked_at is None:
        key.revoked_at = session.scalar(select(func.now()))
        session.flush()
        log.info("api key %s revoked", key.prefix)
    return key


def list_keys(*, session: Session, include_revoked: bool = True) -> list[ApiKey]:
    """Every key, oldest first."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def count_active_keys(*, session: Session) -> int:
    """Keys that are not revoked."""
    return int(session.scalar(select(func.count()).select_from(ApiKey)
                              .where(ApiKey.revoked_at.is_(None))) or 0)


def authenticate(token: str, *, session: Session) -> Principal:
    """The principal of a bearer token, or Unauthorized (the same answer for every failure)."""
    parts = token.split("_", 2)
    invalid = Unauthorized("unauthorized", "invalid or revoked API key")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or not parts[2]:
        raise invalid
    prefix, secret = parts[1], parts[2]
    if len(prefix) > 32 or len(secret) > 256:
        raise invalid
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None:
        # Spend the same work as a real check, so timing does not tell which prefixes exist.
        hmac.compare_digest(_digest(b"\0" * 16, secret), b"\0" * 32)
        raise invalid
    if not hmac.compare_digest(_digest(key.salt, secret), key.hash) or key.revoked_at:
        raise invalid
    session.execute(update(ApiKey).where(
        ApiKey.id == key.id,
        or_(ApiKey.last_used_at.is_(None),
            ApiKey.last_used_at < func.now() - LAST_USED_RESOLUTION))
        .values(last_used_at=func.now()))
    return Principal(key_id=key.id, prefix=key.prefix, scope=key.scope,
                     collections=None if key.collections is None else frozenset(key.collections))
