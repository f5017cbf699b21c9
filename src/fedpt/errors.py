"""The one exception type users see: a single line saying what is wrong and what to do."""


class FedPTError(Exception):
    """A user-facing error; the CLI prints ``error: <message>`` and exits with status 2."""


class ServiceError(FedPTError):
    """A service FedPT depends on (the remote large LM) stayed unreachable: a round that meets it
    fails with its reason, and the run can be resumed once the service is back."""
