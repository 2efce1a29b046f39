"""The metadata protocol as remote calls: one call name, its keyword arguments, its answer.

:class:`~dgpt.storage.service.MetadataClient` is what a storage client needs of the metadata
service. The head serves it two ways, and this module is both ends of each:

- through the control-plane Ray actor (``storage_call(method, kwargs)``), for Ray tasks and
  drivers on the fabric: arguments and answers are the pydantic models themselves (pickled);
  an error comes back as a value, so it is raised here with its own type, message and hint;
- over REST (``POST /api/v1/storage/meta/{method}``), for clients outside Ray: the arguments
  are a JSON object validated against the method's signature, the answer its JSON form
  (bytes as base64, as :mod:`dgpt.storage.models` declares).

The argument models and answer adapters are derived from the protocol's own signatures, so
a method added to :class:`MetadataClient` is served without another list to keep in step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, TypeAdapter, create_model

from dgpt import exceptions
from dgpt.exceptions import ApiError, DgptError, InvalidRequest, StorageError
from dgpt.storage.service import MetadataClient

#: The calls a client may make: exactly the protocol's methods.
METHODS: tuple[str, ...] = tuple(sorted(
    name for name, member in inspect.getmembers(MetadataClient, inspect.isfunction) if not name.startswith("_")))


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@cache
def args_model(method: str) -> type[BaseModel]:
    """The pydantic model of ``method``'s keyword arguments (unknown ones are refused)."""
    check_method(method)
    fn = getattr(MetadataClient, method)
    hints = get_type_hints(fn)
    fields: dict[str, Any] = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name == "self":
            continue
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[name] = (hints[name], default)
    return create_model(f"{method}_args", __base__=_Args, **fields)


@cache
def answer_adapter(method: str) -> TypeAdapter[Any]:
    """How ``method``'s answer is checked and put into JSON."""
    check_method(method)
    return TypeAdapter(get_type_hints(getattr(MetadataClient, method))["return"])


def check_method(method: str) -> None:
    if method not in METHODS:
        raise InvalidRequest(f"method {method!r} is not a metadata call", 404,
                             hint=f"use one of: {', '.join(METHODS)}")


def dispatch(service: MetadataClient, method: str, kwargs: dict[str, Any]) -> Any:
    """Call ``service.method(**kwargs)`` after checking the name and the arguments.

    Raises:
        InvalidRequest: unknown method, or arguments that do not fit its signature (names them).
    """
    model = args_model(method)
    try:
        args = model.model_validate(kwargs)
    except ValueError as exc:
        raise InvalidRequest(f"{method}: {exc}", 422, hint="fix the named argument(s)") from None
    return getattr(service, method)(**{name: getattr(args, name) for name in type(args).model_fields})


def error_from(name: str, message: str, status: int, hint: str | None) -> DgptError:
    """The typed error a remote answer names (its class in :mod:`dgpt.exceptions`)."""
    cls = getattr(exceptions, name, None)
    if isinstance(cls, type) and issubclass(cls, ApiError):
        return cls(message, status, hint)
    if isinstance(cls, type) and issubclass(cls, DgptError):
        return cls(message, hint)
    return StorageError(message, hint) if status >= 500 else ApiError(message, status, hint)


class RemoteMetadata:
    """:class:`MetadataClient` over a remote ``call(method, kwargs)`` (the control-plane actor, REST).

    ``call`` returns ``("ok", answer)`` or ``("error", exception)``; errors are values so
    they keep their type across Ray (which would wrap a raised one in its own).
    """

    def __init__(self, call: Callable[[str, dict[str, Any]], tuple[str, Any]]) -> None:
        self._call = call

    def _do(self, method: str, **kwargs: Any) -> Any:
        status, value = self._call(method, kwargs)
        if status == "error":
            raise value
        return value

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method not in METHODS:
            raise AttributeError(method)
        sig = inspect.signature(getattr(MetadataClient, method))

        def bound(*args: Any, **kwargs: Any) -> Any:
            named = sig.bind(None, *args, **kwargs)
            named.apply_defaults()
            return self._do(method, **{k: v for k, v in named.arguments.items() if k != "self"})

        return bound
