"""The indexing tests run task bodies in this process, on the jobs tests' idle app."""

from tests.jobs.conftest import idle_app, ingest_root, jobs_config  # noqa: F401
