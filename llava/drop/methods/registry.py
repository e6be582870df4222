"""Methods by name, timm-style: adding a method is one file with `@register` on its class.

Options have one vocabulary across methods (docs/method_options.md): `drop_after` lists the 0-based decoder
layers after which a method drops, `kept_share` is the share of the current vision tokens a drop keeps, and
other shares end in `_share`. The papers' own names stay accepted as aliases: an options class lists them in
`option_aliases` (alias -> `OptionAlias`), and `build_options`, hence every caller (`--method-args`, the
runner, lmms-eval's `model_args`, the web page, `create_method`), turns an alias's value into its canonical
option's.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import typing
from collections.abc import Callable
from typing import Any

from llava.drop.method import FAMILIES, UNPRUNED

METHODS: dict[str, type] = {}
UNKNOWN_FAMILY = "?"


def discover_methods() -> None:
    """Import every module of llava/drop/methods so that each one's @register has run."""
    import llava.drop.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def register(method_class: type) -> type:
    """Add `method_class` under its `name`; a name already taken is refused, not silently replaced, and so
    is a family comparison tables do not know, and an option alias that is an option itself or sets none."""
    if method_class.family not in (UNPRUNED, *FAMILIES):
        raise ValueError(f"method {method_class.name!r} has family {method_class.family!r}; choose one of "
                         f"{', '.join(FAMILIES)}")
    options_class = getattr(method_class, "options_class", None)
    for alias, target in option_aliases(options_class).items():
        if alias in init_fields(options_class) or target.canonical not in init_fields(options_class):
            raise ValueError(f"method {method_class.name!r}: option alias {alias!r} must not be an option and must "
                             f"set one, got {alias!r} -> {target.canonical!r}")
    taken = METHODS.get(method_class.name)
    if taken is not None:
        raise ValueError(f"method name {method_class.name!r} is already registered by "
                         f"{taken.__module__}.{taken.__qualname__}")
    METHODS[method_class.name] = method_class
    return method_class


def same(value):
    """An alias whose value means what its canonical option's does (only the name differs)."""
    return value


@dataclasses.dataclass(frozen=True)
class OptionAlias:
    """A paper's name for an option: `canonical` is the option it sets, `annotation` the type its value reads as
    (from a string, as `--method-args` gives it, or from an answers file's JSON), `convert` turns that value into
    the canonical option's, and `rule` says how, in the words of docs/method_options.md."""

    canonical: str
    annotation: Any
    convert: Callable[[Any], Any]
    rule: str

    def __call__(self, value):
        return value if value is None else self.convert(value)


def option_aliases(options_class) -> dict[str, OptionAlias]:
    """The papers' names an options class accepts (alias -> `OptionAlias`); none for most methods."""
    return dict(getattr(options_class, "option_aliases", {}))


def parse_method_args(text: str) -> dict[str, str]:
    """'a=1,b=0.5' -> {'a': '1', 'b': '0.5'}; empty text -> {}."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--method-args expects key=value pairs separated by commas, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def _convert(value: str, annotation, name: str):
    """Turn a command-line string into the option's declared type; NaN and infinities are refused for every
    caller (the CLIs name the flag before this, the web page and the Python API rely on it)."""
    converted = _convert_type(value, annotation, name)
    numbers = converted if isinstance(converted, tuple) else (converted,)
    if any(isinstance(number, float) and not math.isfinite(number) for number in numbers):
        raise ValueError(f"option {name}={value!r} must be a finite number")
    return converted


def _convert_type(value: str, annotation, name: str):
    arguments = typing.get_args(annotation)
    if type(None) in arguments:  # an optional option: "none" clears it, anything else is the inner type
        if value.lower() == "none":
            return None
        annotation = next(argument for argument in arguments if argument is not type(None))
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if origin is tuple:
            element = typing.get_args(annotation)[0]
            return tuple(element(part) for part in value.replace(";", " ").split())
        return annotation(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {name}={value!r} is not a valid {getattr(annotation, '__name__', annotation)}") from None


def init_fields(options_class) -> set[str]:
    """The canonical options of an options class: its dataclass fields set at construction (none for None)."""
    return {f.name for f in dataclasses.fields(options_class) if f.init} if options_class is not None else set()


def valid_options_text(options_class) -> str:
    """The canonical options, then the papers' names with how each converts, for an unknown-option error."""
    text = ", ".join(sorted(init_fields(options_class)))
    aliases = option_aliases(options_class)
    if aliases:
        text += "; aliases: " + ", ".join(f"{alias} ({target.rule})" for alias, target in sorted(aliases.items()))
    return text


