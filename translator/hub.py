"""Push a model folder to the Hugging Face Hub (the folder is the repository)."""

from __future__ import annotations

import os
from pathlib import Path

# Training leaves resumable checkpoints, tracker logs and eval.py's plots beside the model files; they are not the model.
IGNORE_PATTERNS = ["checkpoints/**", "logs/**", "eval/**", ".*", "**/.*"]


def hub_files(folder: str | os.PathLike) -> list[str]:
    """Files of the model folder that belong on the Hub (relative posix paths, sorted; an ensemble's members included):
    what ``upload_folder`` sends with :data:`IGNORE_PATTERNS`."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS))


def push_model_folder(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False, commit_message: str = "Upload cell translator") -> list[str]:
    """Create ``repo_id`` if needed and upload the model files of ``folder``; return the files sent.

    The token comes from ``token``, else ``HF_TOKEN``, else the cached ``huggingface-cli login``.
    It is never written to disk or logged here.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json); train first with train.py")
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError(f"--hub_model_id {repo_id!r} is not a Hub repository id like user/name")
    api = HfApi(token=token or os.environ.get("HF_TOKEN") or None)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message, ignore_patterns=IGNORE_PATTERNS)
    return hub_files(folder)
