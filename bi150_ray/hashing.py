"""One file-hashing routine for manifests, stamps and checks (streams; never reads a file whole)."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
