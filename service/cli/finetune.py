"""`lookalike finetune`: fit a retrieval head on a labelled collection, install it as a model."""

from __future__ import annotations

from pathlib import Path

import click

from service.cli.console import app_session, domain_errors, stage_progress


@click.command("finetune")
@click.option("--collection", required=True)
@click.option("--label-key", default="label", show_default=True)
@click.option("--from", "base", default="efficientnet-lite0", show_default=True,
              help="The backbone; or several, comma-separated (e.g. efficientnet-lite0,"
              "efficientnet-lite2): a head on each, joined into one model. The first must "
              "have embedded the collection.")
@click.option("--dim", default=256, show_default=True, help="Output size of --unsupervised.")
@click.option("--split-key", help="Metadata key that keeps a group (e.g. a person) on one side.")
@click.option("--shots", type=int, help="Train on only this many images per class.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which images are the shots, and the head's initial weights.")
@click.option("--unsupervised", is_flag=True, help="PCA whitening instead of a labelled head.")
@click.option("--name", help="Name of the new model (default <from>+head-N).")
@click.option("--head", "head_kind", type=click.Choice(["cosine", "linear"]), default="cosine",
              show_default=True, help="Cosine-classifier MLP, or the linear softmax head.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Add mirrored and re-cropped views of the training photos.")
@click.option("--hidden", type=int, help="Hidden units of --head cosine (default 512; 0 under "
              "1000 labelled images).")
@click.option("--epochs", type=int, help="Epochs of --head cosine (default by training size).")
@click.option("--tune", type=click.Choice(["none", "last-conv", "last-block", "top"]),
              help="Re-train the backbone's last layers with the head: its last convolution, "
              "its last block and convolution, or (top) every block from its last "
              "downsampling on (default: last-conv with --head cosine and --augment, up to "
              "10,000 labelled images; else none).")
def finetune(collection: str, label_key: str, base: str, dim: int, split_key: str | None,
             shots: int | None, seed: int, unsupervised: bool, name: str | None,
             head_kind: str,
             augment: bool, hidden: int | None, epochs: int | None,
             tune: str | None) -> None:
    """Fit a retrieval head on a labelled collection and install backbone+head as a model."""
    from service.training.service import finetune as run_finetune

    with app_session() as (app, session), domain_errors():
        out = run_finetune(session=session, collection=collection, label_key=label_key,
                           base=base, model_dir=Path(app.config["MODEL_DIR"]),
                           split_key=split_key, shots=shots, seed=seed, unsupervised=unsupervised,
                           dim=dim, name=name, head_kind=head_kind, hidden=hidden,
                           epochs=epochs, max_pixels=int(app.config["MAX_IMAGE_PIXELS"]),
                           tune=tune, progress=stage_progress(),
                           store=app.extensions["content_store"] if augment else None)
    click.echo(f"installed {out.model}: trained on {out.train_images}, tested on "
               f"{out.test_images} images")
    click.echo(f"test mAP {out.raw_test_map:.4f} -> {out.head_test_map:.4f}, "
               f"P@10 {out.raw_test_p10:.4f} -> {out.head_test_p10:.4f}")
