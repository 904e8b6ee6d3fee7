"""CLI: ``python -m dataset_builder --input FILE [--input FILE2] --output_dir DIR ...``.

Without ``--input`` it simulates the default dataset (``DIR/simulated.h5mu`` is not kept in the dataset
folder; it is written beside it) and builds it. Errors print one line on stderr and exit with code 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from .cli import run_cli

__all__ = ["main", "parse_args"]

logger = logging.getLogger("dataset_builder")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, like every other error of this CLI
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(prog="python -m dataset_builder", description="Paired GEX + ATAC files -> cell sentences.")
    data = parser.add_argument_group("input")
    data.add_argument(
        "--input",
        action="append",
        default=None,
        help="input file (.h5ad/.h5mu/10x .h5); give twice for RNA + ATAC files",
    )
    data.add_argument("--gex_modality", default="rna", help="GEX modality name inside a .h5mu (default: rna)")
    data.add_argument("--atac_modality", default="atac", help="ATAC modality name inside a .h5mu (default: atac)")
    data.add_argument("--batch_key", default=None,
                      help="obs column holding each cell's batch (library, sample, donor) for --test_batches / "
                      "--validation_batches (default: obs['batch'] if present)")
    data.add_argument("--cell_type_key", default=None,
                      help="obs column holding each cell's type, for per-cell-type evaluation (default: obs['cell_type'] if present)")
    data.add_argument("--counts_layer", default=None,
                      help="layer holding the raw counts when X is normalized (default: layers['counts'] if present, else X)")
    build = parser.add_argument_group("sentences and splits")
    build.add_argument("--output_dir", required=True, help="dataset folder to create")
    build.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing --output_dir")
    build.add_argument("--test_batches", nargs="+", default=None, help="batch names held out as test")
    build.add_argument("--validation_batches", nargs="+", default=None, help="batch names held out as validation")
    build.add_argument("--no_validation", action="store_true", help="no validation split: every cell outside --test_batches trains "
                       "(a final model whose settings were chosen by cross-validation)")
    build.add_argument(
        "--gex_encoding", choices=["rank", "binary"], default="rank", help="rank (default) or binary (paper)"
    )
    build.add_argument(
        "--top_peaks", type=_positive_int, default=None, help="keep the N peaks most often accessible in train"
    )
    build.add_argument("--chunk_size", type=_positive_int, default=512, help="cells per record batch (made and written as one)")
    build.add_argument("--file_format", choices=["arrow", "parquet"], default="arrow",
                       help="arrow (default): memory-mapped save_to_disk splits; parquet: zstd Parquet shards, about a third of "
                       "the size, read directly by train.py --streaming")
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="push the dataset as Parquet with a card")
    hub.add_argument("--hub_dataset_id", default=None, help="Hub dataset id user/name (needed with --push_to_hub)")
    hub.add_argument("--hub_private", action="store_true", help="create the Hub repository as private")
    hub.add_argument("--license", default=None, help="Hub license id of the data for the cards, e.g. cc-by-4.0 (default: the input "
                     "file's uns['license'] when it records one, else 'unknown')")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_dataset_id:
        parser.error("--push_to_hub needs --hub_dataset_id user/name")
    if args.input and len(args.input) > 2:
        parser.error(f"give one or two --input files, not {len(args.input)}")
    return args


def _run(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .builder import build_dataset, check_dataset_output
    from .simulate import SIMULATED_TEST_BATCHES, SIMULATED_VALIDATION_BATCHES, write_simulated

    output_dir = Path(args.output_dir)
    check_dataset_output(args.input, output_dir, args.overwrite_output_dir)
    scratch = None
    inputs, test_batches, validation_batches = args.input, args.test_batches, args.validation_batches
    try:
        if not inputs:
            output_dir.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.sim-", dir=output_dir.parent))
            inputs = [str(write_simulated(scratch / "simulated.h5mu"))]
            if test_batches is None and validation_batches is None:
                test_batches, validation_batches = list(SIMULATED_TEST_BATCHES), list(SIMULATED_VALIDATION_BATCHES)
            logger.info("no --input: built the simulated default dataset")
        meta = build_dataset(
            inputs,
            output_dir,
            test_batches=test_batches,
            validation_batches=validation_batches,
            no_validation=args.no_validation,
            gex_encoding=args.gex_encoding,
            top_peaks=args.top_peaks,
            gex_modality=args.gex_modality,
            atac_modality=args.atac_modality,
            batch_key=args.batch_key,
            cell_type_key=args.cell_type_key,
            counts_layer=args.counts_layer,
            chunk_size=args.chunk_size,
            overwrite=args.overwrite_output_dir,
            progress=True,
            license=args.license,
            file_format=args.file_format,
            load=False,
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    tqdm.write(f"wrote {output_dir}: " + ", ".join(f"{name} {cells:,}" for name, cells in meta["splits"].items()))
    if args.push_to_hub:
        from .hub import push_dataset_to_hub

        url = push_dataset_to_hub(output_dir, args.hub_dataset_id, private=args.hub_private, license=args.license)
        tqdm.write(f"pushed to {url}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 2 bad input)."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("anndata").setLevel(logging.WARNING)
    return run_cli(lambda: _run(args), debug=args.debug, errors=(ValueError, OSError), prefix="python -m dataset_builder: error:")


if __name__ == "__main__":
    sys.exit(main())
