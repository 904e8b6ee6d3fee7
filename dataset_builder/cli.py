"""What every command line of the project does around its work: bad input -> one line, SIGTERM -> clean exit.

`run_cli` is shared by ``python -m dataset_builder``, ``python -m tokenizer``, ``train.py``, ``predict.py``,
``eval.py``, ``python -m translator.recalibrate`` and ``python -m translator.ensemble`` (the last three through `run_main`):
- an expected error (a bad file, flag or value: the ``errors`` types) prints one ``error: ...`` line on stderr and
  gives exit code 2; ``--debug`` shows the traceback instead;
- SIGTERM (what ``kill``, job schedulers and ``accelerate launch`` send) is raised in the main thread as
  `Terminated`, so the ``finally`` blocks that remove temporary folders and partial files run before the exit
  (code 143, as a shell reports a process ended by SIGTERM). Without it Python dies without cleaning up.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Sequence

__all__ = ["Terminated", "TERMINATED_EXIT_CODE", "run_cli", "run_main"]

TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (a BaseException, so ``except Exception`` does not swallow it)."""


def _raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


def run_cli(
    body: Callable[[], object],
    *,
    debug: bool = False,
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError),
    prefix: str = "error:",
) -> int:
    """Run ``body()``; return the exit code: its own (an int) or 0, 2 bad input (one line on stderr), 143 terminated."""
    handler_set = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if handler_set else None
    try:
        code = body()
    except errors as err:
        if debug:
            raise
        print(f"{prefix} {err}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated by SIGTERM; temporary files were removed", file=sys.stderr)
        return TERMINATED_EXIT_CODE
    finally:
        if handler_set:
            signal.signal(signal.SIGTERM, previous)
    return code if isinstance(code, int) else 0


def run_main(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """``run_cli`` around ``main(argv)`` (argv: the command line's when None), with ``--debug`` read from argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: main(argv), debug="--debug" in argv)
