"""The method registry: `@register_method("name")` on a `Method` subclass."""
from kdrun.registry import Registry

METHODS: Registry = Registry("method")


def register_method(name: str, description: str | None = None):
    """Register a Method subclass; its docstring's first line (the paper) is its description."""

    def decorate(cls):
        cls.method_name = name
        return METHODS.register(name, description)(cls)

    return decorate
