"""CLI: ``python -m tokenizer --dataset DIR --output_dir TOK``."""

from __future__ import annotations

import argparse
import sys

from . import build_from_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizer", description=__doc__)
    parser.add_argument("--dataset", required=True, help="dataset folder written by `python -m dataset_builder`")
    parser.add_argument("--output_dir", required=True, help="where to save the tokenizer")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing --output_dir")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        tok = build_from_dataset(args.dataset, args.output_dir, overwrite=args.overwrite_output_dir)
    except (OSError, ValueError, KeyError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"tokenizer with {len(tok)} tokens saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
