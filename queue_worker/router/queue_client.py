"""HTTP client of the Queue Service, and the decoding of the tasks it hands out.

Every answer is read with a cap (see :mod:`queue_worker.router.bodies`): a task body
with ``max_task_bytes`` (derived from ``MAX_CODE_BYTES``), the report, renew and stats
answers with 64 KiB. Nothing the queue answers makes a call raise anything but the
errors named here.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import structlog
from yarl import URL

from queue_worker.config import Settings
from queue_worker.errors import QueueWorkerError
from queue_worker.router.bodies import (
    ANSWER_MAX_BYTES,
    DECODE_ERRORS,
    MAX_EVAL_ID_CHARS,
    BodyTooLarge,
    CutBody,
    decode_problem,
    eval_id_in,
    read_capped,
    read_some,
    task_body_max_bytes,
)
from queue_worker.streams.events import Task
from queue_worker.streams.tracecontext import (
    InvalidTraceparent,
    new_trace_id,
    parse_traceparent,
    parse_tracestate,
)

log = structlog.get_logger(__name__)

EXCERPT_CHARS = 200
# The cap of a task body for the default MAX_CODE_BYTES (1 MiB).
DEFAULT_TASK_MAX_BYTES = task_body_max_bytes(1 << 20)


class QueueUnavailable(QueueWorkerError):
    """The queue could not be reached or answered with an error."""


class ReportRefused(QueueWorkerError):
    """The queue did not accept a report; worth retrying later."""

    def __init__(self, http_status: int, body: str, *, shown: bool = False) -> None:
        # The queue's answer may echo what was reported (a task's output): it is told by its
        # size and hash, unless it is our own text (``shown``: a connection error).
        if shown:
            told = body[:EXCERPT_CHARS]
        else:
            data = body.encode("utf-8", "surrogateescape")
            told = f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"
        super().__init__(f"queue answered HTTP {http_status}: {told}")
        self.http_status = http_status


class InvalidTask(QueueWorkerError):
    """``GET /tasks/next`` answered something that is not a task."""

    def __init__(self, reason: str, excerpt: str, eval_id: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.excerpt = excerpt
        self.eval_id = eval_id


class _Handout(Task, frozen=True, kw_only=True):
    """A task as it comes: its trace context fields are anything until checked (a bad
    one starts a new trace, it does not reject the task), and its ``metadata`` is looked
    at for them only."""

    trace_id: Any = None
    traceparent: Any = None
    tracestate: Any = None
    metadata: Any = None


_task_decoder = msgspec.json.Decoder(_Handout | None)
_TASK_FIELDS = Task.__struct_fields__


def trace_context(handout: _Handout) -> tuple[str, str | None, str | None, str | None]:
    """(trace id, traceparent, tracestate, why a traceparent was ignored) of a task:
    its ``traceparent`` (or its ``metadata``'s) when valid, else a new trace. A
    ``trace_id`` the queue sent is not taken: the trace is the ``traceparent``'s."""
    meta = handout.metadata if isinstance(handout.metadata, dict) else {}
    given, state = handout.traceparent, handout.tracestate
    if given is None:
        given, state = meta.get("traceparent"), meta.get("tracestate")
    if given is None:
        return new_trace_id(), None, None, None
    try:
        parent = parse_traceparent(given)
    except InvalidTraceparent as exc:
        return new_trace_id(), None, None, f"traceparent ignored: {exc}"
    return parent.trace_id, parent.header(), parse_tracestate(state), None


def _task_of(handout: _Handout) -> tuple[Task, str | None]:
    """The task to record (its trace context settled) and why a traceparent was ignored."""
    trace_id, parent, state, ignored = trace_context(handout)
    fields = {name: getattr(handout, name) for name in _TASK_FIELDS}
    fields.update(trace_id=trace_id, traceparent=parent, tracestate=state)
    return Task(**fields), ignored


def excerpt(body: bytes) -> str:
    return body[:EXCERPT_CHARS].decode("utf-8", errors="replace")


def _usable_eval_id(body: bytes) -> str | None:
    """The body's ``eval_id`` when it is a usable one; for a body that is not even
    decodable JSON (cut, nested too deeply, garbled), the one its text still names."""
    try:
        doc: Any = msgspec.json.decode(body)
    except DECODE_ERRORS:
        return eval_id_in(body)
    if isinstance(doc, dict):
        value = doc.get("eval_id")
        if isinstance(value, str) and value.strip() and len(value) <= MAX_EVAL_ID_CHARS:
            return value
    return None


def parse_task(body: bytes, *, max_code_bytes: int = 1 << 20) -> Task | None:
    """The task in a ``/tasks/next`` body, ``None`` when the queue is empty.

    The task's trace context is settled here (:func:`trace_context`): a valid
    ``traceparent`` (in the task or its ``metadata``) gives the trace id, else a new trace
    is started; an invalid one is logged and noted in ``task.pulled``'s ``trace_ignored`` (see
    :func:`parse_handout`), never a rejection.

    Raises :class:`InvalidTask` with a reason, an excerpt and, when the body
    still names a usable ``eval_id``, that id (so the task can be failed). A body
    cut at its cap (:class:`CutBody`) is rejected as ``too_large``.
    """
    found = parse_handout(body, max_code_bytes=max_code_bytes)
    return None if found is None else found[0]


def parse_handout(body: bytes, *, max_code_bytes: int = 1 << 20) -> tuple[Task, str | None] | None:
    """:func:`parse_task`, with why the task's ``traceparent`` was ignored (``None``: it
    was valid, or there was none)."""
    if isinstance(body, CutBody):
        raise InvalidTask(f"task body is {body.problem}", excerpt(body), eval_id_in(body))
    try:
        task: _Handout | None = _task_decoder.decode(body)
    except DECODE_ERRORS as exc:
        reason = "not JSON" if not _is_json(body) else decode_problem(exc)
        raise InvalidTask(reason, excerpt(body), _usable_eval_id(body)) from exc
    if task is None:
        return None
    problem = None
    if not task.eval_id.strip():
        problem = "eval_id is empty"
    elif len(task.eval_id) > MAX_EVAL_ID_CHARS:
        problem = f"eval_id is longer than {MAX_EVAL_ID_CHARS} characters"
    elif task.timeout is not None and not task.timeout > 0:
        problem = "timeout must be a positive number"
    elif task.deadline is not None and not task.deadline > 0:
        problem = "deadline must be a positive number (unix seconds)"
    elif len(task.code) > max_code_bytes // 4 and len(task.code.encode()) > max_code_bytes:
        problem = f"code is larger than MAX_CODE_BYTES ({max_code_bytes})"
    if problem is not None:
        raise InvalidTask(problem, excerpt(body), _usable_eval_id(body))
    return _task_of(task)


def _is_json(body: bytes) -> bool:
    """Whether ``body`` is JSON syntax (JSON nested too deeply to decode counts as JSON)."""
    try:
        msgspec.json.decode(body)
    except RecursionError:
        return True
    except ValueError:
        return False
    return True


class QueueClient:
    """``GET /tasks/next`` and the two report calls, with ``X-API-Key`` when set.

    ``max_task_bytes`` caps a task body (:func:`task_body_max_bytes` of ``MAX_CODE_BYTES``).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        max_task_bytes: int = DEFAULT_TASK_MAX_BYTES,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_task_bytes = max_task_bytes

    @classmethod
    def from_settings(cls, session: aiohttp.ClientSession, settings: Settings) -> QueueClient:
        """The client of ``QUEUE_SERVICE_URL`` as the settings describe it."""
        return cls(
            session,
            settings.queue_service_url,
            api_key=settings.queue_api_key,
            timeout_s=settings.queue_timeout_s,
            max_task_bytes=task_body_max_bytes(settings.max_code_bytes),
        )

    def with_base_url(self, base_url: str) -> QueueClient:
        """A client of another queue with the same session, API key, timeout and cap."""
        other = QueueClient(self.session, base_url, max_task_bytes=self.max_task_bytes)
        other.headers, other.timeout = self.headers, self.timeout
        return other

    def _task_url(self, eval_id: str, action: str) -> URL:
        return URL(f"{self.base_url}/tasks/{quote(eval_id, safe='')}/{action}", encoded=True)

    async def next_task(self, lease_s: float | None = None, wait_s: float = 0.0) -> bytes:
        """The raw body of ``GET /tasks/next``; raises :class:`QueueUnavailable`.

        With ``lease_s`` it asks for a lease (``?lease_s=``); with ``wait_s``, that the
        queue hold the request up to that long for a task rather than answer ``null``
        (long polling, ``?wait_s=``). A queue that knows neither ignores the parameters:
        the task comes without a lease, ``null`` comes at once. A body over
        ``max_task_bytes`` is not read further: what was read comes back as a
        :class:`CutBody`, which :func:`parse_task` rejects as ``too_large``.
        """
        params = {}
        if lease_s:
            params["lease_s"] = f"{lease_s:g}"
        if wait_s:
            params["wait_s"] = f"{wait_s:g}"
        timeout = self.timeout
        if wait_s and timeout.total is not None:
            timeout = aiohttp.ClientTimeout(total=timeout.total + wait_s)
        try:
            async with self.session.get(
                f"{self.base_url}/tasks/next",
                params=params or None,
                headers=self.headers,
                timeout=timeout,
            ) as resp:
                if resp.status != 200:
                    body = await read_some(resp)
                    raise QueueUnavailable(f"HTTP {resp.status}: {excerpt(body)}")
                try:
                    return await read_capped(resp, self.max_task_bytes)
                except BodyTooLarge as exc:
                    problem = f"{exc} (the cap: 6 x MAX_CODE_BYTES + 64 KiB); not read further"
                    return CutBody(exc.prefix, problem)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _post(
        self, url: URL, body: bytes, extra: dict[str, str] | None = None
    ) -> tuple[int, bytes, bool]:
        """(status, body, whether the body is whole): an answer over 64 KiB is cut there.
        ``extra``: more headers (``traceparent``)."""
        try:
            async with self.session.post(
                url,
                data=body,
                headers={**self.headers, "Content-Type": "application/json", **(extra or {})},
                timeout=self.timeout,
            ) as resp:
                try:
                    return resp.status, await read_capped(resp, ANSWER_MAX_BYTES), True
                except BodyTooLarge as exc:
                    return resp.status, exc.prefix, False
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ReportRefused(0, f"{type(exc).__name__}: {exc}", shown=True) from exc

    async def complete(
        self, eval_id: str, output: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, bool]:
        """Report success (``headers``: the report's ``traceparent``). Returns (http
        status, already reported)."""
        status, body, _ = await self._post(
            self._task_url(eval_id, "complete"), msgspec.json.encode({"output": output}), headers
        )
        if status == 404:
            return status, True
        if not 200 <= status < 300:
            raise ReportRefused(status, excerpt(body))
        return status, False

    async def fail(
        self, eval_id: str, error: str, headers: dict[str, str] | None = None
    ) -> tuple[int, bool]:
        """Report failure (``headers``: the report's ``traceparent``). Returns (http
        status, already reported).

        A 2xx answer that cannot be read (too large, not JSON, nested too deeply)
        counts as accepted: the status says the queue took the report.
        """
        status, body, whole = await self._post(
            self._task_url(eval_id, "fail"), msgspec.json.encode({"error": error}), headers
        )
        if not 200 <= status < 300:
            raise ReportRefused(status, excerpt(body))
        if not whole:
            log.warning("queue_answer_too_large", eval_id=eval_id, call="fail", http_status=status)
            return status, False
        try:
            answer: Any = msgspec.json.decode(body)
        except DECODE_ERRORS as exc:
            log.warning(
                "queue_answer_unreadable",
                eval_id=eval_id,
                call="fail",
                http_status=status,
                error=decode_problem(exc),
            )
            answer = None
        return status, isinstance(answer, dict) and answer.get("status") == "not_found"

    async def create(self, task: dict[str, Any]) -> tuple[int, str]:
        """``POST /tasks``: enqueue ``task`` (an operator's retry). Returns the HTTP status
        and an excerpt of the answer; raises :class:`ReportRefused` (status 0) when the
        queue cannot be reached."""
        url = URL(f"{self.base_url}/tasks")
        status, body, _ = await self._post(url, msgspec.json.encode(task))
        return status, excerpt(body)

    async def renew(self, eval_id: str, lease_s: float) -> bool:
        """Extend a task's lease; ``False`` when the queue says it holds none."""
        url = self._task_url(eval_id, "renew").with_query(lease_s=f"{lease_s:g}")
        status, body, _ = await self._post(url, b"{}")
        if status == 404:
            return False
        if not 200 <= status < 300:
            raise ReportRefused(status, excerpt(body))
        return True

    async def counts(self) -> dict[str, int]:
        """The queue's counts by status (``GET /stats``: ``queued``, ``running``, ...): its
        whole-number fields only, at most 32 of them, each name at most 64 characters.
        Raises :class:`QueueUnavailable` when it cannot be reached or answers anything but
        a JSON object with HTTP 200."""
        try:
            async with self.session.get(
                f"{self.base_url}/stats", headers=self.headers, timeout=self.timeout
            ) as resp:
                status = resp.status
                body = await read_capped(resp, ANSWER_MAX_BYTES)
        except (aiohttp.ClientError, TimeoutError, BodyTooLarge) as exc:
            raise QueueUnavailable(f"GET /stats: {type(exc).__name__}: {exc}"[:300]) from exc
        if status != 200:
            raise QueueUnavailable(f"GET /stats answered HTTP {status}")
        try:
            stats: Any = msgspec.json.decode(body)
        except DECODE_ERRORS as exc:
            raise QueueUnavailable(f"GET /stats answered no JSON: {decode_problem(exc)}") from exc
        if not isinstance(stats, dict):
            raise QueueUnavailable("GET /stats answered JSON that is not an object")
        found: dict[str, int] = {}
        for name, value in stats.items():
            if isinstance(value, int) and not isinstance(value, bool) and len(name) <= 64:
                found[name] = value
                if len(found) == 32:
                    break
        return found

    async def running_count(self) -> int | None:
        """The queue's own count of running tasks, when it reports one (``GET /stats``);
        ``None`` for any answer that is not a readable count."""
        try:
            async with self.session.get(
                f"{self.base_url}/stats", headers=self.headers, timeout=self.timeout
            ) as resp:
                if resp.status != 200:
                    return None
                stats: Any = msgspec.json.decode(await read_capped(resp, ANSWER_MAX_BYTES))
        except (aiohttp.ClientError, TimeoutError, BodyTooLarge, ValueError, RecursionError):
            return None
        running = stats.get("running") if isinstance(stats, dict) else None
        return running if isinstance(running, int) and not isinstance(running, bool) else None


class QueueClients:
    """The client of each queue: the configured ones, and any other a stream entry names
    (a queue of an earlier configuration), with the default queue's settings."""

    def __init__(self, default: QueueClient, urls: tuple[str, ...] = ()) -> None:
        self.default = default
        self._by_url: dict[str, QueueClient] = {default.base_url: default}
        for url in urls:
            self.get(url)

    def get(self, url: str | None) -> QueueClient:
        """The client of the queue at ``url`` (``None``: the default queue)."""
        if url is None:
            return self.default
        key = url.rstrip("/")
        client = self._by_url.get(key)
        if client is None:
            client = self._by_url[key] = self.default.with_base_url(key)
        return client
