"""One file-hashing routine for manifests, stamps and checks (streams; never reads a file whole)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from typing import Any


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> str:
    """Per-user folder for file facts worth keeping between jobs (``BI150_RAY_CACHE`` overrides)."""
    return os.environ.get("BI150_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bi150-ray"
    )


def file_memo(path: str | os.PathLike[str], kind: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` for this version of the file at ``path``, remembered in ``cache_dir()`` under
    (real path, device, inode, size, mtime) and ``kind``; a JSON-able result.

    Whole-file facts about a corpus (its sha256, its token-id range) cost seconds per gigabyte and
    are needed at every job start and relaunch; here each is computed once per node and file
    version. Rewriting the file changes its mtime, so it is computed again. An unreadable or
    unwritable cache only costs the recomputation.
    """
    real = os.path.realpath(path)
    st = os.stat(path)
    version = f"{real}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
    store = os.path.join(cache_dir(), "file-memo.json")
    try:
        with open(store, encoding="utf-8") as fh:
            known = json.load(fh)
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    facts = known.get(version)
    if isinstance(facts, dict) and kind in facts:
        return facts[kind]
    value = compute()
    # Drop what was known of older versions of this file; keep this version's other facts.
    known = {k: v for k, v in known.items() if not k.startswith(real + "|") or k == version}
    known.setdefault(version, {})
    if not isinstance(known[version], dict):
        known[version] = {}
    known[version][kind] = value
    try:
        os.makedirs(os.path.dirname(store), exist_ok=True)
        tmp = f"{store}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(known, fh)
        os.replace(tmp, store)
    except OSError:
        pass
    return value


def sha256_file_cached(path: str | os.PathLike[str]) -> str:
    """``sha256_file`` once per node and file version (``file_memo``)."""
    return file_memo(path, "sha256", lambda: sha256_file(path))
