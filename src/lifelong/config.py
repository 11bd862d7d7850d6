"""Checking a composed configuration against what its parts accept, before anything is built or trained.

A Hydra config is a tree whose ``_target_`` nodes become objects. `check_targets` walks every such node
and checks each value against the annotation of the target's parameter of that name: unknown keys, wrong types
(``dataset.num_tasks=abc``) and values outside a ``Literal`` are reported with the key's full name, for our
own classes and for torch's and Lightning's alike. Ranges and relations between values stay with the
constructors that own them (``method.ewc_lambda must be >= 0``); `name_the_key` gives their messages,
and those of third-party constructors (torch's ``Invalid learning rate: -0.1``), the key they are about.

The type rules are written for configuration values, which are YAML's: a list stands for a tuple or any
sequence, an integer for a float, a string for a path. A strict runtime type checker rejects exactly those,
so the few rules are here; an annotation they do not understand (a protocol, a type variable) is accepted,
and the constructor decides.
"""

from __future__ import annotations

import collections.abc as cabc
import inspect
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import PurePath
from typing import Any

from hydra.utils import get_object

from lifelong.errors import ConfigError
from lifelong.keys import show

HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def check_targets(config: Mapping[str, Any], prefix: str = "") -> None:
    """Check every ``_target_`` node of a resolved config (plain dicts and lists) against its target's signature.

    Raises:
        ConfigError: naming the first key whose value the target cannot take, and what it takes.
    """
    for path, node in _target_nodes(config, prefix):
        _check_node(path, node)


