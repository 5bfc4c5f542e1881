"""The REST + SSE gateway for browsers (see ``gateway.app.create_app``)."""
