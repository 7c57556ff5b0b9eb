"""How a setting is declared (:func:`setting`), and how declared settings are read.

A field of the settings dataclass made by :func:`setting` is read from the
environment variable named as the field, in capitals. Every value is parsed
on its own first; then the rules that relate settings to each other run,
each once the settings it needs are known to be valid. Every problem is
collected, and one :class:`ConfigError` names them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from queue_worker.config_values import Invalid, Parse, number_text
from queue_worker.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")


@dataclass(frozen=True, slots=True)
class Rule(Generic[T]):
    """How a setting depends on others: ``needs`` names their fields.

    ``apply(value, given, settings)`` gets the setting's value (parsed, or its
    default), the text given for it (None when unset) and the settings read so
    far; it gives the value back, changed or not, or raises :class:`Invalid`.
    It runs only when the setting and all it needs are valid.
    """

    needs: tuple[str, ...]
    apply: Callable[[T, str | None, Any], T]


@dataclass(frozen=True, slots=True)
class Setting(Generic[T]):
    """The declaration of one environment variable; see :func:`setting`."""

    parse: Parse[T]
    meaning: str
    shown: str | None
    rule: Rule[T] | None
    blank: bool = False  # a variable set but blank is a value (parsed from ""), not "unset"


def setting(
    default: T,
    parse: Parse[T],
    meaning: str,
    *,
    shown: str | None = None,
    rule: Rule[T] | None = None,
    secret: bool = False,
    blank: bool = False,
) -> T:
    """A settings field, read from the variable named as the field, in capitals.

    ``parse`` reads the value alone (its type, bounds, choices); ``rule`` relates
    it to other settings; ``meaning`` is its line in ``--help`` and the README.
    ``shown`` is the default as they tell it, when that is not the field's default
    as it stands. A ``secret`` stays out of ``repr``. With ``blank``, a variable set but
    blank is parsed (from ``""``: it turns something off, say) instead of meaning unset.
    """
    declared = Setting(parse, meaning, shown, rule, blank)
    return field(default=default, repr=not secret, metadata={"setting": declared})


def declared(cls: type[DataclassInstance]) -> Iterator[tuple[str, Setting[Any]]]:
    """``(field name, declaration)`` of each field of ``cls`` made by :func:`setting`."""
    for item in fields(cls):
        if "setting" in item.metadata:
            yield item.name, item.metadata["setting"]


def default_text(item: Field[Any]) -> str:
    """A field's default as ``--help`` and the README show it."""
    value = item.default
    if value is None or value == ():
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return number_text(value)
    return str(value)


def environment(cls: type[DataclassInstance]) -> tuple[tuple[str, str, str], ...]:
    """``(variable, default, meaning)`` of every declared setting, in declaration order."""
    return tuple(
        (item.name.upper(), declared.shown or default_text(item), declared.meaning)
        for item in fields(cls)
        if (declared := item.metadata.get("setting")) is not None
    )


def given(env: Mapping[str, str], variable: str, *, blank: bool = False) -> str | None:
    """The text given for ``variable``, stripped; None when it is unset, or blank unless
    ``blank`` (then ``""``)."""
    value = env.get(variable)
    if value is None or (not value.strip() and not blank):
        return None
    return value.strip()


def _rules(settings: dict[str, Setting[Any]]) -> list[tuple[str, Rule[Any]]]:
    """The fields with a rule, each after the fields with a rule that it needs."""
    order: dict[str, Rule[Any]] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name not in settings:
            raise TypeError(f"a settings rule needs {name}, which is not a declared setting")
        rule = settings[name].rule
        if rule is None or name in order:
            return
        if name in path:
            raise TypeError(f"settings rules need each other: {' -> '.join(path)}")
        for need in rule.needs:
            visit(need, (*path, name))
        order[name] = rule

    for name in settings:
        visit(name, ())
    return list(order.items())


def read(cls: type[D], env: Mapping[str, str]) -> D:
    """``cls`` read from ``env``; raise one ConfigError naming every bad variable."""
    settings = dict(declared(cls))
    texts = {
        name: text
        for name, declaration in settings.items()
        if (text := given(env, name.upper(), blank=declaration.blank)) is not None
    }
    values: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name, text in texts.items():
        try:
            values[name] = settings[name].parse(text)
        except Invalid as exc:
            problems[name] = str(exc)
    result = replace(cls(), **values)
    for name, rule in _rules(settings):
        if name in problems or any(need in problems for need in rule.needs):
            continue  # the problem is told already; this rule cannot be judged
        try:
            value = rule.apply(getattr(result, name), texts.get(name), result)
        except Invalid as exc:
            problems[name] = str(exc)
        else:
            result = replace(result, **{name: value})
    if problems:
        told = [(name.upper(), problems[name]) for name in settings if name in problems]
        raise ConfigError(*told[0], *told[1:])
    return result
