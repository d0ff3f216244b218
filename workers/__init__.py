"""Celery workers: thin tasks that call the domain functions in service/."""
