"""Chat messages as OpenAI's API and vLLM take them: the one rule the gateway's request
schema and the simulated engine's server both check a message with."""

from __future__ import annotations

from typing import Literal, get_args

ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]
CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)
"""The roles of OpenAI's chat messages. Others pass too, as vLLM takes them (its custom
roles: ``ipython`` in Llama 3.1's tool use, a chat template's own)."""
CONTENT_REQUIRED_ROLES = frozenset({"system", "developer", "user", "tool"})
"""Roles whose ``content`` may not be null (an assistant message with ``tool_calls`` has
none, and so may a custom role's)."""
TYPELESS_PART_KEYS = ("image_url", "audio_url", "video_url", "input_audio")
"""The fields of vLLM's content parts without a ``type`` (``{"image_url": "…"}``)."""

_ROLE_DETAIL = "must be a non-empty string (" + ", ".join(repr(r) for r in CHAT_ROLES) + " …)"
_CONTENT_DETAIL = (
    "must be a string, a list of content parts (objects with a 'type') or, outside a system, "
    "developer, user or tool message, null"
)
PART_DETAIL = "must be an object with a string 'type'"


def is_content_part(part: object) -> bool:
    """Whether ``part`` is a content part: an object with a string ``type``, or one of vLLM's
    type-less forms (an object with one of :data:`TYPELESS_PART_KEYS`, not null)."""
    if type(part) is not dict:
        return False
    kind = part.get("type")
    if kind is None:
        return any(part.get(key) is not None for key in TYPELESS_PART_KEYS)
    return type(kind) is str


def message_problem(message: object) -> tuple[str, str] | None:
    """What is wrong with one chat message (as parsed from JSON), the first thing found:
    ``(where, detail)``, ``where`` being ``""`` (the message itself), ``".role"``,
    ``".content"``, ``".content[i]"`` or ``".name"``; None for a valid message.

    Valid: an object with a ``role``, a non-empty string (:data:`CHAT_ROLES`, or a custom
    role as vLLM takes them); ``content`` a string, a list of content parts
    (:func:`is_content_part`), left out, or null except in the roles of
    :data:`CONTENT_REQUIRED_ROLES`; ``name`` a string or null; any other field
    (``tool_calls`` …) as it is. This is the rule :class:`ChatMessage` validates with."""
    if type(message) is not dict:
        return "", "must be an object with a 'role'"
    role = message.get("role")
    if type(role) is not str or not role:
        return ".role", "is required" if "role" not in message else _ROLE_DETAIL
    content = message.get("content")
    if type(content) is str:
        pass
    elif content is None:
        if role in CONTENT_REQUIRED_ROLES and "content" in message:
            return ".content", _CONTENT_DETAIL
    elif type(content) is list:
        for index, part in enumerate(content):
            if not is_content_part(part):
                return f".content[{index}]", PART_DETAIL
    else:
        return ".content", _CONTENT_DETAIL
    name = message.get("name")
    if name is not None and type(name) is not str:
        return ".name", "must be a string"
    return None
