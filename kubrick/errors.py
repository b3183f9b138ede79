"""The one exception type a person sees: the CLI prints its message on one line and exits non-zero."""


class KubrickError(Exception):
    """An expected failure with a message a person can act on (no traceback is shown)."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
