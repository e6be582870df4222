"""Token-dropping methods, one module each, registered by name (see registry.py)."""

from llava.drop.method import DropMethod, LayerContext
from llava.drop.methods.mustdrop import DropConfig, MustDrop
from llava.drop.methods.registry import (
    METHODS,
    create_method,
    parse_method_args,
    register,
)

register(DropMethod)


def as_method(drop: DropConfig | DropMethod | None) -> DropMethod:
    """The method for `drop`: MustDrop for an enabled DropConfig (the original API), the unpruned model
    for None or a disabled one, and any DropMethod as it is."""
    if isinstance(drop, DropMethod):
        return drop
    if isinstance(drop, DropConfig) and drop.enabled:
        return MustDrop(drop)
    return DropMethod()


__all__ = ["DropConfig", "DropMethod", "LayerContext", "METHODS", "as_method", "create_method", "parse_method_args",
           "register"]