def canonical_values(options_class, args: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """`args` (strings) as typed values under canonical names, and which canonical name each alias given set
    (canonical -> alias). An alias given beside its canonical option, or beside another alias of it, is refused."""
    hints = typing.get_type_hints(options_class)
    fields, aliases = init_fields(options_class), option_aliases(options_class)
    unknown = sorted(set(args) - fields - set(aliases))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for this method; valid: "
                         f"{valid_options_text(options_class)}")
    values, via = {}, {}
    for key, text in args.items():
        if key in fields:
            values[key] = _convert(text, hints[key], key)
            continue
        alias = aliases[key]
        other = via.get(alias.canonical) or (alias.canonical if alias.canonical in args else None)
        if other == alias.canonical:
            raise ValueError(f"{other} and its alias {key} are both given ({alias.rule}); give one of them")
        if other is not None:
            raise ValueError(f"{other} and {key} both set {alias.canonical}; give one of them")
        values[alias.canonical] = alias(_convert(text, alias.annotation, key))
        via[alias.canonical] = key
    return values, via


def build_options(options_class, args: dict[str, str], base=None):
    """An options dataclass from string arguments, checked against its fields; the papers' names (the class's
    `option_aliases`) are accepted too, each value converted to its canonical option's."""
    values, via = canonical_values(options_class, args)
    if values.get("keep_fraction") is not None and "budget" in init_fields(options_class) and "budget" not in values:
        values["budget"] = None  # a keep fraction takes the place of a default budget (random dropping's 64)
    try:
        return dataclasses.replace(base, **values) if base is not None else options_class(**values)
    except ValueError as error:  # a refused value that came through an alias: say what the alias became
        given = [f"{alias}={args[alias]} is {canonical}={values[canonical]!r}" for canonical, alias in via.items()
                 if canonical in str(error)]
        if not given:
            raise
        raise ValueError(f"{error} ({'; '.join(given)})") from None


def option_names(name: str) -> set[str]:
    """The options method `name` takes, canonical names and the papers' aliases (none for an unknown name:
    `create_method` refuses it, naming it)."""
    discover_methods()
    options_class = getattr(METHODS.get(name), "options_class", None)
    return init_fields(options_class) | set(option_aliases(options_class)) if options_class else set()


def canonical_recorded_options(name: str, recorded: dict) -> dict:
    """Options as an older answers file recorded them (method `name`'s dataclass as JSON, possibly under the
    papers' names, which were once the fields) under today's canonical names, values converted; anything
    else is left as it is, so that the resume check compares like with like and names what differs."""
    discover_methods()
    aliases = option_aliases(getattr(METHODS.get(name), "options_class", None))
    canonical = {}
    for key, value in recorded.items():
        alias = aliases.get(key)
        try:
            if alias is not None and alias.canonical not in recorded:
                canonical[alias.canonical] = alias(tuple(value) if isinstance(value, list) else value)
                continue
        except (TypeError, ValueError):  # not what the alias holds: compared as recorded, and named if it differs
            pass
        canonical[key] = value
    return canonical


def family_of(name: str) -> str:
    """Where method `name` drops (llava/drop/method.py's families), "?" for a name not registered."""
    discover_methods()
    return METHODS[name].family if name in METHODS else UNKNOWN_FAMILY


def create_method(name: str, args: dict[str, str] | None = None, base_options=None):
    """The method registered as `name`, with its options set from `args` (strings) over `base_options`."""
    discover_methods()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    method_class = METHODS[name]
    options_class = getattr(method_class, "options_class", None)
    if options_class is None:
        if args:
            raise ValueError(f"method {name!r} takes no options, got {', '.join(sorted(args))}")
        return method_class()
    return method_class(build_options(options_class, args or {}, base_options))
