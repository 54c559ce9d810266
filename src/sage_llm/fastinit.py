"""Building frozen dataclasses from field values without their ``__init__``.

A frozen dataclass's generated ``__init__`` stores each field through
``object.__setattr__`` (and fills defaults, and calls ``__post_init__``): for the value
objects the control plane and the simulator build per request and per decision (views,
request infos, measurements) that is several times what storing the values costs.
:func:`field_filler` generates, once per class, a function that stores them directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, TypeVar, cast

T = TypeVar("T")


def field_filler(cls: type[T], names: Sequence[str]) -> Callable[..., T]:
    """``make(v0, v1, …)``: a new ``cls`` whose field ``names[k]`` is ``vk``.

    ``cls`` is a dataclass and ``names`` all its fields, in any order. The fields are
    filled directly (slot descriptors, or the instance dict) as its frozen ``__init__``
    would fill them through ``object.__setattr__``, only without that ``__init__``: no
    defaults, no ``__post_init__`` (callers pass values that need neither). The function
    is generated once, like the dataclass's own ``__init__``.
    """
    wanted = {f.name for f in fields(cast(Any, cls))}
    if sorted(names) != sorted(wanted):
        raise ValueError(f"{cls.__name__}: names must be its fields {sorted(wanted)}")
    params = ", ".join(f"v{k}" for k in range(len(names)))
    env: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    if "__slots__" in cls.__dict__:
        lines = []
        for k, name in enumerate(names):
            env[f"_set{k}"] = cls.__dict__[name].__set__
            lines.append(f"    _set{k}(o, v{k})\n")
        body = "".join(lines)
    else:  # stored one by one in the new instance dict (in field order it shares its keys)
        lines = ["    d = o.__dict__\n"]
        lines += [f"    d[{name!r}] = v{k}\n" for k, name in enumerate(names)]
        body = "".join(lines)
    source = f"def make({params}):\n    o = _new(_cls)\n{body}    return o\n"
    exec(source, env)
    return cast(Callable[..., T], env["make"])
