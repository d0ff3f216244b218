"""The web page: server-rendered templates with plain JavaScript calling the JSON API."""
