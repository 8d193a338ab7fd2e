"""Entry point for `ray job submit -- python jobs/prepare_data.py INPUT... --tokenizer T --output PREFIX`.

The same as `bi150-ray prepare`, but on the cluster the job was submitted to: Ray sets
RAY_ADDRESS for submitted jobs, so the default here is `--address auto` instead of a private
local Ray. Tasks run on the node of the job's driver unless `--spread` is given (then inputs,
tokenizer and output must be on storage every node sees).
"""

from __future__ import annotations

import sys

from bi150_ray import cli


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--address" or a.startswith("--address=") for a in args):
        args += ["--address", "auto"]
    return cli.main(["prepare", *args])


if __name__ == "__main__":
    sys.exit(main())
