"""The one error root of the project and its few branches."""


class QueueWorkerError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(QueueWorkerError):
    """Settings are missing or invalid; each problem names its variable.

    ``variable`` names the first of them; ``problems`` holds them all, as
    ``(variable, message)`` pairs, one line each in ``str()``.
    """

    def __init__(self, variable: str, message: str, *more: tuple[str, str]) -> None:
        self.problems: tuple[tuple[str, str], ...] = ((variable, message), *more)
        super().__init__("\n".join(f"{name}: {text}" for name, text in self.problems))
        self.variable = variable
