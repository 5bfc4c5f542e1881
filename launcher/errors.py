"""Start-up failures the CLI reports in one line, without a traceback."""


class StartupError(Exception):
    """An expected start-up failure (a busy port, a dependency that cannot be reached), said in
    one line with what to do."""
