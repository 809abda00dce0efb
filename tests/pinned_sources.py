"""Pinning the library code our overrides of private internals rely on: a test keeps the sha256 of
each function's source as it was when the override was checked against it, and an upgrade that
changes one fails loudly, naming it. This module holds no tests."""
from __future__ import annotations

import hashlib


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def changed_sources(installed: dict[str, str], pinned: dict[str, str]) -> list[str]:
    """The names whose installed source (name -> `inspect.getsource` text) no longer has its pinned hash."""
    return [name for name, source in installed.items() if source_hash(source) != pinned[name]]
