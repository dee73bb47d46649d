"""Domain errors raised by services. The API maps each to an HTTP status in one place."""


class ServiceError(Exception):
    status = 400
    code = "invalid"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(ServiceError):
    status = 400
    code = "invalid"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class PermissionDenied(ServiceError):
    status = 403
    code = "forbidden"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


class QuotaExceeded(ServiceError):
    status = 403
    code = "quota_exceeded"


class NoAgentAvailable(ServiceError):
    status = 503
    code = "no_agent_available"
