"""`lookalike run`: services if needed, migrations, then nginx, gunicorn, a worker and beat."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import click

from service.cli.console import database_session, stack
from service.config import VAR_DIR, load_settings
from service.services.supervisor import Child, supervise_once


@click.command("run")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--api-workers", default=2, show_default=True)
# One process more than cores: while one waits on PostgreSQL or the disk, the others keep the
# cores busy (bench/ingest.py: 0.77 -> 0.81 of model-only throughput on 2 cores).
@click.option("--concurrency", default=min((os.cpu_count() or 1) + 1, 5), show_default=True,
              help="Celery worker processes (each holds the model, ~550 MB).")
def run(host: str, port: int, api_workers: int, concurrency: int) -> None:
    """Start services (if needed), migrate, then serve the API and a worker until Ctrl-C."""
    env = dict(os.environ)
    if concurrency > 1:
        # One ONNX Runtime thread per worker process: N processes on N cores overlap one
        # another's decoding and database waits; N x N threads would only oversubscribe.
        env.setdefault("LOOKALIKE_ORT_INTRA_OP_THREADS", "1")
    started_here = None
    if not (env.get("DATABASE_URL") and env.get("REDIS_URL")):
        services = stack()
        # Services started by `lookalike services start` are left running on exit.
        was_running = all(services.status().values())
        urls = services.start()
        started_here = None if was_running else services
        env.update({k: v for k, v in urls.items() if not os.environ.get(k)})
        click.echo("embedded PostgreSQL and Redis running under ./var")
    try:
        _serve(env, host, port, api_workers, concurrency)
    finally:
        if started_here is not None:
            started_here.stop()
            click.echo("embedded services stopped")


def _check_auth(settings: dict[str, object], env: dict[str, str], host: str) -> None:
    """Tell the API its bind host; refuse to serve a network without keys."""
    from service.auth.policy import auth_required, is_loopback
    from service.auth.service import count_active_keys

    env["LOOKALIKE_BIND_HOST"] = host
    if not auth_required({**settings, "BIND_HOST": host}):
        if not is_loopback(host):
            raise click.ClickException(f"refusing to serve {host} without API keys: unset "
                                       "LOOKALIKE_AUTH_REQUIRED or bind 127.0.0.1")
        click.echo(f"WARNING: API keys are OFF because the API listens on {host} (loopback): "
                   "anyone on this machine can read, change and delete every collection. "
                   "Bind another --host (or set LOOKALIKE_AUTH_REQUIRED=true) to require "
                   "keys.", err=True)
        return
    with database_session(str(settings["DATABASE_URL"])) as session:
        active = count_active_keys(session=session)
    if not active:
        click.echo("WARNING: API keys are required and none exists yet: every API request "
                   "will get 401. Create one: lookalike keys create --scope admin", err=True)


def _front_proxy(settings: dict[str, object], host: str, port: int):  # noqa: ANN202
    """nginx in front of gunicorn; None, with a warning, only on loopback without nginx."""
    from service.services.proxy import ProxyUnavailable, proxy_for_run

    try:
        proxy = proxy_for_run(VAR_DIR, host, port, settings)
    except ProxyUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    if proxy is None:
        click.echo(f"WARNING: nginx is not installed (`make proxy-deps` as root, or apt-get "
                   f"install -y nginx-light): gunicorn serves {host}:{port} directly, and a few "
                   "clients sending slowly can hold all its threads. Only acceptable on "
                   "loopback.", err=True)
    return proxy


def _metrics_dir(env: dict[str, str]) -> None:
    """One emptied metrics folder for gunicorn's and Celery's processes: /metrics adds them up.

    Emptied at each start: the files of processes that ran before would count again.
    """
    path = Path(env.get("PROMETHEUS_MULTIPROC_DIR") or VAR_DIR / "metrics")
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # only prometheus_client's files: the folder may be shared
        stale.unlink(missing_ok=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def _serve(env: dict[str, str], host: str, port: int, api_workers: int,
           concurrency: int) -> None:
    from service.embedding import registry
    from service.migrate import upgrade

    settings = load_settings({k: env[k] for k in ("DATABASE_URL", "REDIS_URL")})
    model_dir = Path(settings["MODEL_DIR"])
    try:
        registry.verify(model_dir, settings["DEFAULT_MODEL"])
    except registry.ModelError:
        click.echo(f"installing {settings['DEFAULT_MODEL']} …")
        try:
            registry.install(settings["DEFAULT_MODEL"], model_dir)
        except registry.ModelError as exc:
            raise click.ClickException(str(exc)) from exc
    upgrade(settings["DATABASE_URL"])
    _check_auth(settings, env, host)
    proxy = _front_proxy(settings, host, port)
    bind = ["-b", f"{host}:{port}"]
    if proxy is not None:
        proxy.prepare()
        proxy.socket_path.unlink(missing_ok=True)
        bind = proxy.gunicorn_bind()
        env["LOOKALIKE_TRUSTED_PROXIES"] = "1"  # only nginx reaches the socket
    _metrics_dir(env)
    bin_dir = Path(sys.executable).parent
    celery = [str(bin_dir / "celery"), "-A", "workers.celery_app:celery_app"]
    children = [
        Child("gunicorn", [str(bin_dir / "gunicorn"), "service.wsgi:app", *bind, "-w",
                           str(api_workers), "--threads", "4", "--timeout", "120",
                           "-c", "python:service.services.gunicorn_config"], env),
        Child("worker", [*celery, "worker", "-c", str(concurrency), "-Q", "lookalike",
                         "--loglevel", "INFO"], env),
        # Beat sends the job sweeper (recovers work lost with a worker or Redis).
        Child("beat", [*celery, "beat", "-s", str(VAR_DIR / "celerybeat-schedule"),
                       "--loglevel", "INFO"], env),
    ]
    for child in children:
        child.start()
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    failed = False
    try:
        if proxy is not None:
            from service.services.proxy import wait_for_socket

            api = children[0]
            wait_for_socket(proxy.socket_path, lambda: api.exit_code() is None)
            proxy.start()
        where = "nginx in front of gunicorn" if proxy else "gunicorn directly"
        click.echo(f"serving on http://{host}:{port} ({where}; Ctrl-C stops everything)")
        while not stopping:
            # A dead worker must not take the API down with it: restart what died.
            for event in supervise_once(children):
                click.echo(f"warning: {event}", err=True)
            if proxy is not None and not proxy.running():
                click.echo("warning: nginx exited; restarting it", err=True)
                proxy.start()
            time.sleep(0.5)
    except (RuntimeError, TimeoutError) as exc:
        click.echo(f"error: {exc}", err=True)
        failed = True
    finally:
        if proxy is not None:
            proxy.stop()
        for child in children:
            child.stop()
    if failed:
        sys.exit(1)
