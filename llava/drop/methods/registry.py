"""Methods by name, timm-style: adding a method is one file with `@register` on its class."""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import typing

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
    is a family comparison tables do not know."""
    if method_class.family not in (UNPRUNED, *FAMILIES):
        raise ValueError(f"method {method_class.name!r} has family {method_class.family!r}; choose one of "
                         f"{', '.join(FAMILIES)}")
    taken = METHODS.get(method_class.name)
    if taken is not None:
        raise ValueError(f"method name {method_class.name!r} is already registered by "
                         f"{taken.__module__}.{taken.__qualname__}")
    METHODS[method_class.name] = method_class
    return method_class


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


def build_options(options_class, args: dict[str, str], base=None):
    """An options dataclass from string arguments, checked against its fields."""
    hints = typing.get_type_hints(options_class)
    fields = {f.name for f in dataclasses.fields(options_class) if f.init}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for this method; valid: {', '.join(sorted(fields))}")
    values = {name: _convert(value, hints[name], name) for name, value in args.items()}
    if values.get("keep_fraction") is not None and "budget" in fields and "budget" not in values:
        values["budget"] = None  # a keep fraction takes the place of a default budget (random dropping's 64)
    return dataclasses.replace(base, **values) if base is not None else options_class(**values)


def option_names(name: str) -> set[str]:
    """The options method `name` takes (none for an unknown name: `create_method` refuses it, naming it)."""
    discover_methods()
    options_class = getattr(METHODS.get(name), "options_class", None)
    return {f.name for f in dataclasses.fields(options_class) if f.init} if options_class else set()


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
