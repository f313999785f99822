"""What the proto contract declares of a method beyond its messages, read in one place.

Each method names the scope a caller needs (``strata.common.v1.required_scope``),
read here by the gateway's routes and by every service's bootstrap; a
service's errors carry its proto package as their ``ErrorInfo`` domain.
"""

from __future__ import annotations

from google.protobuf import descriptor
from strata.common.v1 import options_pb2

__all__ = ["error_domain", "required_scope"]


def required_scope(method: descriptor.MethodDescriptor) -> str:
    """The scope ``method`` declares; TypeError for a method that declares none (every Strata method
    must: a method without one would be open to any key)."""
    # protoc's .pyi types an extension as a plain FieldDescriptor, which the Extensions map refuses.
    scope: str = method.GetOptions().Extensions[options_pb2.required_scope]  # type: ignore[index]
    if not scope:
        raise TypeError(f"{method.full_name} declares no strata.common.v1.required_scope")
    return str(scope)


def error_domain(service: descriptor.ServiceDescriptor) -> str:
    """The ``ErrorInfo`` domain of every error ``service`` answers: its proto package."""
    return str(service.file.package)
