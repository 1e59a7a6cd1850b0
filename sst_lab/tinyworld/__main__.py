"""`python -m sst_lab.tinyworld [--root DIR] [--force]`: build (or reuse) the tiny world, print its paths."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sst_lab.tinyworld", description=__doc__)
    p.add_argument("--root", type=Path, default=None,
                   help="where the world lives (default: $SST_LAB_CACHE/tinyworld or <repo>/.cache/tinyworld)")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete world exists")
    p.add_argument("--seed", type=int, default=0, help="recipe seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of the training budgets, in (0, 1] (tests use 0.05; default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress log on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from sst_lab.tinyworld.build import build_tiny_world

    world = build_tiny_world(args.root, force=args.force, seed=args.seed, scale=args.scale, verbose=not args.quiet)
    for field in dataclasses.fields(world):
        print(f"{field.name}: {getattr(world, field.name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
