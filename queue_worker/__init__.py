"""Queue worker: an event-sourced task router on Redis Streams."""

__version__ = "0.2.0"
