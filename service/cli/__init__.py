"""The `lookalike` command line: one module per command group.

Domain modules are imported inside the commands, so that `lookalike --help` and
`lookalike services …` start without loading Flask, NumPy or ONNX Runtime.
"""

from __future__ import annotations

import click

from service.cli.backup import backup, restore
from service.cli.check import check
from service.cli.database import db
from service.cli.evaluate import evaluate
from service.cli.finetune import finetune
from service.cli.ingest import ingest
from service.cli.keys import keys
from service.cli.models import models
from service.cli.reindex import reindex, tags
from service.cli.serve import run
from service.cli.services import services
from service.cli.storage import storage


@click.group()
def main() -> None:
    """Lookalike: image retrieval with PostgreSQL + pgvector."""


for command in (services, db, models, tags, reindex, ingest, evaluate, finetune, keys, run,
                storage, backup, restore, check):
    main.add_command(command)
