"""Stored originals that no image row references, and their removal.

Requests that fail remove what they wrote; what is left is the work of a process killed
between its write and its commit. Removal goes through `remove_if_unreferenced`, under the
digest's content lock, so bytes that an upload in flight has written are kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.images.models import Image
from service.images.service import remove_if_unreferenced
from service.images.storage import ContentStore

CHUNK = 1000


def orphaned_digests(*, session: Session, store: ContentStore) -> Iterator[str]:
    """Digests with stored bytes and no row in any collection (a snapshot, without locks)."""
    listed = store.digests()
    while chunk := list(islice(listed, CHUNK)):
        referenced = set(session.scalars(select(Image.sha256).where(Image.sha256.in_(chunk)),
                                         execution_options={"all_collections": True}))
        session.rollback()
        yield from (d for d in chunk if d not in referenced)


def remove_orphans(*, session: Session, store: ContentStore) -> int:
    """Remove every unreferenced original (and its thumbnail); returns how many went."""
    return sum(remove_if_unreferenced(digest, session=session, store=store)
               for digest in list(orphaned_digests(session=session, store=store)))
