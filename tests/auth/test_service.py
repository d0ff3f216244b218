"""API keys against the real database: hashed storage, authentication, revocation."""

from __future__ import annotations

import pytest
from flask import Flask
from sqlalchemy import select

from service.auth import service as keys
from service.auth.models import ApiKey
from service.db import session_scope
from service.errors import ApiError, NotFound, Unauthorized


def _create(app: Flask, **kwargs: object) -> keys.CreatedKey:
    with app.app_context(), session_scope() as session:
        return keys.create_key(session=session, **kwargs)  # type: ignore[arg-type]


def _authenticate(app: Flask, token: str) -> keys.Principal:
    with app.app_context(), session_scope() as session:
        return keys.authenticate(token, session=session)


def test_only_a_salted_hash_is_stored(app: Flask) -> None:
    created = _create(app, scope="read", collections=["s-a", "s-b"], name="svc")
    token = created.token
    _, prefix, secret = token.split("_", 2)
    assert token.startswith("lk_") and prefix == created.key.prefix and len(secret) >= 40
    with app.app_context(), session_scope() as session:
        row = session.get(ApiKey, created.key.id)
        assert row is not None
        stored = b"".join(str(getattr(row, c.key)).encode() + (getattr(row, c.key)
                          if isinstance(getattr(row, c.key), bytes) else b"")
                          for c in ApiKey.__table__.columns)
        assert secret.encode() not in stored and token.encode() not in stored
        assert len(row.salt) == 16 and len(row.hash) == 32
        assert row.collections == ["s-a", "s-b"] and row.scope == "read"
        other = keys.create_key(session=session, scope="read", collections=["s-a"])
        assert other.key.salt != row.salt  # per-key salt


def test_authenticate_gives_scope_and_collections(app: Flask) -> None:
    created = _create(app, scope="write", collections=["s-c"])
    principal = _authenticate(app, created.token)
    assert principal.key_id == created.key.id and principal.scope == "write"
    assert principal.collections == frozenset({"s-c"})
    assert principal.allows("read") and principal.allows("write")
    assert not principal.allows("admin")
    assert principal.sees("s-c") and not principal.sees("s-d")
    with app.app_context(), session_scope() as session:
        assert session.get(ApiKey, created.key.id).last_used_at is not None


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # wrong secret
    lambda t: t.replace("lk_", "xx_", 1),
    lambda t: t.rsplit("_", 1)[0],
    lambda t: "lk_" + "0" * 12 + "_" + t.rsplit("_", 1)[1],  # unknown prefix
    lambda t: "",
    lambda t: t + "\x00",
    lambda t: "lk_" + "a" * 5000 + "_x",
])
def test_bad_tokens_are_unauthorized(app: Flask, mangle: object) -> None:
    created = _create(app, scope="read", collections=["s-e"])
    with pytest.raises(Unauthorized) as info:
        _authenticate(app, mangle(created.token))  # type: ignore[operator]
    assert info.value.status == 401 and info.value.code == "unauthorized"


def test_revoked_key_stops_working(app: Flask) -> None:
    created = _create(app, scope="read", collections=["s-f"])
    _authenticate(app, created.token)
    with app.app_context(), session_scope() as session:
        revoked = keys.revoke_key(created.key.prefix, session=session)
        assert revoked.revoked_at is not None
        again = keys.revoke_key(str(created.key.id), session=session)  # idempotent, by id
        assert again.revoked_at == revoked.revoked_at
    with pytest.raises(Unauthorized):
        _authenticate(app, created.token)


def test_admin_keys_see_every_collection_and_others_must_name_some(app: Flask) -> None:
    admin = _create(app, scope="admin", collections=["ignored"])
    assert admin.key.collections is None
    assert _authenticate(app, admin.token).collections is None
    with pytest.raises(ApiError):
        _create(app, scope="read", collections=[])
    with pytest.raises(ApiError):
        _create(app, scope="owner", collections=["x"])
    with pytest.raises(ApiError):
        _create(app, scope="read", collections=["bad\x01name"])


def test_list_and_find(app: Flask) -> None:
    created = _create(app, scope="read", collections=["s-g"], name="lister")
    with app.app_context(), session_scope() as session:
        listed = {k.id for k in keys.list_keys(session=session)}
        assert created.key.id in listed
        assert keys.find_key(created.token, session=session).id == created.key.id
        with pytest.raises(NotFound):
            keys.find_key("nope", session=session)
        rows = session.scalars(select(ApiKey.prefix)).all()
        assert len(rows) == len(set(rows))
