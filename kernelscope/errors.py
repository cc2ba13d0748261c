"""The one exception type that means "the user asked for something that cannot be done"."""


class KernelscopeError(ValueError):
    """Bad input or an unusable resource; the message is one line that says what to do.

    The command line prints the message alone (no traceback) and exits with status 2.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a one-line account of what was kept (a checkpoint, or nothing)."""
