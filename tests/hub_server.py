"""A Hugging Face Hub-compatible HTTP server for tests: the subset the real huggingface_hub client uses.

Standard library only (`ThreadingHTTPServer`), in memory, bound to 127.0.0.1 on a free port. Every
file is a plain git blob (ETag = git-sha1); uploads are always "regular" (base64 inside the commit),
so the client never talks LFS or Xet. No auth: tokens are ignored, `private` is only stored.

Endpoints (TYPE = models | datasets | spaces, REPO = namespace/name, REV = branch, tag or commit sha,
URL-quoted with safe="" by the client):

    POST   /api/repos/create                         create a repo (409 + {url} if it exists)
    DELETE /api/repos/delete                         delete a repo
    POST   /api/validate-yaml                        README metadata check (always valid)
    GET    /api/agent-harnesses                      the client's user-agent registry (empty)
    GET    /api/TYPE/REPO[/revision/REV]             repo info: id, sha, private, siblings (model_info)
    GET    /api/TYPE/REPO/tree/REV[/PATH]            file/directory listing (?recursive=true)
    GET    /api/TYPE/REPO/commits/REV                commit history, newest first
    GET    /api/TYPE/REPO/refs                       branches and tags
    POST   /api/TYPE/REPO/branch/BRANCH              create a branch ({startingPoint}; 409 if it exists)
    POST   /api/TYPE/REPO/preupload/REV              upload modes: always "regular", oid of the current file
    POST   /api/TYPE/REPO/commit/REV                 NDJSON commit: header, file (base64), deletedFile, deletedFolder
    HEAD   /[datasets/|spaces/]REPO/resolve/REV/PATH file metadata: X-Repo-Commit, ETag, Content-Length
    GET    /[datasets/|spaces/]REPO/resolve/REV/PATH file content (Range: bytes=N- supported)

Errors are 404s typed by `X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound` (the last
with `X-Repo-Commit`, so the client caches the absence), 400 for what is not supported (PRs, LFS),
412 for a stale parentCommit. Every reply carries Content-Length (HTTP/1.1 keep-alive).

Test hooks: `HubServer.corrupt(repo_id, path)` serves that file with one byte flipped (size and ETag
unchanged, as a bad transfer or a tampered mirror would), `requests` logs "METHOD path" lines, and
`unhandled` lists requests no route matched. `python tests/hub_server.py` serves until killed and
prints its URL on the first line (for subprocess tests with HF_ENDPOINT set).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from hub_state import GITATTRIBUTES, TYPES, Commit, HubError, HubState, Repo, now


def _split_repo_path(parts: list[str]) -> tuple[str, list[str]]:
    if len(parts) < 2:
        raise HubError(404, "Repository not found", "RepoNotFound")
    return f"{parts[0]}/{parts[1]}", parts[2:]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every reply below sets Content-Length
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read `requests` instead
        pass

    # ------------------------------------------------------------------ plumbing
    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"invalid JSON body: {e}") from e

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict[str, str] | None = None, head: bool = False, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers, head=head)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        # Split the raw path before unquoting: a revision like refs%2Fpr%2F1 is one segment.
        parts = [unquote(p) for p in url.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.server.requests.append(f"{method} {url.path}")
        try:
            self._route(method, parts, query)
        except HubError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = str(e)
            self._json(e.status, {"error": str(e)}, headers=headers, head=method == "HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ------------------------------------------------------------------ routing
    def _route(self, method: str, parts: list[str], query: dict[str, str]) -> None:
        with self.state.lock:
            if parts[:1] == ["api"]:
                return self._api(method, parts[1:], query)
            repo_type = "model"
            if parts[:1] and parts[0] in ("datasets", "spaces"):
                repo_type, parts = TYPES[parts[0]], parts[1:]
            if len(parts) >= 4 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                repo_id = f"{parts[0]}/{parts[1]}"
                return self._resolve(method, repo_type, repo_id, parts[3], "/".join(parts[4:]))
        self._unhandled(method, parts)

    def _unhandled(self, method: str, parts: list[str]) -> None:
        self.server.unhandled.append(f"{method} /{'/'.join(parts)}")
        raise HubError(404, f"no such endpoint: {method} /{'/'.join(parts)}")

    def _api(self, method: str, parts: list[str], query: dict[str, str]) -> None:
        if parts == ["repos", "create"] and method == "POST":
            return self._create_repo(self._json_body())
        if parts == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo(self._json_body())
        if parts == ["validate-yaml"] and method == "POST":
            self._body()
            return self._json(200, {"errors": [], "warnings": []})
        if parts == ["agent-harnesses"] and method == "GET":  # fetched once per process for the User-Agent
            return self._json(200, {"standardEnvVars": [], "harnesses": {}})
        if parts and parts[0] in TYPES:
            repo_id, rest = _split_repo_path(parts[1:])
            repo = self.state.repo(TYPES[parts[0]], repo_id)
            if method == "GET" and not rest:
                return self._info(repo, "main")
            if method == "GET" and rest[:1] == ["revision"] and len(rest) == 2:
                return self._info(repo, rest[1])
            if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                return self._tree(repo, rest[1], "/".join(rest[2:]), query)
            if method == "GET" and rest[:1] == ["commits"] and len(rest) == 2:
                return self._commits(repo, rest[1])
            if method == "GET" and rest == ["refs"]:
                return self._refs(repo)
            if method == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
                return self._create_branch(repo, rest[1], self._json_body())
            if method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
                return self._preupload(repo, rest[1], self._json_body())
            if method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
                return self._commit(repo, rest[1], query, self._body())
        self._unhandled(method, ["api", *parts])

    # ------------------------------------------------------------------ repos
    def _repo_url(self, repo: Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.base}/{prefix}{repo.repo_id}"

    def _create_repo(self, body: dict[str, Any]) -> None:
        name = body.get("name")
        if not name:
            raise HubError(400, "missing repo name")
        repo_id = f"{body.get('organization') or 'user'}/{name}"
        repo_type = body.get("type") or "model"
        existing = self.state.repos.get((repo_type, repo_id))
        if existing is not None:
            # exist_ok=True still reads the JSON of the 409 for the repo URL.
            return self._json(409, {"error": "You already created this repo", "url": self._repo_url(existing)})
        private = bool(body.get("private")) or body.get("visibility") == "private"
        repo = Repo(repo_id, repo_type, private, now())
        self.state.repos[(repo_type, repo_id)] = repo
        self.state.new_commit(repo, "main", "initial commit", "", {".gitattributes": self.state.add_blob(GITATTRIBUTES)})
        self._json(200, {"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, body: dict[str, Any]) -> None:
        repo_id = f"{body.get('organization') or 'user'}/{body.get('name')}"
        if self.state.repos.pop((body.get("type") or "model", repo_id), None) is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        self._json(200, {})

    def _info(self, repo: Repo, rev: str) -> None:
        commit = self.state.commit_at(repo, rev)
        siblings = [{"rfilename": path, "size": len(self.state.blobs[oid]), "blobId": oid}
                    for path, oid in sorted(commit.files.items())]
        self._json(200, {"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                         "sha": commit.oid, "private": repo.private, "disabled": False, "gated": False,
                         "lastModified": commit.date, "createdAt": repo.created, "tags": [], "downloads": 0,
                         "likes": 0, "siblings": siblings})

    def _tree(self, repo: Repo, rev: str, path: str, query: dict[str, str]) -> None:
        commit = self.state.commit_at(repo, rev)
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{path} not found at {rev}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        entries: dict[str, dict[str, Any]] = {}
        for file_path, oid in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            rel = file_path[len(prefix):].split("/")
            for depth in range(1, len(rel)):  # the directories on the way
                if not recursive and depth > 1:
                    break
                d = prefix + "/".join(rel[:depth])
                entries.setdefault(d, {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(),
                                       "size": 0})
            if recursive or len(rel) == 1:
                entries[file_path] = {"type": "file", "path": file_path, "oid": oid,
                                      "size": len(self.state.blobs[oid])}
        self._json(200, list(entries.values()))

    def _commits(self, repo: Repo, rev: str) -> None:
        commit: Commit | None = self.state.commit_at(repo, rev)
        out = []
        while commit is not None:
            out.append({"id": commit.oid, "title": commit.title, "message": commit.message, "date": commit.date,
                        "authors": [{"user": "ssl-zoo-tests"}]})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(200, out)

    def _refs(self, repo: Repo) -> None:
        def refs(kind: str, table: dict[str, str]) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(table.items())]

        self._json(200, {"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags),
                         "converts": [], "pullRequests": []})

    def _create_branch(self, repo: Repo, branch: str, body: dict[str, Any]) -> None:
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        start = self.state.commit_at(repo, body.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        self._json(200, {})

    # ------------------------------------------------------------------ uploads
    def _preupload(self, repo: Repo, rev: str, body: dict[str, Any]) -> None:
        commit = repo.resolve(rev)  # a new branch has no commit yet: every file is new
        files = commit.files if commit else {}
        answer = []
        for f in body.get("files", []):
            entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
            if f["path"] in files:
                entry["oid"] = files[f["path"]]
            answer.append(entry)
        self._json(200, {"files": answer, "commitOid": commit.oid if commit else None})

    def _commit(self, repo: Repo, rev: str, query: dict[str, str], raw: bytes) -> None:
        if query.get("create_pr") in ("1", "true"):
            raise HubError(400, "pull requests are not supported by the test server")
        if rev not in repo.branches:
            if repo.resolve(rev) is not None:
                raise HubError(400, f"cannot commit to {rev}: not a branch")
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        head = repo.resolve(rev)
        files = dict(head.files) if head else {}
        summary, description = "", ""
        for line in raw.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                summary, description = value.get("summary", ""), value.get("description", "")
                parent = value.get("parentCommit")
                if parent and head is not None and parent != head.oid:
                    raise HubError(412, f"parentCommit {parent} is not the head of {rev} ({head.oid})")
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = self.state.add_blob(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"{value['path']} does not exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
            elif key == "lfsFile":
                raise HubError(400, "LFS uploads are not supported by the test server (preupload never asks)")
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self.state.new_commit(repo, rev, summary, description, files)
        self._json(200, {"commitOid": commit.oid, "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                         "pullRequestUrl": None, "success": True})

    # ------------------------------------------------------------------ downloads
    def _resolve(self, method: str, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        repo = self.state.repo(repo_type, repo_id)
        commit = self.state.commit_at(repo, rev)
        oid = commit.files.get(path)
        if oid is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = self.state.blobs[oid]
        if (repo_id, path) in self.state.corrupted and data:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
        status, body = 200, data
        rng = self.headers.get("Range", "")
        if method == "GET" and rng.startswith("bytes="):
            start_s, _, end_s = rng[len("bytes="):].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        self._send(status, body, "application/octet-stream", headers=headers, head=method == "HEAD",
                   length=len(body))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: HubState):
        super().__init__(address, Handler)
        self.state = state
        self.requests: list[str] = []
        self.unhandled: list[str] = []


class HubServer:
    """The test Hub on 127.0.0.1:`port` (0: a free one); `with HubServer() as hub: hub.url`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.state = HubState()
        self._server = _Server((host, port), self.state)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[str]:
        return self._server.requests

    @property
    def unhandled(self) -> list[str]:
        return self._server.unhandled

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def corrupt(self, repo_id: str, path: str, on: bool = True) -> None:
        """Serve `path` of `repo_id` with one byte flipped (same size, same ETag) until `on=False`."""
        with self.state.lock:
            (self.state.corrupted.add if on else self.state.corrupted.discard)((repo_id, path))

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        """The stored content of a file (what was uploaded)."""
        with self.state.lock:
            repo = self.state.repo(repo_type, repo_id)
            return self.state.blobs[self.state.commit_at(repo, revision).files[path]]


if __name__ == "__main__":
    import sys

    server = HubServer(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0).start()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
