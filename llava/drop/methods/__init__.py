"""Token-dropping methods, registered by name (see registry.py); importing this registers them all."""

from llava.drop.methods.base import DropMethod, LayerContext
from llava.drop.methods.registry import METHODS, create_method, parse_method_args, register
from llava.drop.methods import mustdrop  # noqa: F401  (registration)

register(DropMethod)

__all__ = ["DropMethod", "LayerContext", "METHODS", "create_method", "parse_method_args", "register"]
