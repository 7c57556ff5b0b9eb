"""Reading one setting's value from its text, with errors in plain words.

The parsers here see one value alone; rules that relate settings to each other
are in :mod:`queue_worker.config_rules`. A parser raises
:class:`Invalid` with what it expected and what it got, the way an operator
reads it (``expected a whole number from 0 to 65535, got 'abc'``): never
Python's own text, and never a password (see :func:`shown`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

from redis.connection import parse_url as parse_redis_url
from yarl import URL

from queue_worker.errors import QueueWorkerError

T = TypeVar("T")
C = TypeVar("C", bound=str)
N = TypeVar("N", int, float)

Parse = Callable[[str], T]

INT_CAP = 1 << 31  # the largest whole number a setting takes when it names no maximum


class Invalid(QueueWorkerError):
    """One value that cannot be used; the message says what was expected, in plain words."""


def redact_url(url: str) -> str:
    """``url`` with the password of its credentials replaced by ``***``.

    Works on URLs that do not parse (a bad port, an unencoded ``/`` in the
    password): everything before the last ``@`` after ``scheme://`` counts as
    credentials, so a password never shows, whatever the rest of the URL is.
    """
    scheme, sep, rest = url.partition("://")
    userinfo, at, location = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}://{user + ':' if colon else ''}***@{location}"


def shown(text: str) -> str:
    """``text`` quoted as an error shows it: a password in it (``user:pw@``) becomes ``***``."""
    if "://" not in text and "@" in text:  # host:port, or a URL without its scheme
        return repr(redact_url(f"_://{text}").removeprefix("_://"))
    return repr(redact_url(text))


def number_text(value: float) -> str:
    """``30`` for 30.0, ``0.05`` for 0.05: numbers as the help and the errors write them."""
    return str(int(value)) if float(value).is_integer() else repr(value)


def text(value: str) -> str:
    """Any text (the reader has already stripped it, and unset or blank means the default)."""
    return value


def optional_text(value: str) -> str | None:
    """Any text; blank means none (for a setting declared with ``blank``)."""
    return value or None


def whole(minimum: int, maximum: int | None = None) -> Parse[int]:
    """A whole number from ``minimum`` to ``maximum`` (or up to ``INT_CAP``)."""
    top = INT_CAP if maximum is None else maximum
    if maximum is None:
        wanted = f"a whole number of {minimum} or more"
    else:
        wanted = f"a whole number from {minimum} to {maximum}"

    def parse(value: str) -> int:
        try:
            result = int(value)
        except ValueError:
            raise Invalid(f"expected {wanted}, got {shown(value)}") from None
        if result > top:
            raise Invalid(f"expected a whole number from {minimum} to {top}, got {shown(value)}")
        if result < minimum:
            raise Invalid(f"expected {wanted}, got {shown(value)}")
        return result

    return parse


def number(minimum: float = 0.0, *, above: bool = False, most: float | None = None) -> Parse[float]:
    """A finite number of at least ``minimum`` (greater than it when ``above``), and at
    most ``most`` when given."""
    if most is not None:
        wanted = f"number from {number_text(minimum)} to {number_text(most)}"
    elif above:
        wanted = f"number above {number_text(minimum)}"
    elif minimum == 0:
        wanted = "number of 0 or more"
    else:
        wanted = f"number of at least {number_text(minimum)}"

    def parse(value: str) -> float:
        try:
            result = float(value)
        except ValueError:
            raise Invalid(f"expected a {wanted}, got {shown(value)}") from None
        if not math.isfinite(result):
            raise Invalid(f"expected a finite {wanted}, got {shown(value)}")
        if result < minimum or (above and result == minimum):
            raise Invalid(f"expected a {wanted}, got {shown(value)}")
        if most is not None and result > most:
            raise Invalid(f"expected a {wanted}, got {shown(value)}")
        return result

    return parse


def boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise Invalid(f"expected true or false (or 1/0, yes/no, on/off), got {shown(value)}")


def one_of(options: tuple[C, ...]) -> str:
    """``a, b or c``."""
    return f"{', '.join(options[:-1])} or {options[-1]}" if len(options) > 1 else options[0]


def choice(options: tuple[C, ...]) -> Parse[C]:
    """One of ``options``, spelt exactly so."""

    def parse(value: str) -> C:
        for option in options:
            if value == option:
                return option
        raise Invalid(f"expected {one_of(options)}, got {shown(value)}")

    return parse


def _split(url: str) -> SplitResult | None:
    """``url`` split, or None when even that fails (an unclosed ``[`` of an IPv6 host)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _port_of(parts: SplitResult) -> int | None:
    """The port of ``parts``; None when it names none; -1 when it names one that is no port."""
    try:
        return parts.port
    except ValueError:
        return -1


def http_url(value: str) -> str:
    """An http(s) URL, given back without its user and password (see ``userinfo``)."""
    parts = _split(value)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid(f"expected an http(s) URL with a host, got {shown(value)}")
    if _port_of(parts) == -1:
        raise Invalid(f"expected a port from 0 to 65535 in {shown(value)}")
    try:
        url = URL(value)
    except ValueError:
        raise Invalid(f"expected an http(s) URL with a host, got {shown(value)}") from None
    return str(url.with_user(None)).rstrip("/")


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: what credentials are kept under."""
    return str(URL(url).origin())


def userinfo(url: str) -> tuple[str, str, str] | None:
    """``(origin, user, password)`` of a URL that :func:`http_url` took, if it names a user."""
    parsed = URL(url)
    if parsed.user is None:
        return None
    return origin_of(http_url(url)), parsed.user, parsed.password or ""


def redis_url(value: str) -> str:
    """A Redis URL, checked as redis-py will read it; the errors never show its password."""
    parts = _split(value)
    if parts is None:
        raise Invalid(f"expected a URL, got {shown(value)}")
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise Invalid(f"expected redis://, rediss:// or unix://, got {shown(value)}")
    if parts.scheme == "unix":
        if not parts.path:
            raise Invalid(f"expected unix:///path/to/socket, got {shown(value)}")
    else:
        if _port_of(parts) in (0, -1):
            raise Invalid(f"expected a port from 1 to 65535 in {shown(value)}")
        if not parts.hostname:
            raise Invalid(f"expected a host in {shown(value)}")
    try:
        parse_redis_url(value)  # type: ignore[no-untyped-call]  # its query options too
    except ValueError as exc:  # redis-py's words: "Invalid value for 'x' in connection URL."
        reason = str(exc).rstrip(".")
        raise Invalid(f"{reason[:1].lower()}{reason[1:]}: {shown(value)}") from None
    return value


def readable_file(value: str) -> str:
    """The path of a file this process can read (what it holds is checked where it is
    used: a certificate, a key)."""
    try:
        with open(value, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise Invalid(f"cannot read {value!r}: {exc.strerror or exc}") from None
    return value


def host_port(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``."""
    parts = _split(f"//{value}")
    port = None if parts is None else _port_of(parts)
    if parts is None or not parts.hostname or port is None or port < 0 or parts.path:
        raise Invalid(f"expected host:port, got {shown(value)}")
    return parts.hostname, port


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")


def dns_name(value: str) -> str:
    if not all(_LABEL.fullmatch(label) for label in value.rstrip(".").split(".")):
        raise Invalid(f"expected a host name, got {shown(value)}")
    return value


def stream_prefix(value: str) -> str:
    if any(c in value for c in "{} \t\n"):
        raise Invalid(f"expected no braces or white space, got {shown(value)}")
    return value


def items(value: str) -> list[str]:
    """The non-blank items of a comma list; a list of nothing is an error."""
    found = [item.strip() for item in value.split(",") if item.strip()]
    if not found:
        raise Invalid("lists nothing")
    return found


def http_urls(value: str) -> tuple[str, ...]:
    """A comma list of http(s) URLs."""
    return tuple(http_url(item) for item in items(value))


def url_and_value(item: str) -> tuple[str, str | None]:
    """``url=value`` (split at the last ``=``), or ``url`` alone with None."""
    url, sep, rest = item.rpartition("=")
    if not sep:
        return item, None
    return url.strip(), rest.strip()


def weighted_urls(value: str) -> tuple[tuple[str, float | None], ...]:
    """``url[=weight],...``: each URL once, with its weight when one is given."""
    found: list[tuple[str, float | None]] = []
    for item in items(value):
        url, weight = url_and_value(item)
        bare = http_url(url)
        if any(bare == seen for seen, _ in found):
            raise Invalid(f"{bare} is listed twice")
        found.append((bare, None if weight is None else number(0, above=True)(weight)))
    return tuple(found)


def queue_urls(value: str) -> tuple[str, ...]:
    return tuple(url for url, _ in weighted_urls(value))


def per_executor(kind: Parse[N]) -> Parse[tuple[tuple[str, N], ...]]:
    """``url=value,...``, or ``value,...`` in executor order: those come back with empty
    URLs, for :func:`queue_worker.config_rules.aligned` to fill in from the executor list."""

    def parse(value: str) -> tuple[tuple[str, N], ...]:
        listed = items(value)
        if all("=" not in item for item in listed):
            return tuple(("", kind(item)) for item in listed)
        pairs: list[tuple[str, N]] = []
        for item in listed:
            url, given = url_and_value(item)
            if given is None:
                raise Invalid(f"expected url=value, got {shown(item)}")
            pairs.append((http_url(url), kind(given)))
        return tuple(pairs)

    return parse


MIN_TOKEN_CHARS = 16
MAX_TOKEN_FILE_BYTES = 64 << 10
TOKEN_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what a Bearer header carries as is

Tokens = tuple[tuple[str, str], ...]


def tokens(value: str) -> Tokens:
    """``[name:]token,...`` (commas or new lines between them): ``(name, token)`` pairs,
    the name empty when none is given. A token never shows in an error."""
    found: list[tuple[str, str]] = []
    for number_, item in enumerate(items(value.replace("\n", ",")), 1):
        name, sep, token = item.partition(":")
        if not sep:
            name, token = "", item
        elif TOKEN_NAME.fullmatch(name) is None:
            raise Invalid(
                f"token {number_}: a name is 1 to 64 letters, digits or ._@- before the ':'"
            )
        if TOKEN.fullmatch(token) is None or len(token) < MIN_TOKEN_CHARS:
            raise Invalid(
                f"token {number_}: expected at least {MIN_TOKEN_CHARS} visible ASCII "
                "characters (no spaces)"
            )
        found.append((name, token))
    return tuple(found)


def token_file(value: str) -> Tokens:
    """The tokens in the file at path ``value`` (a mounted Kubernetes Secret, say)."""
    try:
        with open(value, "rb") as file:
            data = file.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise Invalid(f"cannot read {value!r}: {exc.strerror or exc}") from None
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise Invalid(f"{value!r} is larger than {MAX_TOKEN_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid(f"{value!r} is not UTF-8 text") from None
    if not text.strip():
        raise Invalid(f"{value!r} holds no token")
    return tokens(text.strip())


HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def otlp_headers(value: str) -> tuple[tuple[str, str], ...]:
    """``name=value,...`` (values percent-decoded), as ``OTEL_EXPORTER_OTLP_HEADERS``
    is written; a name that is no HTTP header name, or a value with a line break, is an
    error. The values are not shown in the error (they hold credentials)."""
    found = []
    for item in items(value):
        name, eq, raw = item.partition("=")
        name = name.strip()
        if not eq or not HEADER_NAME.fullmatch(name):
            raise Invalid("expected name=value pairs with HTTP header names")
        decoded = unquote(raw.strip())
        if any(c in decoded for c in "\r\n\0"):
            raise Invalid(f"the value of {name} holds a line break")
        found.append((name, decoded))
    return tuple(found)
