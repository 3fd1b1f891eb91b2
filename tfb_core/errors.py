"""The one exception type of tfb_core: its message says what was wrong and what is allowed."""


class TFBError(ValueError):
    """Bad input to tfb_core (a path, a file, an adapter, an argument)."""
