"""The one exception type users see: a single line saying what is wrong and what to do."""


class FedPTError(Exception):
    """A user-facing error; the CLI prints ``error: <message>`` and exits with status 2."""
