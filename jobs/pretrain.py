"""Entry point for `ray job submit -- python jobs/pretrain.py --config CONFIG.json [runtime flags]`.

The same driver as `bi150-ray run`, against the cluster at RAY_ADDRESS (Ray sets it for
submitted jobs). Runtime flags (--nodes, --devices-per-node, --backend, --storage, --run-name)
override the config's `runtime` section.
"""

from __future__ import annotations

import argparse
import sys

from bi150_ray import cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, add_help=True)
    p.add_argument("--config", required=True, help="PaddleNLP pretrain JSON (+ optional runtime section)")
    known, rest = p.parse_known_args(argv)
    return cli.main(["run", known.config, *rest])


if __name__ == "__main__":
    sys.exit(main())