def _target_nodes(value: Any, path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if isinstance(value, Mapping):
        if "_target_" in value:
            yield path, value
        for key, item in value.items():
            yield from _target_nodes(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _target_nodes(item, f"{path}[{i}]")


def _check_node(path: str, node: Mapping[str, Any]) -> None:
    name = node["_target_"]
    try:
        target = get_object(name)
    except Exception as err:
        raise ConfigError(f"{path}._target_={name} cannot be imported ({err})") from None
    params, hints, takes_any = _signature(target)
    if params is None:
        return  # a builtin without a signature: nothing to check against
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        full = f"{path}.{key}"
        if key not in params:
            if takes_any:
                continue
            options = ", ".join(params)
            raise ConfigError(f"{full} is not an option of {name}; its options: {options}")
        if _is_node(value) or key not in hints:
            continue  # an object built from its own node (checked on its own), or no annotation to check
        if not conforms(value, hints[key]):
            raise ConfigError(f"{full}={show(value)}: expected {describe(hints[key])}, got {_kind(value)}")


def _signature(target: Any) -> tuple[dict[str, inspect.Parameter] | None, dict[str, Any], bool]:
    """The parameters a target takes by name, their annotations, and whether it takes any other name.

    A class whose ``__init__`` passes ``**kwargs`` on to its base (``PermutedStream(source, **kwargs)``) takes
    the base's parameters too: the method resolution order is followed while each ``__init__`` does so.
    """
    if inspect.isclass(target):
        funcs = [vars(c)["__init__"] for c in target.__mro__ if "__init__" in vars(c)]
    else:
        funcs = [target]
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for func in funcs:
        try:
            own = inspect.signature(func).parameters
        except (TypeError, ValueError):
            return (params or None), hints, True
        named = {n: p for n, p in own.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}
        found = _hints(func, own)
        for n, p in named.items():
            if n not in params:
                params[n] = p
                if n in found:
                    hints[n] = found[n]
        if not any(p.kind is p.VAR_KEYWORD for p in own.values()):
            return params, hints, False
    return params, hints, True


def _hints(func: Any, params: Mapping[str, inspect.Parameter]) -> dict[str, Any]:
    """A function's parameter annotations, evaluated; those that cannot be (names imported for type checkers
    only) are left out."""
    try:
        return typing.get_type_hints(func)
    except Exception:
        pass
    namespace = getattr(inspect.unwrap(func), "__globals__", {})
    hints = {}
    for name, p in params.items():
        if p.annotation is inspect.Parameter.empty:
            continue
        try:
            hints[name] = eval(p.annotation, namespace) if isinstance(p.annotation, str) else p.annotation
        except Exception:
            continue
    return hints


def _is_node(value: Any) -> bool:
    return (isinstance(value, Mapping) and "_target_" in value) or (
        isinstance(value, list) and any(_is_node(v) for v in value)
    )


_SEQUENCES = (list, tuple, cabc.Sequence, cabc.MutableSequence, cabc.Iterable, cabc.Collection, cabc.Set, set)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def conforms(value: Any, hint: Any) -> bool:
    """Whether a configuration value (``None``, bool, int, float, str, list, dict) can stand for ``hint``."""
    if hint is Any or hint is object or isinstance(hint, (typing.TypeVar, str, typing.ForwardRef)):
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        return conforms(value, args[0])
    if _is_union(hint):
        return any(conforms(value, arm) for arm in _writable(args))
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (os.PathLike, PurePath) or (inspect.isclass(hint) and issubclass(hint, PurePath)):
        return isinstance(value, str)
    container = origin or hint
    if container in _SEQUENCES:
        if not isinstance(value, list):
            return container in (cabc.Iterable, cabc.Collection, cabc.Sequence) and isinstance(value, str)
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(conforms(v, args[0]) for v in value)
    if container in _MAPPINGS:
        if not isinstance(value, Mapping):
            return False
        return len(args) != 2 or all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    return True  # a class (a tensor, a device, a protocol) or another annotation: the constructor decides


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType)


def _writable(arms: tuple[Any, ...]) -> tuple[Any, ...]:
    """The arms of a union that a config file can write (``float`` of ``float | Tensor``); all if none is."""
    plain = (type(None), None, bool, int, float, str)
    kept = tuple(
        a
        for a in arms
        if a in plain
        or typing.get_origin(a) in (typing.Literal, *_SEQUENCES, *_MAPPINGS)
        or a in _SEQUENCES
        or a in _MAPPINGS
        or (inspect.isclass(a) and issubclass(a, PurePath))
    )
    return kept or arms


def describe(hint: Any) -> str:
    """An annotation in the words of a config file: ``an integer or null``, ``one of 'task', 'class'``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return describe(args[0])
    if _is_union(hint):
        return " or ".join(dict.fromkeys(describe(a) for a in _writable(args)))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    simple = {type(None): "null", None: "null", bool: "true or false", int: "an integer", float: "a number"}
    if hint in simple:
        return simple[hint]
    if hint is str or hint is os.PathLike or (inspect.isclass(hint) and issubclass(hint, PurePath)):
        return "a string"
    container = origin or hint
    if container in _SEQUENCES:
        if container is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    if container in _MAPPINGS:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _plural(what: str) -> str:
    return re.sub(r"\b(an?) (\w+)", lambda m: m.group(2) + "s", what)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    return names.get(type(value), "a mapping" if isinstance(value, Mapping) else type(value).__name__)


def name_the_key(message: str, path: str, node: Mapping[str, Any]) -> str:
    """``message``, an error a constructor raised for the config node at ``path``, naming the key it is about.

    A message that names the key already (``method.decay must be in [0, 1]``) is kept; one that names a
    parameter (``fisher_type must be one of ...``) gets the node's prefix; one that names neither but shows
    exactly one of the node's values (torch's ``Invalid learning rate: -0.1``) is prefixed with that key
    and value; any other with the node's path.
    """
    if f"{path}." in message:
        return message
    keys = [k for k in node if k not in HYDRA_KEYS]
    for key in sorted(keys, key=len, reverse=True):
        found = re.search(rf"(?<![\w.]){re.escape(key)}\b", message)
        if found:
            return message[: found.start()] + f"{path}." + message[found.start() :]
    shown = [k for k in keys if _appears(node[k], message)]
    if len(shown) == 1:
        return f"{path}.{shown[0]}={show(node[shown[0]])}: {message}"
    return f"{path}: {message}"


def _appears(value: Any, message: str) -> bool:
    if isinstance(value, (Mapping, list)) or value is None or isinstance(value, bool):
        return False
    return re.search(rf"(?<![\w.-]){re.escape(str(value))}(?![\w.])", message, flags=re.IGNORECASE) is not None
