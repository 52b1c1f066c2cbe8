"""The strict converter: what crosses an edge (peers.yml, annad.yml, the wire) becomes
frozen attrs classes, or every problem found, each with its path.

One cattrs converter with detailed validation: unknown keys are refused, nothing is
coerced (no str→int, no bool→int, no number→str), floats must be finite, sequences
must be lists and mappings mappings. An attrs field's validator (the small factories
below) runs while its class is structured, so a class with three bad fields reports
three problems; the class's own `__init__` checks the same again when code builds one.

`problems(exc)` turns what the converter raised into `Problem`s: a path such as
`("peers", 2, "port")` (shown `peers[2].port`) and a message. Each edge words them:
the wire joins them into one line, the YAML files attach a line number to each.

Field metadata the converter reads: `key` (the name in the document, when it is not
the field's), `missing` (what an absent required key is told, default "is
required"), `structure` (a hook of its own for the field's value) and `document`
(False: not read from documents, as a count the parser adds).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory, mapping_structure_factory
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, make_hetero_tuple_structure_fn, override

T = TypeVar("T")


@attrs.frozen
class Key:
    """A mapping key that is not a string (YAML allows `7: x`); an int in a path is a
    list index."""

    value: Any

    def __str__(self) -> str:
        return repr(self.value)


PathPart = str | int | Key
Location = tuple[PathPart, ...]

# --- what goes wrong ---------------------------------------------------------------


class Invalid(ValueError):
    """Raised by a hook or validator for a value that breaks a rule; `at` names the key
    below the current value it is about (a cross-field rule), if any."""

    def __init__(self, message: str, *, at: Location = ()) -> None:
        super().__init__(message)
        self.at = at


class WrongType(Invalid):
    """Raised for a value of the wrong type; `kind` (bool, integer, number, string,
    mapping, list) lets an edge word it its own way (YAML has hints JSON does not)."""

    MESSAGES: ClassVar[dict[str, str]] = {
        "bool": "must be true or false",
        "integer": "must be an integer",
        "number": "must be a number",
        "string": "must be a non-empty string",
        "mapping": "must be a mapping",
        "list": "must be a list",
    }

    def __init__(self, kind: str, message: str | None = None) -> None:
        super().__init__(message or self.MESSAGES[kind])
        self.kind = kind
        self.worded = message is not None  # by the field's validator: keep its words


@attrs.frozen
class Problem:
    """One thing wrong with a document: where, and what. `wrong_type` is the kind of a
    type error worded generically (an edge may word it better)."""

    path: Location
    message: str
    wrong_type: str | None = None

    @property
    def field(self) -> str:
        return format_path(self.path)


def format_path(path: Location) -> str:
    """`("peers", 2, "port")` → `peers[2].port`; the empty path is `top level`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "top level"


def key_part(key: Any) -> PathPart:
    """A mapping key as a path part."""
    return key if isinstance(key, str) else Key(key)


def problems(exc: BaseException, path: Location = ()) -> list[Problem]:
    """Every problem in what `structure` raised, in document order within a class."""
    if isinstance(exc, ClassValidationError):
        found: list[Problem] = []
        for sub in exc.exceptions:
            name = _attribute_of(sub)
            if name is None:
                found += problems(sub, path)
                continue
            field = attrs.fields_dict(exc.cl)[name]
            key = field.metadata.get("key", name)
            if isinstance(sub, KeyError):
                found.append(Problem((*path, key), field.metadata.get("missing", "is required")))
            else:
                found += problems(sub, (*path, key))
        return found
    if isinstance(exc, IterableValidationError):
        return [
            problem for sub in exc.exceptions for problem in problems(sub, (*path, *_index_of(sub)))
        ]
    if isinstance(exc, ExceptionGroup):
        return [problem for sub in exc.exceptions for problem in problems(sub, path)]
    if isinstance(exc, ForbiddenExtraKeysError):
        allowed = ", ".join(sorted(document_keys(exc.cl)))
        return [
            Problem((*path, key_part(key)), f"unknown key (allowed: {allowed})")
            for key in sorted(exc.extra_fields, key=str)
        ]
    if isinstance(exc, WrongType):
        return [Problem(path + exc.at, str(exc), None if exc.worded else exc.kind)]
    if isinstance(exc, Invalid):
        return [Problem(path + exc.at, str(exc))]
    if isinstance(exc, ValueError | TypeError):
        return [Problem(path, str(exc))]
    raise exc


