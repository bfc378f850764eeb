"""The error types users see: a clear, one-line message about bad input, or an attack's refusal."""


class GradleakError(ValueError):
    """Bad input or an impossible request; the CLI prints it on one line and exits 2."""


class Refusal(GradleakError):
    """An attack declines a scenario because one of its assumptions fails (a withheld input, a batch
    whose tokens reach the model's width, a model it does not understand). The message says which
    assumption failed. A refusal is a result of the run, not a crash: stores and tables keep it apart
    from failures. The CLI still prints it on one line and exits 2 for a single run."""
