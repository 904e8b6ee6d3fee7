"""A Hub in a local folder: the upload calls of huggingface_hub and datasets write there, so a test can load what was sent.

``LocalHub(root).install(monkeypatch)`` replaces ``HfApi``, ``HfFileSystem`` and ``hf_hub_download`` where this
project and ``datasets`` call them. A repository ``user/name`` of type ``dataset`` lives in ``root/datasets/user/name``
(``root/models/...`` for models); ``calls`` records each call with the token it was given.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from huggingface_hub import CommitOperationAdd, CommitOperationDelete


class LocalHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.calls: list[dict] = []
        self.staged: dict[str, bytes] = {}

    def folder(self, repo_id: str, repo_type: str | None = "model") -> Path:
        return self.root / f"{repo_type or 'model'}s" / repo_id

    def api_class(self):
        hub = self

        class FakeHfApi:
            def __init__(self, token=None, **kwargs):
                self.token = token

            def _record(self, call, repo_id, **extra):
                hub.calls.append({"call": call, "repo_id": repo_id, "token": self.token, **extra})

            def repo_info(self, repo_id, repo_type=None, revision=None, **kwargs):
                if not hub.folder(repo_id, repo_type).is_dir():
                    from huggingface_hub.errors import RepositoryNotFoundError

                    response = SimpleNamespace(headers={}, request=None, status_code=404)
                    raise RepositoryNotFoundError(f"{repo_id} not found", response=response)
                # "main" as the commit: datasets then reads the repository at the plain path datasets/user/name
                return SimpleNamespace(id=repo_id, sha="main")

            def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False, **kwargs):
                self._record("create_repo", repo_id, private=private)
                hub.folder(repo_id, repo_type).mkdir(parents=True, exist_ok=True)
                return SimpleNamespace(repo_id=repo_id)

            def preupload_lfs_files(self, repo_id, additions, **kwargs):
                # the caller may delete the local file once it is "uploaded": keep its bytes for the commit
                for op in additions:
                    hub.staged[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()

            def create_commit(self, repo_id, operations, repo_type=None, commit_message="", **kwargs):
                folder = hub.folder(repo_id, repo_type)
                folder.mkdir(parents=True, exist_ok=True)
                for op in operations:
                    target = folder / op.path_in_repo
                    if isinstance(op, CommitOperationDelete):
                        target.unlink(missing_ok=True)
                    elif isinstance(op, CommitOperationAdd):
                        target.parent.mkdir(parents=True, exist_ok=True)
                        source = hub.staged.pop(op.path_in_repo, op.path_or_fileobj)
                        if isinstance(source, bytes):
                            target.write_bytes(source)
                        elif isinstance(source, str | Path):
                            shutil.copyfile(source, target)
                        else:
                            target.write_bytes(source.read())
                self._record("create_commit", repo_id, files=sorted(op.path_in_repo for op in operations), message=commit_message)
                return SimpleNamespace(oid="main")

            def upload_folder(self, folder_path, repo_id, repo_type=None, ignore_patterns=None, allow_patterns=None, **kwargs):
                from huggingface_hub.utils import filter_repo_objects

                source = Path(folder_path)
                files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
                sent = sorted(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
                target = hub.folder(repo_id, repo_type)
                for name in sent:
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source / name, target / name)
                self._record("upload_folder", repo_id, files=sent)

        return FakeHfApi

    def download(self, repo_id, filename, repo_type=None, token=None, **kwargs) -> str:
        path = self.folder(repo_id, repo_type) / filename
        if not path.exists():
            raise FileNotFoundError(f"{filename} is not in {repo_id}")
        return str(path)

    def filesystem_class(self):
        root = self.root

        class FakeHfFileSystem(DirFileSystem):
            def __init__(self, *args, **kwargs):
                super().__init__(path=str(root), fs=LocalFileSystem())

        return FakeHfFileSystem

    def install(self, monkeypatch, *modules) -> LocalHub:
        """Replace the Hub calls of ``datasets`` and of ``modules`` (and ``huggingface_hub.HfApi`` itself)."""
        import datasets.arrow_dataset
        import datasets.dataset_dict
        import huggingface_hub

        api = self.api_class()
        for module in (huggingface_hub, datasets.arrow_dataset, datasets.dataset_dict, *modules):
            if hasattr(module, "HfApi"):
                monkeypatch.setattr(module, "HfApi", api)
            if hasattr(module, "hf_hub_download"):
                monkeypatch.setattr(module, "hf_hub_download", self.download)
        monkeypatch.setattr(datasets.dataset_dict, "HfFileSystem", self.filesystem_class())
        return self
