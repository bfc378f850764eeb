"""The one error type users see: a clear, one-line message about bad input."""


class GradleakError(ValueError):
    """Bad input or an impossible request; the CLI prints it on one line and exits 2."""
