"""Stream entries as read back from Redis: decoded safely, and their ids compared."""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from queue_worker.streams.events import Entry, decode_event

log = structlog.get_logger(__name__)

RawEntry = tuple[bytes, dict[bytes, bytes]]
# What decoding something read back from Redis may raise: msgspec's errors and
# UnicodeError are ValueErrors; deeply nested JSON raises RecursionError.
UNREADABLE: tuple[type[Exception], ...] = (ValueError, RecursionError)


def parse_entry(raw: RawEntry) -> Entry | None:
    """Decode one ``XRANGE``/``XREAD`` entry; ``None`` for an entry we cannot read."""
    entry_id, fields = raw
    try:
        event = decode_event(fields[b"data"])
        return Entry(
            id=entry_id.decode(),
            worker_id=fields.get(b"worker_id", b"").decode(),
            ts=int(fields.get(b"ts", b"0")),
            event=event,
            gen=int(fields.get(b"gen", b"0")),
        )
    except (KeyError, ValueError, RecursionError) as exc:  # UNREADABLE, and a missing field
        error = "JSON nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        log.warning("stream_entry_unreadable", entry_id=entry_id.decode(), error=error)
        return None


def parse_entries(raws: Sequence[RawEntry]) -> list[Entry]:
    return [e for e in map(parse_entry, raws) if e is not None]


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# ``id_key``'s comparison for the scripts: whether stream id ``a`` is newer than ``b``.
LUA_NEWER = """
local function newer(a, b)
  local ams, aseq = string.match(a, '(%d+)-(%d+)')
  local bms, bseq = string.match(b, '(%d+)-(%d+)')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end
"""
