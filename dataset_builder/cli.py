"""What every command line of the project does around its work: one line for every way it can fail.

`run_cli` is shared by ``python -m dataset_builder``, ``python -m tokenizer``, ``train.py``, ``predict.py``,
``eval.py``, ``python -m translator.recalibrate`` and ``python -m translator.ensemble`` (the last three through `run_main`):
- an expected error (a bad file, flag or value: the ``errors`` types) prints one ``error: ...`` line on stderr and
  gives exit code 2; ``--debug`` shows the traceback instead;
- a full disk or a folder it may not write, even when a library wraps the ``OSError`` in its own exception
  (``datasets``' ``DatasetGenerationError``, safetensors' ``SafetensorError``), prints one line naming the path and
  the fix and gives exit code 1;
- Ctrl-C (SIGINT) gives one line and exit code 130; SIGTERM (what ``kill``, job schedulers and ``accelerate launch``
  send) is raised in the main thread as `Terminated` and gives exit code 143, as a shell reports them. Both unwind
  through the ``finally`` blocks that remove temporary folders and partial files before the exit.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
from collections.abc import Callable, Sequence

__all__ = ["INTERRUPTED_EXIT_CODE", "TERMINATED_EXIT_CODE", "Terminated", "environment_error", "run_cli", "run_main"]

TERMINATED_EXIT_CODE = 128 + signal.SIGTERM
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
ENVIRONMENT_EXIT_CODE = 1
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (a BaseException, so ``except Exception`` does not swallow it)."""


def _raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        # `raise ... from None` hides the context on purpose (its message already says what to do), as tracebacks do.
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)


def environment_error(err: BaseException) -> str | None:
    """One line for a full disk or a path it may not write, found anywhere in ``err``'s chain of causes; else None."""
    for link in _chain(err):
        code = getattr(link, "errno", None)
        where = getattr(link, "filename", None)
        at = f" ({where})" if where else ""
        if code in _DISK_FULL or "No space left on device" in str(link) or "Disk quota exceeded" in str(link):
            return f"no space left on the device{at}; free some space or write the output to another disk, then run again"
        if code in _NOT_ALLOWED:
            return f"permission denied{at}; check that you may read the inputs and write the output's folder (or choose another), then run again"
    return None


def run_cli(
    body: Callable[[], object],
    *,
    debug: bool = False,
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError),
    prefix: str = "error:",
) -> int:
    """Run ``body()``; return the exit code: its own (an int) or 0, 1 disk full or not allowed, 2 bad input, 130 Ctrl-C,
    143 terminated (each with one line on stderr)."""
    handler_set = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if handler_set else None
    try:
        code = body()
    except Terminated:
        print("terminated by SIGTERM; temporary files were removed", file=sys.stderr)
        return TERMINATED_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); temporary files were removed", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Exception as err:
        if debug:
            raise
        line = environment_error(err)
        if line is not None:
            print(f"{prefix} {line}", file=sys.stderr)
            return ENVIRONMENT_EXIT_CODE
        if not isinstance(err, errors):
            raise
        print(f"{prefix} {err}", file=sys.stderr)
        return 2
    finally:
        if handler_set:
            signal.signal(signal.SIGTERM, previous)
    return code if isinstance(code, int) else 0


def run_main(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """``run_cli`` around ``main(argv)`` (argv: the command line's when None), with ``--debug`` read from argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: main(argv), debug="--debug" in argv)
