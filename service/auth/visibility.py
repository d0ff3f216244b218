"""Per-collection visibility: every ORM query made for a caller sees only its collections.

One listener on the app's session factory adds `collection IN (...)` to every ORM select,
update and delete of images and jobs (joins, subqueries and `Session.get` included) while a
caller with a collection list is being served. Views and domain code therefore cannot forget
the check: an id outside the caller's collections simply does not exist (404), and listings,
searches, clusters and facets only ever see allowed rows.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, sessionmaker, with_loader_criteria

from service.images.models import Image
from service.jobs.models import IngestJob

# Execution option for the rare internal check that must see every collection (e.g. whether
# another collection still references a file before it is deleted).
ALL_COLLECTIONS = "all_collections"


def install_visibility(factory: sessionmaker,
                       visible: Callable[[], frozenset[str] | None]) -> None:
    """Filter the factory's sessions to `visible()` collections (None: no filter)."""

    @event.listens_for(factory, "do_orm_execute")
    def _only_visible(state: ORMExecuteState) -> None:
        if not (state.is_select or state.is_update or state.is_delete):
            return
        # Column and relationship loads inherit the criteria from the statement that loaded.
        if state.is_column_load or state.is_relationship_load:
            return
        if state.execution_options.get(ALL_COLLECTIONS):
            return
        allowed = visible()
        if allowed is None:
            return
        names = sorted(allowed)
        # Lambdas, so that aliases of the tables (self-joins of the graph) are filtered too;
        # `names` becomes a bound parameter.
        state.statement = state.statement.options(
            with_loader_criteria(Image, lambda cls: cls.collection.in_(names),
                                 include_aliases=True),
            with_loader_criteria(IngestJob, lambda cls: cls.collection.in_(names),
                                 include_aliases=True),
        )
