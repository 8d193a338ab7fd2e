"""One file-hashing routine for manifests, stamps and checks (streams; never reads a file whole)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> str:
    """Per-user folder for hashes worth keeping between jobs (``BI150_RAY_CACHE`` overrides)."""
    return os.environ.get("BI150_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bi150-ray"
    )


def sha256_file_cached(path: str | os.PathLike[str]) -> str:
    """``sha256_file``, remembered per (real path, device, inode, size, mtime) in ``cache_dir()``.

    A corpus is hashed in full once per node and version instead of at every job start (a
    multi-gigabyte ``.bin`` takes seconds per gigabyte); rewriting the file changes its mtime, so
    the hash is computed again. An unreadable or unwritable cache only costs the rehash.
    """
    st = os.stat(path)
    key = f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
    store = os.path.join(cache_dir(), "file-sha256.json")
    try:
        with open(store, encoding="utf-8") as fh:
            known = json.load(fh)
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    digest = sha256_file(path)
    known = {k: v for k, v in known.items() if not k.startswith(os.path.realpath(path) + "|")} if isinstance(known, dict) else {}
    known[key] = digest
    try:
        os.makedirs(os.path.dirname(store), exist_ok=True)
        tmp = f"{store}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(known, fh)
        os.replace(tmp, store)
    except OSError:
        pass
    return digest
