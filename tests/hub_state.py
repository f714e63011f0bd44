"""The in-memory repositories behind tests/hub_server.py: commits, branches, tags and git blobs (ETag = git-sha1)."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.onnx filter=lfs diff=lfs merge=lfs -text\n"


def git_sha1(data: bytes) -> str:
    """The git blob id of `data` (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, str]  # path -> blob oid (a full snapshot of the tree)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev) or self.tags.get(rev) or (rev if rev in self.commits else None)
        return self.commits.get(oid) if oid else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class HubState:
    """Repos, commits and blobs, shared by the handler threads behind one lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.corrupted: set[tuple[str, str]] = set()
        self._counter = 0

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def new_commit(self, repo: Repo, branch: str, title: str, message: str, files: dict[str, str]) -> Commit:
        parent = repo.branches.get(branch)
        self._counter += 1
        seed = f"{repo.repo_id}\0{parent}\0{title}\0{self._counter}\0{sorted(files.items())}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, now(), dict(files))
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def add_blob(self, data: bytes) -> str:
        oid = git_sha1(data)
        self.blobs[oid] = data
        return oid
