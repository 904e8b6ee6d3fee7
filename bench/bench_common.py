"""Shared helpers of the benchmark scripts: machine facts, load, peak memory, JSON results."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MOP_H5MU = Path(os.environ.get("CELL_SENTENCES_SHARED_DATA", REPO.parent / "shared" / "data")) / "mop_snareseq" / "mop_snare.h5mu"
H100_BF16_DENSE_TFLOPS = 989.0  # the peak of model FLOPs utilisation: H100 SXM, bf16, dense
LIBRARIES = ("numpy", "scipy", "h5py", "anndata", "mudata", "pyarrow", "datasets", "tokenizers", "transformers", "torch", "accelerate")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared; figures taken under load are noisy)."""
    return [round(x, 2) for x in os.getloadavg()]


def versions() -> dict[str, str]:
    """Installed versions of the libraries the figures depend on."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def machine() -> dict:
    """What ran the benchmark."""
    return {
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux ru_maxrss is in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


TIME_BIN = Path("/usr/bin/time")


def run_measured(cmd: list[str], env: dict | None = None, cwd: str | os.PathLike | None = None) -> dict:
    """Run ``cmd`` in a fresh process; return wall seconds, CPU seconds (user + system), its peak RSS (MB) and output tail.

    Peak RSS comes from GNU ``/usr/bin/time -f %M``. Reading ``ru_maxrss`` of our own child with
    ``wait4`` is wrong here: Linux folds the RSS high-water mark of the forking (big) benchmark process
    into the child's at ``exec``, so a 2 GB parent makes every child look 2 GB. ``time`` is a small
    process, so its child's figure is that child's own. Without ``/usr/bin/time`` the ``wait4`` figure
    is returned and flagged ``peak_rss_inherited``.
    """
    fd, rss_file = tempfile.mkstemp(prefix="bench_rss_", suffix=".txt")
    os.close(fd)
    use_time = TIME_BIN.exists()
    full = [str(TIME_BIN), "-f", "%M %U %S", "-o", rss_file, *cmd] if use_time else cmd
    t = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
    assert proc.stdout is not None
    output = "".join(proc.stdout)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    try:
        fields = (Path(rss_file).read_text().strip().splitlines() or [""])[-1].split()
        measured = use_time and len(fields) == 3 and fields[0].isdigit()
        peak_kb = int(fields[0]) if measured else usage.ru_maxrss
        cpu = float(fields[1]) + float(fields[2]) if measured else usage.ru_utime + usage.ru_stime
    finally:
        os.unlink(rss_file)
    if code != 0:
        raise RuntimeError(f"command failed ({code}): {' '.join(cmd)}\n{output[-3000:]}")
    return {"seconds": seconds, "cpu_seconds": round(cpu, 2), "peak_rss_mb": peak_kb / 1024, "peak_rss_inherited": not use_time,
            "output_tail": output[-2000:]}


def _repo_relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (a script run by its absolute path), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def write_results(name: str, figures: dict, quick: bool, results_dir: str | os.PathLike | None = None) -> Path:
    """Write ``figures`` with machine, load and versions to ``bench/results/NAME.json`` (``NAME.quick.json`` for --quick).

    The file is written atomically. Quick (smoke) runs go to a temp folder unless ``results_dir`` is given,
    so that tests never write into the repository.
    """
    if results_dir is None:
        results_dir = Path(tempfile.gettempdir()) / "cell_sentences_bench" if quick else RESULTS_DIR
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}{'.quick' if quick else ''}.json"
    payload = {
        "benchmark": name,
        "quick": quick,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_at_end": load_average(),
        "machine": machine(),
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, _repo_relative(sys.argv[0]), *sys.argv[1:]]) if sys.argv else "",
        **figures,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=results_dir)
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def timed(fn, *args, **kwargs):
    """Call ``fn``; return (result, seconds, load average at the start)."""
    load = load_average()
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t, load
