"""CLI: ``python -m tokenizer --dataset DIR --output_dir TOK``."""

from __future__ import annotations

import argparse
import sys

from dataset_builder.cli import run_cli

from . import build_from_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizer", description=__doc__)
    parser.add_argument("--dataset", required=True, help="dataset folder written by `python -m dataset_builder`")
    parser.add_argument("--output_dir", required=True, help="where to save the tokenizer")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing --output_dir")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    def build() -> None:
        tok = build_from_dataset(args.dataset, args.output_dir, overwrite=args.overwrite_output_dir)
        print(f"tokenizer with {len(tok)} tokens saved to {args.output_dir}")

    return run_cli(build, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
