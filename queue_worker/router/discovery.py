"""Where the executors come from: discovery providers.

* ``compose`` — ``EXECUTOR_BASE_URL`` named ``-1..N`` (the seed's naming), fixed;
* ``list`` — ``EXECUTOR_URLS``, fixed;
* ``dns`` — every address of ``EXECUTOR_DNS_NAME`` (A and AAAA records) on
  ``EXECUTOR_PORT``, resolved again every ``DISCOVERY_INTERVAL_S``. The system
  resolver (``loop.getaddrinfo``) is used, or, with ``EXECUTOR_DNS_SERVER``, that
  DNS server is asked directly over UDP (a sidecar or a Consul agent, say).

A failed or empty resolution keeps the current members (an executor that is
really gone fails its health checks); only an answer that lists addresses
changes them. The router turns each change into ``executor.added`` /
``executor.removed`` (see :meth:`ExecutorPool.sync`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from queue_worker.config import Settings
from queue_worker.errors import QueueWorkerError

Resolver = Callable[[str], Awaitable[list[str]]]

TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1
RCODE_NXDOMAIN = 3


class DiscoveryError(QueueWorkerError):
    """The executors could not be discovered this time."""


class Discovery(Protocol):
    """A source of executor URLs; ``interval_s`` is ``None`` when they never change."""

    @property
    def name(self) -> str: ...
    @property
    def interval_s(self) -> float | None: ...

    async def resolve(self) -> tuple[str, ...]:
        """The executor base URLs now; raises :class:`DiscoveryError`."""
        ...


@dataclass(frozen=True)
class StaticDiscovery:
    """A fixed list of executors (``EXECUTOR_URLS`` or the compose naming)."""

    name: str
    urls: tuple[str, ...]
    interval_s: float | None = None

    async def resolve(self) -> tuple[str, ...]:
        return self.urls


def url_of(address: str, port: int, scheme: str = "http") -> str:
    """``http://10.0.0.7:8083`` or ``http://[fd00::7]:8083``."""
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


async def system_resolver(name: str) -> list[str]:
    """Every address of ``name`` from the system resolver (``loop.getaddrinfo``)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DiscoveryError(f"cannot resolve {name}: {exc}") from exc
    return [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


# --- a small DNS client (RFC 1035): A and AAAA questions over UDP ---------------------


def dns_query(query_id: int, name: str, qtype: int) -> bytes:
    """A recursive query for ``name`` of ``qtype``."""
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = name.rstrip(".").encode("idna").split(b".")
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    return header + qname + struct.pack("!HH", qtype, CLASS_IN)


def _skip_name(data: bytes, offset: int) -> int:
    while True:
        if offset >= len(data):
            raise ValueError("name runs past the message")
        length = data[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:  # a compression pointer ends the name
            return offset + 2
        offset += 1 + length


def dns_addresses(message: bytes, query_id: int) -> list[str]:
    """The A and AAAA addresses in an answer; raises ``ValueError`` on a bad or failed one.

    NXDOMAIN (the name does not exist) gives no address.
    """
    if len(message) < 12:
        raise ValueError("answer shorter than a DNS header")
    qid, flags, questions, answers, _, _ = struct.unpack("!HHHHHH", message[:12])
    if qid != query_id or not flags & 0x8000:
        raise ValueError("not the answer to our query")
    rcode = flags & 0x000F
    if rcode == RCODE_NXDOMAIN:
        return []
    if rcode:
        raise ValueError(f"DNS error code {rcode}")
    offset = 12
    for _ in range(questions):
        offset = _skip_name(message, offset) + 4
    found: list[str] = []
    for _ in range(answers):
        offset = _skip_name(message, offset)
        rtype, _cls, _ttl, length = struct.unpack("!HHIH", message[offset : offset + 10])
        offset += 10
        rdata = message[offset : offset + length]
        if len(rdata) != length:
            raise ValueError("record runs past the message")
        offset += length
        if rtype == TYPE_A and length == 4:
            found.append(str(ipaddress.IPv4Address(rdata)))
        elif rtype == TYPE_AAAA and length == 16:
            found.append(str(ipaddress.IPv6Address(rdata)))
    return found


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: dict[int, asyncio.Future[bytes]] = {}

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if len(data) >= 2:
            waiting = self.answers.get(int.from_bytes(data[:2], "big"))
            if waiting is not None and not waiting.done():
                waiting.set_result(data)

    def error_received(self, exc: Exception) -> None:
        for waiting in self.answers.values():
            if not waiting.done():
                waiting.set_exception(exc)


def nameserver_resolver(host: str, port: int = 53, timeout_s: float = 2.0) -> Resolver:
    """A resolver that asks the DNS server at ``host:port`` for A and AAAA records."""

    async def resolve(name: str) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            transport, exchange = await loop.create_datagram_endpoint(
                _Exchange, remote_addr=(host, port)
            )
        except OSError as exc:
            raise DiscoveryError(f"cannot reach DNS server {host}:{port}: {exc}") from exc
        try:
            ids = {qtype: secrets.randbits(16) for qtype in (TYPE_A, TYPE_AAAA)}
            for qtype, query_id in ids.items():
                exchange.answers[query_id] = loop.create_future()
                transport.sendto(dns_query(query_id, name, qtype))
            found: list[str] = []
            async with asyncio.timeout(timeout_s):
                for query_id in ids.values():
                    found += dns_addresses(await exchange.answers[query_id], query_id)
            return found
        except TimeoutError as exc:
            raise DiscoveryError(f"no answer from DNS server {host}:{port}") from exc
        except OSError as exc:  # e.g. ICMP port unreachable: nothing listens there
            raise DiscoveryError(f"no answer from DNS server {host}:{port}: {exc}") from exc
        except ValueError as exc:
            raise DiscoveryError(f"bad answer from DNS server {host}:{port}: {exc}") from exc
        finally:
            transport.close()

    return resolve


@dataclass(frozen=True)
class DnsDiscovery:
    """Every address of ``dns_name``, as ``http://<address>:<port>``."""

    dns_name: str
    port: int
    interval_s: float | None = 30.0
    resolver: Resolver = system_resolver
    scheme: str = "http"
    name: str = "dns"

    async def resolve(self) -> tuple[str, ...]:
        addresses = sorted(set(await self.resolver(self.dns_name)), key=_address_order)
        if not addresses:
            raise DiscoveryError(f"{self.dns_name} has no address")
        return tuple(url_of(a, self.port, self.scheme) for a in addresses)


def _address_order(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def discovery_for(settings: Settings, resolver: Resolver | None = None) -> Discovery:
    """The provider the settings ask for."""
    if settings.executor_dns_name:
        if resolver is None and settings.executor_dns_server is not None:
            host, port = settings.executor_dns_server
            resolver = nameserver_resolver(host, port, settings.health_timeout_s)
        return DnsDiscovery(
            settings.executor_dns_name,
            settings.executor_port,
            settings.discovery_interval_s,
            resolver or system_resolver,
        )
    return StaticDiscovery(settings.discovery, settings.executor_endpoints())
