"""The one error root of the project and its few branches."""


class QueueWorkerError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(QueueWorkerError):
    """A setting is missing or invalid; the message names the variable."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable
