"""The script every append goes through: the fence, the claims of tasks in flight, the
retry budget's count and the task index.

* **The fence.** A worker whose generation a peer took over (``{<prefix>}:fenced``)
  gets every append refused (``FENCED``): it cannot act on tasks recovered
  elsewhere. See ``router/liveness.py`` and ``router/fleet.py``.
* **The claims.** A task in flight holds ``{<prefix>}:claim:<eval_id>``; a second
  handout of it while a live worker holds it is refused here, atomically with
  recording it, and becomes ``task.duplicate_handout`` (see ``router/pulling.py``).
* **The outcome stream.** Each outcome entry (``task.completed``, ``task.failed``,
  ``task.rejected``) is also added to ``{<prefix>}:outcomes`` under the id it got in
  the main stream, in the same script call: both land or neither. The publisher and
  the reporter read only that stream. Should it hold an id at or above the new one (it
  was written to by hand), the copy gets an id of its own instead, with ``entry_id``
  naming the main stream's, and the reply counts it: the append itself never fails for it.
* **The dispatch count.** Each ``task.dispatched`` counts in the fleet's per-second
  bucket ``{<prefix>}:budget:<second>`` that the retry budget reads (``budget.py``),
  with no round trip of its own.
* **The task index.** Each entry that names an evaluation joins its history
  (``{<prefix>}:task:<eval_id>``) and moves its state (``{<prefix>}:tasks`` and
  ``{<prefix>}:tasks:<state>``, see ``index.py``) in the same script: the index is
  never behind the stream, and no reader has to read every entry back to keep it.
"""

from __future__ import annotations

from queue_worker.errors import QueueWorkerError
from queue_worker.streams import events as ev
from queue_worker.streams.entries import LUA_NEWER
from queue_worker.streams.events import (
    OUTCOME_TYPES,
    EntryDeadLettered,
    Event,
    TaskDispatched,
    TaskPulled,
    TaskRecovered,
    TaskReported,
    TaskRestored,
)

# The task index: a Lua function both the append script and the index's own catch-up
# (``index.py``) define. It adds entry ``id`` (time ``ms``) to ``eval_id``'s history and,
# when ``state`` is set and the entry is newer than the one the task's state came from,
# moves the task to ``state`` (naming ``executor``): a redelivered or reordered entry
# never moves a task back. It answers false when Redis refused one of its writes (a key
# of another type, written by hand): the index is derived, so that never fails the
# append (a script is not rolled back: an error after the XADD would leave the entry
# written and the batch retried, written again).
INDEX_ENTRY = (
    LUA_NEWER
    + """
local function failed(reply)
  return type(reply) == 'table' and reply.err ~= nil
end
local function index_entry(tag, tasks, id, ms, eval_id, state, executor)
  if failed(redis.pcall('ZADD', tag .. 'task:' .. eval_id, ms, id)) then return false end
  if state == '' then return true end
  local old = redis.pcall('HGET', tasks, eval_id)
  if failed(old) then return false end
  local old_id, old_state = nil, nil
  if old then
    old_id, old_state = string.match(old, '^(%S+) (%S+)')
  end
  if old_id and not newer(id, old_id) then return true end
  if old_state and old_state ~= state then
    if failed(redis.pcall('ZREM', tag .. 'tasks:' .. old_state, eval_id)) then return false end
  end
  if failed(redis.pcall('HSET', tasks, eval_id, id .. ' ' .. state .. ' ' .. executor)) then
    return false
  end
  if old_state ~= state then
    if failed(redis.pcall('ZADD', tag .. 'tasks:' .. state, ms, eval_id)) then return false end
  end
  return true
end
"""
)


def index_op(event: Event) -> tuple[str, str]:
    """The state an entry puts its task in, and the executor it names ('' when the entry
    does not change the state, or names none)."""
    match event:
        case ev.TaskPulled() | ev.TaskRecovered() | ev.TaskRestored():
            return "waiting", getattr(event, "executor", None) or ""
        case ev.TaskRetryScheduled() | ev.ExecutorThrottled():
            return "waiting", event.executor
        case ev.TaskDispatched():
            return "in_flight", event.executor
        case ev.TaskCompleted():
            return "completed", event.executor
        case ev.TaskFailed():
            return "failed", event.executor or ""
        case ev.TaskRejected():
            return "failed", ""
    return "", ""


# One script appends every batch: it refuses the whole batch when this worker's
# generation was fenced (a peer took it over), and keeps the per-task claims that stop
# a task from running twice in the fleet. A claim (``<worker> <generation>``) is taken
# by ``task.pulled`` and held until the queue acknowledged the outcome
# (``task.reported``), so a task handed out again before that, to any worker (this one
# included), is not run again. A claim whose holder is not alive (its liveness key does
# not hold that generation) counts for nothing. Each caller's events form one group; a
# group whose ``task.pulled`` finds the task claimed by a live worker is skipped (and
# reported back) without failing the others.
# KEYS[1] = the stream, KEYS[2] = the fenced hash, KEYS[3] = the outcome stream,
# KEYS[4] = the task index's state hash.
# ARGV[1] = worker, ARGV[2] = generation, ARGV[3] = ts, ARGV[4] = key tag,
# ARGV[5] = claim ttl (ms); then per group: n, then n x (type, eval_id, data, claim op,
# index state, executor). The op ``dispatch`` counts the entry in this second's budget
# bucket instead. An outcome type is copied to the outcome stream under the same id.
# The reply: the stream's last entry id before this call ('' when it was empty), then
# per group {'OK', ids, copies that needed an id of their own, ids left without a copy
# (the outcome stream took no id at all), index or budget writes Redis refused} or
# {'DUP', holder}. Every entry of one call is
# consecutive in the stream, so a reader that has folded up to that id can fold them
# without reading them.
BUDGET_BUCKET_TTL_MS = 30_000  # outlives the retry budget's window (10 s) with room
FIELDS = 6  # per entry in ARGV
APPEND = (
    INDEX_ENTRY
    + """
local worker, gen, tag = ARGV[1], ARGV[2], ARGV[4]
local OUTCOME = {OUTCOME_TYPES}
local fenced = redis.call('HGET', KEYS[2], worker)
if fenced and tonumber(fenced) >= tonumber(gen) then
  return redis.error_reply('FENCED worker ' .. worker .. ' generation ' .. gen ..
    ' was taken over by a peer')
end
-- Nothing is written when the outcome stream is not a stream (WRONGTYPE): a script is
-- not rolled back, so an error after the first XADD would leave half a batch behind.
redis.call('XLEN', KEYS[3])
local me = worker .. ' ' .. gen
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local out = {newest[1] and newest[1][1] or ''}
local i = 6
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  i = i + 1
  local holder = false
  for k = i, i + FIELDS * (n - 1), FIELDS do
    if ARGV[k + 3] == 'claim' then
      local held = redis.call('GET', tag .. 'claim:' .. ARGV[k + 1])
      if held then
        local w, g = string.match(held, '^(.*) (%d+)$')
        if w and redis.call('GET', tag .. 'alive:' .. w) == g then holder = held end
      end
    end
  end
  if holder then
    out[#out + 1] = {'DUP', holder}
  else
    local ids = {}
    local diverged, missing, refused = 0, {}, 0
    for k = i, i + FIELDS * (n - 1), FIELDS do
      local id = redis.call('XADD', KEYS[1], '*', 'type', ARGV[k], 'eval_id', ARGV[k + 1],
        'worker_id', worker, 'gen', gen, 'ts', ARGV[3], 'data', ARGV[k + 2])
      ids[#ids + 1] = id
      if ARGV[k + 1] ~= '' and
          not index_entry(tag, KEYS[4], id, ARGV[3], ARGV[k + 1], ARGV[k + 4], ARGV[k + 5]) then
        refused = refused + 1
      end
      if OUTCOME[ARGV[k]] then
        local copied = redis.pcall('XADD', KEYS[3], id, 'type', ARGV[k], 'eval_id', ARGV[k + 1],
          'worker_id', worker, 'gen', gen, 'ts', ARGV[3], 'data', ARGV[k + 2])
        if type(copied) == 'table' and copied.err then
          copied = redis.pcall('XADD', KEYS[3], '*', 'type', ARGV[k], 'eval_id', ARGV[k + 1],
            'worker_id', worker, 'gen', gen, 'ts', ARGV[3], 'data', ARGV[k + 2], 'entry_id', id)
          if type(copied) == 'table' and copied.err then
            missing[#missing + 1] = id
          else
            diverged = diverged + 1
          end
        end
      end
      local op = ARGV[k + 3]
      if op == 'claim' or op == 'take' then
        redis.call('SET', tag .. 'claim:' .. ARGV[k + 1], me, 'PX', ARGV[5])
      elseif op == 'release' then
        redis.call('DEL', tag .. 'claim:' .. ARGV[k + 1])
      elseif op == 'dispatch' then
        local bucket = tag .. 'budget:' .. math.floor(tonumber(ARGV[3]) / 1000)
        if failed(redis.pcall('HINCRBY', bucket, 'd', 1)) then
          refused = refused + 1  -- not counted for the retry budget
        else
          redis.call('PEXPIRE', bucket, BUCKET_TTL_MS)
        end
      end
    end
    out[#out + 1] = {'OK', ids, diverged, missing, refused}
  end
  i = i + FIELDS * n
end
return out
""".replace("BUCKET_TTL_MS", str(BUDGET_BUCKET_TTL_MS))
    .replace("FIELDS", str(FIELDS))
    .replace(
        "{OUTCOME_TYPES}",
        "{" + ", ".join(f"['{t.decode()}'] = true" for t in sorted(OUTCOME_TYPES)) + "}",
    )
)
CLAIM_TTL_MS = 7 * 24 * 3600 * 1000  # only a bound: a claim of a dead holder counts for nothing


def claim_op(event: Event) -> str:
    """What appending ``event`` does to its task's claim."""
    match event:
        case TaskPulled():
            return "claim"  # refused when a live worker holds it
        case TaskRestored() | TaskRecovered(action="redispatch"):
            return "take"
        case (
            TaskReported()
            | TaskRecovered(action="lease_lost")
            | EntryDeadLettered(projector="reporter")
        ):
            return "release"  # the queue has the outcome, took the task back, or never will
        case TaskDispatched():
            return "dispatch"  # counted for the retry budget
    return ""


class WorkerFenced(QueueWorkerError):
    """A peer took this worker over: the stream accepts nothing more from it."""


class DuplicateHandout(QueueWorkerError):
    """The pulled task is in flight in the fleet already; nothing was appended."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"task is in flight at {holder}")
        self.holder = holder
