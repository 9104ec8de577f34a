"""Domain errors. Services map them to gRPC status codes in one place."""


class PearlError(Exception):
    """Base class for errors a user can act on."""


class ModelLoadError(PearlError):
    """A model directory is missing, incomplete, corrupt or unsupported."""


class InvalidRequest(PearlError):
    """A request breaks a field rule; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class OutOfBlocks(PearlError):
    """The paged KV cache has no free block for this request."""


class UsageError(PearlError):
    """A flag's value a process cannot start with: a port in use, a bad --mps-shares."""
