"""The behaviours a simulated executor can be given (light: the command line reads them)."""

from __future__ import annotations

from typing import Final

HEALTH_MODES: Final = ("healthy", "unhealthy", "hang", "flap", "nested")
EXECUTE_MODES: Final = (
    "normal",
    "error500",
    "garbage",
    "hang",
    "bad_status",
    "nested",
    "endless",
    "throttle",
)
