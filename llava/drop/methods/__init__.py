"""Token-dropping methods, one module each, registered by name (see registry.py)."""

from llava.drop.methods.base import DropMethod, LayerContext
from llava.drop.methods.registry import (
    METHODS,
    create_method,
    parse_method_args,
    register,
)

register(DropMethod)

__all__ = ["DropMethod", "LayerContext", "METHODS", "create_method", "parse_method_args", "register"]
