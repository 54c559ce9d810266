"""MkDocs hooks for the API reference (``mkdocs.yml``: ``hooks``).

The docstrings cross-reference with Sphinx roles (``:class:`ConflictError```,
``:meth:`~sage_llm.control_plane.manager.ControlPlaneManager.stop```), which mkdocstrings
shows as written (``:class:ConflictError``). Each becomes the code name it refers to; a
``~`` keeps only the last part of a dotted name, as Sphinx shows it.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|func|attr|mod|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def _name(match: re.Match[str]) -> str:
    tilde, target = match.group(1), match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **_: Any) -> str:
    """The page's HTML with every Sphinx role replaced by its name in code."""
    return _ROLE.sub(_name, html)
