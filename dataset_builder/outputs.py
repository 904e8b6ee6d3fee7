"""Where a command may write: never onto, into or around one of its inputs, and only over what this tool wrote.

Every command line of the project checks its output here before it reads or writes anything:

- `check_output` refuses an output that is an input, contains an input, or sits inside an input folder;
- `check_replaceable` lets an overwrite flag replace only a folder (or file) of the kind the command writes:
  a dataset folder, a tokenizer folder, a model folder, an evaluation folder or a prediction file. Any other
  existing path is refused, whatever the flag says, so a flag pointed at the wrong folder cannot delete data;
- `apply_umask` gives a file or folder made through `tempfile` (mode 0600 / 0700) the mode the user's umask
  gives any other new file, before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

__all__ = ["META_FILE", "FOLDER_KINDS", "apply_umask", "check_output", "check_replaceable", "folder_kind", "check_room_for", "is_prediction_file", "atomic_file", "write_text_atomic"]

META_FILE = "cell_sentences.json"  # the metadata of every dataset, tokenizer and model folder

# The files that mark a folder as written by this tool, per kind (every file named must be present).
FOLDER_KINDS: dict[str, tuple[str, ...]] = {
    "dataset": (META_FILE, "dataset_dict.json"),
    "model": (META_FILE, "config.json"),
    "tokenizer": (META_FILE, "tokenizer.json"),
    "evaluation": ("eval_results.json",),
}
# What a model folder holds while its first training has not finished yet: checkpoints, tracker logs, hidden files.
_UNFINISHED_MODEL_ENTRIES = ("checkpoints", "logs")


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def folder_kind(path: str | os.PathLike) -> str | None:
    """The kind of a folder this tool wrote (``dataset``, ``model``, ``tokenizer``, ``evaluation``), or None.

    A model folder is recognised before a tokenizer folder (it holds a tokenizer too). A folder holding only
    what an unfinished training run leaves (``checkpoints/``, ``logs/``, hidden files) counts as a model folder.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    for kind in ("dataset", "model", "tokenizer", "evaluation"):
        if all((path / name).exists() for name in FOLDER_KINDS[kind]):
            return kind
    entries = [p.name for p in path.iterdir() if not p.name.startswith(".")]
    if entries and all(name in _UNFINISHED_MODEL_ENTRIES for name in entries):
        return "model"
    return None


def is_prediction_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ``.h5ad`` written by ``predict.py`` (it records ``uns['cell_translation']``)."""
    try:
        import h5py

        with h5py.File(path, "r") as handle:
            return "uns" in handle and "cell_translation" in handle["uns"]
    except (OSError, ImportError):
        return False


def check_output(output: str | os.PathLike, inputs: Mapping[str, Iterable[str | os.PathLike] | str | os.PathLike | None], flag: str) -> None:
    """Refuse an ``output`` that is an input, contains one, or sits inside an input folder.

    Parameters
    ----------
    output
        The path the command is about to write (a folder or a file).
    inputs
        Flag name -> the path(s) given with it (None and empty entries are skipped).
    flag
        The output's flag, for the message (``--output_dir``).

    Raises
    ------
    ValueError
        One line naming both flags and what to do.
    """
    out = _real(output)
    for input_flag, paths in inputs.items():
        if paths is None:
            continue
        for given in [paths] if isinstance(paths, str | os.PathLike) else paths:
            if not given:
                continue
            source = _real(given)
            if out == source or (out.exists() and source.exists() and os.path.samefile(out, source)):
                relation = "is"
            elif source.is_relative_to(out):
                relation = "contains"
            elif out.is_relative_to(source):
                relation = "is inside"
            else:
                continue
            raise ValueError(f"{flag} {output} {relation} the input {input_flag} {given}: the command would write over its own input; "
                             f"choose an {flag} outside every input")


def check_replaceable(output: str | os.PathLike, flag: str, kind: str, overwrite: bool, overwrite_flag: str) -> None:
    """Refuse to write over an existing ``output`` unless it is what this command writes and the user asked to replace it.

    Parameters
    ----------
    output
        The folder (or, for ``kind="prediction"``, the ``.h5ad`` file) about to be written.
    flag, overwrite_flag
        The output's flag and the flag that allows replacing it, for the messages.
    kind
        ``dataset``, ``model``, ``tokenizer``, ``evaluation`` (folders) or ``prediction`` (a file).
    overwrite
        Whether ``overwrite_flag`` was given.

    Raises
    ------
    FileExistsError
        The output exists and the flag was not given.
    ValueError
        The output exists but is not a folder (or file) of that kind written by this tool: it is never replaced.
    """
    path = Path(output)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not any(path.iterdir()):
        return  # an empty folder holds nothing to lose
    if kind == "prediction":
        ours = path.is_file() and is_prediction_file(path)
        what = "a prediction file written by predict.py"
    else:
        ours = folder_kind(path) == kind
        what = f"a {kind} folder written by this tool"
    if not ours:
        raise ValueError(f"{flag} {output} exists and is not {what}; {overwrite_flag} never replaces it: choose a new {flag}")
    if not overwrite:
        raise FileExistsError(f"{flag} {output} exists: choose a new {flag}, or pass {overwrite_flag} to replace it")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a new file or folder gets under the user's umask (``tempfile`` makes them 0600 / 0700).

    Only ``path`` itself changes: what was written inside a folder was created with the umask already.
    """
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def write_text_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to ``path`` through a temporary file in the same folder, then rename (mode from the umask)."""
    with atomic_file(path) as tmp:
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary file beside ``path`` for the caller to write; renamed onto ``path`` when the block ends without error.

    The file gets the mode the umask gives any new file; on an error (or a signal) it is removed and ``path`` is left
    as it was. ``suffix``: for writers that choose the format by extension (``.h5ad``, ``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_room_for(path: str | os.PathLike, n_bytes: int, what: str) -> None:
    """Refuse, before writing ``path``, when its disk has less room than ``n_bytes`` (plus a margin for metadata).

    A file that fills the disk half way fails late and, for HDF5, cannot even be closed cleanly: checking first gives
    one clear line instead.
    """
    folder = Path(path).parent
    while folder.name.startswith(".") and folder.parent != folder:  # a staging folder: name where the output goes
        folder = folder.parent
    need = int(n_bytes * 1.02) + (8 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ValueError(f"{folder} has {free / 2**20:,.0f} MiB free and the output ({what}) needs about {need / 2**20:,.0f} MiB; "
                         "free some space or write the output to another disk")
