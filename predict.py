"""Predict the other modality of cells: AnnData in, AnnData out.

    python predict.py --model outputs/simulated --input cells.h5ad --direction gex2atac --output pred.h5ad
    python predict.py --model DIR --input rna.h5ad --input atac.h5ad --direction atac2gex --output pred.h5ad --text

The output holds one row per input cell and one column per target feature of the model:
accessibility probabilities (gex2atac) or expected log-normalized expression (atac2gex). It keeps the
input's obs columns and obsm arrays; var_names are the features as the training data named them (e.g.
chr1:100-200), with var['normalized_name'] (chr1-100-200) and the training data's annotations (gene_ids,
interval, ...); uns['cell_translation'] records the model, direction and package version.
``--text`` also stores each cell's translated sentence in ``obs['translation']``.
The file is written in a temporary folder beside the output and renamed, so it appears whole or not at all;
its mode follows the umask. A progress bar over cells is shown when stderr is a terminal (``--no_progress``: none).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dataset_builder.cli import run_cli
from dataset_builder.outputs import check_output, check_replaceable
from tokenizer import DIRECTIONS

PRECISIONS = ("auto", "float32", "bf16")  # translator.decode.PRECISIONS, named here so that parsing flags imports no transformers


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(prog="python predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder written by train.py, or a Hub id")
    parser.add_argument("--input", required=True, action="append", help="input file (h5ad / h5mu / 10x h5); twice for one file per modality")
    parser.add_argument("--gex_modality", default="rna", help="GEX modality name inside a .h5mu (default: rna)")
    parser.add_argument("--atac_modality", default="atac", help="ATAC modality name inside a .h5mu (default: atac)")
    parser.add_argument("--counts_layer", default=None, help="layer holding the raw counts when X is normalized (default: layers['counts'] if present, else X)")
    parser.add_argument("--direction", required=True, choices=DIRECTIONS, help="gex2atac or atac2gex")
    parser.add_argument("--output", required=True, help="output .h5ad")
    parser.add_argument("--text", action="store_true", help="also store the translated sentences in obs['translation']")
    parser.add_argument("--batch_size", type=int, default=64, help="cells decoded together")
    parser.add_argument("--chunk_cells", type=int, default=1024, help="cells predicted and written at a time (bounds memory: one chunk of cells x features)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--device", default="auto", help="where the model runs: auto (a GPU when torch sees one), cpu, cuda[:N]")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="the encoder's precision: auto (bf16 on a CPU with hardware bf16 products, AMX or AVX512-BF16; float32 "
                             "elsewhere), float32, bf16. The decoder step, the profile head and the readout stay float32")
    parser.add_argument("--allow_pickle", action="store_true", help="load pickle weights (pytorch_model.bin); they can run code: only for trusted folders")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (it is shown only when stderr is a terminal)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.chunk_cells < 1:
        parser.error(f"--chunk_cells must be >= 1, got {args.chunk_cells}")
    if not args.output.endswith(".h5ad"):
        parser.error(f"--output {args.output} must end in .h5ad")
    return args


def run(args: argparse.Namespace) -> Path:
    from translator import CellTranslator

    output = Path(args.output)
    check_output(output, {"--input": args.input, "--model": args.model if Path(args.model).exists() else None}, "--output")
    check_replaceable(output, "--output", "prediction", args.overwrite, "--overwrite")
    translator = CellTranslator.from_pretrained(args.model, device=args.device, allow_pickle=args.allow_pickle)
    inputs = args.input[0] if len(args.input) == 1 else args.input
    output.parent.mkdir(parents=True, exist_ok=True)
    # The file is made inside a private temporary folder by h5py itself, so its mode follows the umask as any
    # written file's does, and it is renamed into place only when complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tmp = staging / output.name
        # Chunk by chunk: memory holds one chunk of predictions, not the whole cells x features matrix.
        started = time.perf_counter()
        stats = translator.predict_h5ad(inputs, args.direction, tmp, batch_size=args.batch_size, chunk_cells=args.chunk_cells,
                                        return_sentences=args.text, gex_modality=args.gex_modality,
                                        atac_modality=args.atac_modality, counts_layer=args.counts_layer,
                                        progress=not args.no_progress, precision=args.precision)
        os.replace(tmp, output)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    n_features = len(translator.meta["peaks" if args.direction == "gex2atac" else "genes"])
    logging.getLogger("predict").info("wrote %s: %d cells x %d features in %.2f s, %.0f cells/s, reading and writing included (%s)", output,
                                      stats["cells"], n_features, seconds, stats["cells"] / max(seconds, 1e-9), stats)
    return output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s", level=logging.INFO)
    return run_cli(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
