"""Regenerate the tables of docs/events.md from the msgspec Structs of the code.

    python docs/gen_events.py           # rewrite the generated part of docs/events.md
    python docs/gen_events.py --check   # exit 1 when docs/events.md is out of date

Only the text between the ``<!-- generated:events -->`` markers is written;
the prose around it is edited by hand.
"""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path

import msgspec

from queue_worker.streams import events as ev
from queue_worker.streams import publisher

DOC = Path(__file__).with_name("events.md")
BEGIN, END = "<!-- generated:events -->", "<!-- /generated:events -->"


def type_name(tp: object) -> str:
    """``list[Candidate]``, ``str | None``, ``Literal['a', 'b']``: no module paths."""
    text = tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else repr(tp)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)


def nested(tp: object) -> list[type[msgspec.Struct]]:
    """The Structs a field type refers to (``Task``, ``list[Candidate]``, ...)."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return [tp]
    return [s for arg in typing.get_args(tp) for s in nested(arg)]


def summary(cls: type) -> str:
    doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
    return doc.replace("``", "`").replace("|", "\\|")


def version(cls: type[msgspec.Struct]) -> object:
    return next(f.default for f in msgspec.structs.fields(cls) if f.name == "v")


def table(cls: type[msgspec.Struct], skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| field | type | required | default |", "|---|---|---|---|"]
    for f in msgspec.structs.fields(cls):
        if f.name in skip:
            continue
        if f.required:
            default = ""
        elif f.default_factory is not msgspec.NODEFAULT:
            default = f"`{msgspec.json.encode(f.default_factory()).decode()}`"
        else:
            default = f"`{msgspec.json.encode(f.default).decode()}`"
        kind = type_name(f.type).replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{kind}` | {'yes' if f.required else 'no'} | {default} |")
    return rows


def render() -> str:
    out: list[str] = ["| type | version | struct | summary |", "|---|---|---|---|"]
    extra: dict[str, type[msgspec.Struct]] = {}
    for cls in ev.EVENT_TYPES:
        tag = str(cls.__struct_config__.tag)
        anchor = tag.replace(".", "")
        out.append(f"| [`{tag}`](#{anchor}) | {version(cls)} | `{cls.__name__}` | {summary(cls)} |")
    for cls in ev.EVENT_TYPES:
        tag = str(cls.__struct_config__.tag)
        out += ["", f"### `{tag}`", "", f"`{cls.__name__}`, version {version(cls)}. {summary(cls)}"]
        out.append("")
        out += table(cls, skip=("v",))
        for f in msgspec.structs.fields(cls):
            extra.update({s.__name__: s for s in nested(f.type)})
    out += ["", "### Nested structs", ""]
    for name, struct in sorted(extra.items()):
        out += [f"#### `{name}`", "", summary(struct), "", *table(struct), ""]
    out += ["### Pub/sub messages", ""]
    messages: list[tuple[str, type[msgspec.Struct]]] = [
        ("evaluation:completed", publisher.CompletedMessage),
        ("evaluation:failed", publisher.FailedMessage),
    ]
    for channel, message in messages:
        out += [f"#### `{channel}` (`{message.__name__}`)", "", summary(message), ""]
        out += [*table(message), ""]
    return "\n".join(out).rstrip() + "\n"


def updated(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{render()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    current = DOC.read_text(encoding="utf-8")
    fresh = updated(current)
    if "--check" in argv:
        if fresh != current:
            print(f"{DOC} is out of date: run python docs/gen_events.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
