"""HTTP client of the Queue Service, and the decoding of the tasks it hands out."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

from queue_worker.errors import QueueWorkerError
from queue_worker.streams.events import Task

MAX_EVAL_ID_CHARS = 256
EXCERPT_CHARS = 200


class QueueUnavailable(QueueWorkerError):
    """The queue could not be reached or answered with an error."""


class ReportRefused(QueueWorkerError):
    """The queue did not accept a report; worth retrying later."""

    def __init__(self, http_status: int, body: str) -> None:
        super().__init__(f"queue answered HTTP {http_status}: {body[:EXCERPT_CHARS]}")
        self.http_status = http_status


class InvalidTask(QueueWorkerError):
    """``GET /tasks/next`` answered something that is not a task."""

    def __init__(self, reason: str, excerpt: str, eval_id: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.excerpt = excerpt
        self.eval_id = eval_id


_task_decoder = msgspec.json.Decoder(Task | None)


def excerpt(body: bytes) -> str:
    return body[:EXCERPT_CHARS].decode("utf-8", errors="replace")


def _usable_eval_id(body: bytes) -> str | None:
    try:
        doc: Any = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if isinstance(doc, dict):
        value = doc.get("eval_id")
        if isinstance(value, str) and value.strip() and len(value) <= MAX_EVAL_ID_CHARS:
            return value
    return None


def parse_task(body: bytes, *, max_code_bytes: int = 1 << 20) -> Task | None:
    """The task in a ``/tasks/next`` body, ``None`` when the queue is empty.

    Raises :class:`InvalidTask` with a reason, an excerpt and, when the body
    still names a usable ``eval_id``, that id (so the task can be failed).
    """
    try:
        task: Task | None = _task_decoder.decode(body)
    except msgspec.DecodeError as exc:
        reason = "not JSON" if not _is_json(body) else str(exc)
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
    elif len(task.code) > max_code_bytes // 4 and len(task.code.encode()) > max_code_bytes:
        problem = f"code is larger than MAX_CODE_BYTES ({max_code_bytes})"
    if problem is not None:
        raise InvalidTask(problem, excerpt(body), _usable_eval_id(body))
    return task


def _is_json(body: bytes) -> bool:
    try:
        msgspec.json.decode(body)
    except msgspec.DecodeError:
        return False
    return True


class QueueClient:
    """``GET /tasks/next`` and the two report calls, with ``X-API-Key`` when set."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    def with_base_url(self, base_url: str) -> QueueClient:
        """A client of another queue with the same session, API key and timeout."""
        other = QueueClient(self.session, base_url)
        other.headers, other.timeout = self.headers, self.timeout
        return other

    def _task_url(self, eval_id: str, action: str) -> URL:
        return URL(f"{self.base_url}/tasks/{quote(eval_id, safe='')}/{action}", encoded=True)

    async def next_task(self, lease_s: float | None = None) -> bytes:
        """The raw body of ``GET /tasks/next``; raises :class:`QueueUnavailable`.

        With ``lease_s`` it asks for a lease (``?lease_s=``); a queue that does not
        know leases ignores the parameter and hands out the task without one.
        """
        params = {"lease_s": f"{lease_s:g}"} if lease_s else None
        try:
            async with self.session.get(
                f"{self.base_url}/tasks/next",
                params=params,
                headers=self.headers,
                timeout=self.timeout,
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise QueueUnavailable(f"HTTP {resp.status}: {excerpt(body)}")
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _post(self, url: URL, body: bytes) -> tuple[int, bytes]:
        try:
            async with self.session.post(
                url,
                data=body,
                headers={**self.headers, "Content-Type": "application/json"},
                timeout=self.timeout,
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ReportRefused(0, f"{type(exc).__name__}: {exc}") from exc

    async def complete(self, eval_id: str, output: dict[str, Any]) -> tuple[int, bool]:
        """Report success. Returns (http status, already reported)."""
        status, body = await self._post(
            self._task_url(eval_id, "complete"), msgspec.json.encode({"output": output})
        )
        if status == 404:
            return status, True
        if not 200 <= status < 300:
            raise ReportRefused(status, excerpt(body))
        return status, False

    async def fail(self, eval_id: str, error: str) -> tuple[int, bool]:
        """Report failure. Returns (http status, already reported)."""
        status, body = await self._post(
            self._task_url(eval_id, "fail"), msgspec.json.encode({"error": error})
        )
        if not 200 <= status < 300:
            raise ReportRefused(status, excerpt(body))
        try:
            answer: Any = msgspec.json.decode(body)
        except msgspec.DecodeError:
            answer = None
        return status, isinstance(answer, dict) and answer.get("status") == "not_found"

    async def renew(self, eval_id: str, lease_s: float) -> bool:
        """Extend a task's lease; ``False`` when the queue says it holds none."""
        url = self._task_url(eval_id, "renew").with_query(lease_s=f"{lease_s:g}")
        status, body = await self._post(url, b"{}")
        if status == 404:
            return False
        if not 200 <= status < 300:
            raise ReportRefused(status, excerpt(body))
        return True

    async def running_count(self) -> int | None:
        """The queue's own count of running tasks, when it reports one (``GET /stats``)."""
        try:
            async with self.session.get(
                f"{self.base_url}/stats", headers=self.headers, timeout=self.timeout
            ) as resp:
                if resp.status != 200:
                    return None
                stats: Any = msgspec.json.decode(await resp.read())
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError):
            return None
        running = stats.get("running") if isinstance(stats, dict) else None
        return running if isinstance(running, int) else None
