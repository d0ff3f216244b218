"""Every table of the service on one metadata: what migrations compare the database against."""

from __future__ import annotations

from sqlalchemy import MetaData

import service.auth.models  # noqa: F401  (each import registers its tables on Base.metadata)
import service.embedding.defaults  # noqa: F401
import service.embedding.models  # noqa: F401
import service.evaluation.models  # noqa: F401
import service.graph.models  # noqa: F401
import service.hashing.models  # noqa: F401
import service.images.models  # noqa: F401
import service.indexing.reindex  # noqa: F401
import service.jobs.models  # noqa: F401
import service.signing  # noqa: F401
import service.text.models  # noqa: F401
from service.db import Base

# Partial HNSW indexes made per model and per code set when those rows are created
# (service/embedding/models.py, service/hashing/models.py): not part of the static schema.
RUNTIME_INDEX_PREFIXES = ("ix_image_embeddings_hnsw_", "ix_image_codes_hnsw_")
metadata: MetaData = Base.metadata


def include_object(obj: object, name: str | None, type_: str, reflected: bool,
                   compare_to: object) -> bool:
    """Alembic's filter: leave the per-model and per-code-set indexes to the code that owns them."""
    return not (type_ == "index" and name is not None and name.startswith(RUNTIME_INDEX_PREFIXES))
