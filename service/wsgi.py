"""WSGI entry point for gunicorn: `gunicorn service.wsgi:app`."""

from service.api.auth import announce_auth
from service.app import create_app

app = create_app(log_format="json")  # LOG_FORMAT=auto: a server logs JSON lines
announce_auth(app)  # whether API keys are required, in the server's log