def _attribute_of(exc: BaseException) -> str | None:
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            return note.name
    return None


def _index_of(exc: BaseException) -> Location:
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, IterableValidationNote):
            return (note.index if isinstance(note.index, int) else key_part(note.index),)
    return ()


def document_keys(cls: type) -> list[str]:
    """The keys a document may hold for an attrs class."""
    return [
        field.metadata.get("key", field.name)
        for field in attrs.fields(cls)
        if field.init and field.metadata.get("document", True)
    ]


# --- the converter -------------------------------------------------------------------


def _structure_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise WrongType("bool")
    return value


def _structure_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WrongType("integer")
    return int(value)


def _structure_float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WrongType("number")
    try:
        number = float(value)
    except OverflowError:  # an integer of 400 digits
        number = math.inf
    if not math.isfinite(number):
        raise Invalid("must be a finite number")
    return number


def _structure_str(value: Any, _: type) -> str:
    if not isinstance(value, str) or not value:
        raise WrongType("string")
    return str(value)


def _structure_path(value: Any, _: type) -> Path:
    return Path(_structure_str(value, str))


def _is_tuple(type_: Any) -> bool:
    return get_origin(type_) is tuple


def _sequence_hook(type_: Any) -> Callable[[Any, Any], Any]:
    """`tuple[X, ...]` or `tuple[X, Y]` from a list (JSON array, YAML sequence) only:
    not from a string or a mapping, which cattrs would iterate."""
    if get_args(type_)[1:] == (...,):
        structure = homogenous_tuple_structure_factory(type_, converter)
    else:
        structure = make_hetero_tuple_structure_fn(type_, converter, detailed_validation=True)

    def structure_sequence(value: Any, _: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise WrongType("list")
        return structure(value, type_)

    return structure_sequence


def _is_mapping(type_: Any) -> bool:
    return get_origin(type_) in (dict, Mapping)


def _mapping_hook(type_: Any) -> Callable[[Any, Any], Any]:
    structure = mapping_structure_factory(type_, converter)

    def structure_mapping(value: Any, _: Any) -> Any:
        if not isinstance(value, Mapping):
            raise WrongType("mapping")
        return structure(value, type_)

    return structure_mapping


def _checked(field: attrs.Attribute[Any], hook: Callable[[Any, Any], Any]) -> Any:
    """Structure one field's value, then apply the field's converter and validator as
    attrs' `__init__` would, so that its problem is reported with its path. A type
    error takes the validator's words (`must be an integer 1..65535`) when it has any."""
    expected = getattr(field.validator, "expected", None)

    def structure_field(value: Any, type_: Any) -> Any:
        try:
            value = hook(value, type_)
        except WrongType as exc:
            if expected is None:
                raise
            raise WrongType(exc.kind, f"must be {expected}") from None
        if field.converter is not None:
            value = field.converter(value)  # type: ignore[operator]
        if field.validator is not None:
            field.validator(None, field, value)
        return value

    return structure_field


def _field_hook(field: attrs.Attribute[Any]) -> Callable[[Any, Any], Any]:
    hook: Callable[[Any, Any], Any] = field.metadata.get(
        "structure"
    ) or converter.get_structure_hook(field.type)
    return hook


def valid_fields(data: Mapping[Any, Any], cls: type) -> dict[str, Any]:
    """The fields of `cls` that `data` gives validly, each judged on its own, by name:
    what rules across fields can still judge when the whole is invalid."""
    attrs.resolve_types(cls)
    found = {}
    for field in attrs.fields(cls):
        key = field.metadata.get("key", field.name)
        if not field.init or key not in data or not field.metadata.get("document", True):
            continue
        try:
            found[field.name] = _checked(field, _field_hook(field))(data[key], field.type)
        except (BaseValidationError, ValueError, TypeError):
            continue
    return found


def _attrs_hook(cls: type) -> Callable[[Any, Any], Any]:
    """An attrs class from a mapping, with the field metadata the module docstring
    lists (`key`, `missing`, `structure`, `document`).

    Two generated functions: a lean one, whose fields the class's `__init__` validates
    (once, stopping at the first problem), and a detailed one that checks every field
    on its own (see `_checked`) with cattrs' detailed validation. The lean one serves
    valid documents; when it fails, the detailed one says everything that is wrong."""
    attrs.resolve_types(cls)
    hooks = {field.name: _field_hook(field) for field in attrs.fields(cls) if field.init}

    def overrides(checked: bool) -> dict[str, Any]:
        return {
            field.name: override(omit=True)
            if not field.metadata.get("document", True)
            else override(
                rename=field.metadata.get("key"),
                struct_hook=_checked(field, hooks[field.name]) if checked else hooks[field.name],
            )
            for field in attrs.fields(cls)
            if field.init
        }

    lean: Callable[[Any, Any], Any] = make_dict_structure_fn(
        cls, converter, _cattrs_detailed_validation=False, **overrides(False)
    )
    detailed: Callable[[Any, Any], Any] = make_dict_structure_fn(
        cls, converter, _cattrs_detailed_validation=True, **overrides(True)
    )

    def structure_attrs(value: Any, _: Any) -> Any:
        if not isinstance(value, Mapping):
            raise WrongType("mapping")
        try:
            return lean(value, cls)
        except Exception:
            return detailed(value, cls)  # raises with every problem

    return structure_attrs


converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
converter.register_structure_hook(bool, _structure_bool)
converter.register_structure_hook(int, _structure_int)
converter.register_structure_hook(float, _structure_float)
converter.register_structure_hook(str, _structure_str)
converter.register_structure_hook(Path, _structure_path)
converter.register_structure_hook_factory(_is_tuple, _sequence_hook)
converter.register_structure_hook_factory(_is_mapping, _mapping_hook)
converter.register_structure_hook_factory(attrs.has, _attrs_hook)


def structure(value: Any, cls: type[T]) -> T:
    """`value` as a `cls`; raises what `problems` reads (cattrs' errors, Invalid)."""
    return converter.structure(value, cls)


def tagged_union(members: Iterable[type], *, tag: str, default: type) -> Callable[[Any, Any], Any]:
    """A structure hook for a union of attrs classes told apart by the `tag` key (each
    member's `tag` field default names it). A key that belongs to another member is
    refused as "only valid with <tag>: <that member's name>"."""
    by_name = {_tag_of(cls, tag): cls for cls in members}
    default_name = _tag_of(default, tag)

    def structure_union(value: Any, _: Any) -> Any:
        if not isinstance(value, Mapping):
            raise WrongType("mapping")
        name = value.get(tag, default_name)
        cls = by_name.get(name) if isinstance(name, str) else None
        if cls is None:
            choices = ", ".join(by_name)
            raise Invalid(f"must be one of {choices}; got {_shown(name)}", at=(tag,))
        elsewhere = {
            key: other_name
            for other_name, other in by_name.items()
            if other is not cls
            for key in document_keys(other)
            if key not in document_keys(cls)
        }
        foreign = [key for key in value if key in elsewhere]
        if foreign:
            raise ExceptionGroup(
                f"keys of another {tag}",
                [Invalid(f"only valid with {tag}: {elsewhere[key]}", at=(key,)) for key in foreign],
            )
        return converter.structure(value, cls)

    return structure_union


def _tag_of(cls: type, tag: str) -> str:
    name = attrs.fields_dict(cls)[tag].default
    assert isinstance(name, str), f"{cls.__name__}.{tag} needs a str default"
    return name


# --- validators: small factories, each with its words for a wrong value -------------


def _shown(value: Any) -> str:
    """A value as quoted in a message, cut short: it may be an attacker's 60 KiB."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@attrs.frozen(repr=False)
class _Matches:
    pattern: re.Pattern[str]

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        if not isinstance(value, str) or self.pattern.fullmatch(value) is None:
            raise Invalid(f"must match {self.pattern.pattern}; got {_shown(value)}")

    def __repr__(self) -> str:
        return f"<matches {self.pattern.pattern!r}>"


def matches(pattern: re.Pattern[str]) -> _Matches:
    """The whole string matches (`fullmatch`: `$` alone would let a trailing newline in)."""
    return _Matches(pattern)


@attrs.frozen(repr=False)
class _Between:
    low: int
    high: int

    @property
    def expected(self) -> str:
        return f"an integer {self.low}..{self.high}"

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise WrongType("integer", f"must be {self.expected}")
        if not self.low <= value <= self.high:
            raise Invalid(f"must be {self.expected}")

    def __repr__(self) -> str:
        return f"<integer {self.low}..{self.high}>"


def between(low: int, high: int) -> _Between:
    """An integer from `low` to `high`, both included."""
    return _Between(low, high)


@attrs.frozen(repr=False)
class _NumberIn:
    check: Callable[[float], bool]
    expected: str

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not self.check(value)
        ):
            raise Invalid(f"must be {self.expected}")

    def __repr__(self) -> str:
        return f"<{self.expected}>"


def number_in(interval: str) -> _NumberIn:
    """A finite number in an interval written as in mathematics: `[0, 1]`, `(0, 1]`."""
    match = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", interval)
    assert match is not None, interval
    opening, low_text, high_text, closing = match.groups()
    low, high = float(low_text), float(high_text)

    def check(value: float) -> bool:
        above = value > low if opening == "(" else value >= low
        below = value < high if closing == ")" else value <= high
        return above and below

    return _NumberIn(check, f"a finite number in {interval}")


def positive(unit: str) -> _NumberIn:
    """A finite number greater than 0, of `unit` (seconds, requests per second)."""
    return _NumberIn(lambda value: value > 0, f"a finite number of {unit} > 0")


@attrs.frozen(repr=False)
class _Duration:
    positive: bool

    expected = "a number of seconds"

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        if value is None:
            return
        problem = duration_problem(value, positive=self.positive)
        if problem is not None:
            raise Invalid(problem)

    def __repr__(self) -> str:
        return "<seconds > 0>" if self.positive else "<seconds >= 0>"


def duration(*, positive: bool) -> _Duration:
    """Seconds, finite; greater than 0 when `positive`, else at least 0 (None passes:
    not set)."""
    return _Duration(positive)


def duration_problem(value: float, *, positive: bool) -> str | None:
    """What is wrong with a number of seconds, or None (shared with flags and env)."""
    if not math.isfinite(value):
        return "must be a finite number of seconds"
    if positive and value <= 0:
        return "must be greater than 0 seconds"
    if value < 0:
        return "must not be negative"
    return None


@attrs.frozen(repr=False)
class _OneOf:
    choices: tuple[str, ...]

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        if value not in self.choices:
            raise Invalid(f"must be one of {', '.join(self.choices)}; got {_shown(value)}")

    def __repr__(self) -> str:
        return f"<one of {', '.join(self.choices)}>"


def one_of(choices: Iterable[str]) -> _OneOf:
    return _OneOf(tuple(choices))


@attrs.frozen(repr=False)
class _Each:
    validator: Callable[[Any, Any, Any], None]

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        for item in value:
            self.validator(instance, attribute, item)

    def __repr__(self) -> str:
        return f"<each {self.validator!r}>"


def each(validator: Callable[[Any, Any, Any], None]) -> _Each:
    """Every item of a sequence passes `validator` (the first failure is reported)."""
    return _Each(validator)


@attrs.frozen(repr=False)
class _AllOf:
    validators: tuple[Callable[[Any, Any, Any], None], ...]

    @property
    def expected(self) -> str | None:
        return next((v.expected for v in self.validators if hasattr(v, "expected")), None)

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        for validator in self.validators:
            validator(instance, attribute, value)

    def __repr__(self) -> str:
        return f"<all of {', '.join(map(repr, self.validators))}>"


def all_of(*validators: Callable[[Any, Any, Any], None]) -> _AllOf:
    """Each validator in turn (attrs' `and_`, keeping the words for a wrong type)."""
    return _AllOf(validators)


@attrs.frozen(repr=False)
class _Sized:
    low: int
    high: int
    message: str
    expected: str | None = None

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        if not self.low <= len(value) <= self.high:
            raise Invalid(self.message)

    def __repr__(self) -> str:
        return f"<{self.low}..{self.high} items>"


def items(low: int, high: int, message: str, expected: str | None = None) -> _Sized:
    """A sequence of `low` to `high` items; `message` says what is wrong otherwise, and
    `expected` what a value that is no sequence should have been (`a list of peers`)."""
    return _Sized(low, high, message, expected)


@attrs.frozen(repr=False)
class _LessThan:
    other: str
    reason: str

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        if instance is None:  # checked on its own: the other field is not known yet
            return
        limit = getattr(instance, self.other)
        if value >= limit:
            raise Invalid(
                f"must be less than {self.other} ({limit}), {self.reason}", at=(attribute.name,)
            )

    def __repr__(self) -> str:
        return f"<less than {self.other}>"


def less_than(other: str, reason: str) -> _LessThan:
    """Less than the instance's field `other` (checked when the whole is built)."""
    return _LessThan(other, reason)


@attrs.frozen(repr=False)
class _Unique:
    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        if len(set(value)) != len(value):
            raise Invalid("must be unique")

    def __repr__(self) -> str:
        return "<unique>"


def unique() -> _Unique:
    return _Unique()


@attrs.frozen(repr=False)
class _Satisfies:
    check: Callable[[Any], str | None]
    name: str

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        problem = self.check(value)
        if problem is not None:
            raise Invalid(problem)

    def __repr__(self) -> str:
        return f"<{self.name}>"


def satisfies(check: Callable[[Any], str | None]) -> _Satisfies:
    """`check(value)` says what is wrong with it, or None; named after the function."""
    return _Satisfies(check, check.__name__.strip("_").replace("_", " "))


@attrs.frozen(repr=False)
class _Optional:
    validator: Callable[[Any, Any, Any], None]

    @property
    def expected(self) -> str | None:
        return getattr(self.validator, "expected", None)

    def __call__(self, instance: Any, attribute: Any, value: Any) -> None:
        if value is not None:
            self.validator(instance, attribute, value)

    def __repr__(self) -> str:
        return f"<optional {self.validator!r}>"


def optional(validator: Callable[[Any, Any, Any], None]) -> _Optional:
    """None, or a value `validator` accepts."""
    return _Optional(validator)


# --- values that several documents share ---------------------------------------------


def utc_timestamp_problem(value: str) -> str | None:
    """Why `value` is not an RFC 3339 UTC date-time (`Z` or `+00:00`), or None."""
    if len(value) > 40:
        return "must be an RFC 3339 UTC date-time"
    if "T" not in value and "t" not in value:
        return "must be an RFC 3339 date-time (YYYY-MM-DDTHH:MM:SSZ)"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return f"not RFC 3339: {_shown(value)}"
    if parsed.tzinfo is None or parsed.utcoffset() != UTC.utcoffset(None):
        return "must be UTC ('Z' or '+00:00')"
    return None
