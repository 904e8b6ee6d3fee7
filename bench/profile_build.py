"""Profile a dataset build with py-spy and write where the time goes (inclusive and self shares per function).

Needs ``py-spy`` (``pip install py-spy``; it samples the running process from outside, no code change).

    python bench/profile_build.py --input /tmp/bench_large.h5ad          # the full-size simulated file
    python bench/profile_build.py --input /tmp/bench_large_10000.h5ad --name profile_build_10k
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:line)`` -> ``func (file.py)``: lines are merged so that a function is one row."""
    if " (" not in frame:
        return frame
    func, where = frame.split(" (", 1)
    return f"{func} ({where.split(':')[0].split('/')[-1]})"


def summarize(raw: Path, top: int = 30) -> dict:
    """Inclusive and self sample shares from py-spy's ``--format raw`` (collapsed stacks)."""
    inclusive, self_ = Counter(), Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";")]
        for name in set(frames):
            inclusive[name] += n
        self_[frames[-1]] += n
    share = lambda c: [{"function": k, "share": round(v / max(total, 1), 4)} for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "inclusive": share(inclusive), "self": share(self_)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="input file of the build")
    parser.add_argument("--rate", type=int, default=20, help="py-spy samples per second")
    parser.add_argument("--name", default="profile_build", help="result name (bench/results/NAME.json)")
    parser.add_argument("--results_dir", type=Path, default=None, help="where the JSON goes (default bench/results)")
    parser.add_argument("extra", nargs="*", help="extra dataset_builder flags after --, e.g. -- --test_batches s4d1")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise FileNotFoundError("py-spy not found: install it into the venv with `pip install py-spy`")
    if not args.input.exists():
        raise FileNotFoundError(f"--input {args.input} not found (make it with bench/make_large.py)")
    with tempfile.TemporaryDirectory(prefix="profile_build_") as tmp:
        raw = Path(tmp) / "stacks.txt"
        cmd = [py_spy, "record", "-r", str(args.rate), "-f", "raw", "-o", str(raw), "--",
               sys.executable, "-m", "dataset_builder", "--input", str(args.input), "--output_dir", str(Path(tmp) / "out"), *args.extra]
        load = common.load_average()
        subprocess.run(cmd, check=True, cwd=common.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        figures = {"input": str(args.input), "load_average_before": load, **summarize(raw)}
    for row in figures["inclusive"][:25]:
        print(f"{row['share']:6.1%}  {row['function']}")
    print("self:")
    for row in figures["self"][:10]:
        print(f"{row['share']:6.1%}  {row['function']}")
    common.write_results(args.name, figures, False, args.results_dir)
    return figures


if __name__ == "__main__":
    main()
