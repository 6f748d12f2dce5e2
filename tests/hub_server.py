"""A small in-process Hugging Face Hub for tests: the subset of the Hub protocol that huggingface_hub uses.

The real `huggingface_hub` / `transformers` client code runs end to end against it (push, pull, revisions),
without the internet. Model repositories only. Protocol covered (see ../shared/REFERENCE.md section 6):

- ``GET /api/whoami-v2``; token check: a request with an unknown bearer token gets ``401`` with
  ``X-Error-Message: Invalid credentials in Authorization header`` (as the Hub); writes need a write token
  (none: ``401``; a read token: ``403``); a private repository is invisible (``404 RepoNotFound``) without a token.
- ``POST /api/repos/create`` (``409`` when it exists), ``POST /api/repos/delete``.
- ``POST /api/validate-yaml``: README front matter must be a YAML mapping; ``model-index`` and
  ``base_model`` are checked for the structure the Hub requires; errors are ``400`` with a message.
- ``GET /api/models/{repo}[/revision/{rev}]``: id, sha, siblings (with blobId/size/lfs), private, tags, cardData.
- ``POST /api/models/{repo}/preupload/{rev}``: ``uploadMode`` lfs/regular per file and the ``oid`` of the file
  already at that path (so unchanged files are skipped by the client).
- ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer; upload + verify actions, none when the object is
  stored), ``PUT`` upload URL (sha256 and size checked), ``POST`` verify URL.
- ``POST /api/models/{repo}/commit/{branch}``: NDJSON header / file / lfsFile / deletedFile / deletedFolder;
  ``parentCommit`` checked (``412``); ``lfsFile`` objects must have been uploaded.
- ``GET /api/models/{repo}/refs``, ``GET .../commits/{rev}``, ``GET .../tree/{rev}[/{path}]`` (recursive),
  ``POST .../paths-info/{rev}``, ``POST/DELETE .../branch/{name}``, ``POST .../tag/{rev}``, ``DELETE .../tag/{tag}``.
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: quoted ``ETag`` (git blob sha1; for LFS files the pointer's),
  ``X-Repo-Commit``, ``Content-Length``, ``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files, ``Range``.
- ``404`` answers carry ``X-Error-Code`` ``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``.

Revisions resolve as a branch, a tag or a full commit sha (URL-quoted names such as ``refs%2Fheads%2Fmain``).

Use :func:`start_session_hub` once per test session *before* huggingface_hub is imported: it starts the
server on 127.0.0.1 (a free port) and sets ``HF_ENDPOINT``, ``HF_HOME`` (fresh), ``HF_HUB_DISABLE_XET=1`` and
``HF_HUB_OFFLINE=0`` in ``os.environ``, so subprocesses inherit them too.
"""

from __future__ import annotations

import atexit
import base64
import copy
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

WRITE_TOKEN = "hf_localhub_write_token"
READ_TOKEN = "hf_localhub_read_token"
USER = "scgpt-tester"
ORGS = ("scgpt-tester", "scgpt-org")

# Files stored through LFS, as in the Hub's default .gitattributes; anything >= 10 MB too.
LFS_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.onnx_data", "*.msgpack", "*.pkl",
    "*.pickle", "*.npy", "*.npz", "*.tar.*", "*.zip", "*.gz", "*.model", "*.ot", "*.parquet", "*.arrow", "*.h5ad",
)
LFS_SIZE = 10 * 1024 * 1024
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob with this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file committed in place of an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs_path(path: str, size: int) -> bool:
    """Whether the Hub would store this file through LFS."""
    name = path.rsplit("/", 1)[-1]
    return size >= LFS_SIZE or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)


@dataclass
class Blob:
    """One file at one commit: regular content, or a reference to an LFS object."""

    size: int
    content: bytes | None = None  # regular files
    lfs_sha256: str | None = None  # LFS files

    @property
    def git_oid(self) -> str:
        if self.lfs_sha256 is not None:
            return git_blob_sha1(lfs_pointer(self.lfs_sha256, self.size))
        return git_blob_sha1(self.content or b"")

    @property
    def preupload_oid(self) -> str:
        """What huggingface_hub compares with its local oid: sha256 for LFS files, git sha1 otherwise."""
        return self.lfs_sha256 if self.lfs_sha256 is not None else self.git_oid


@dataclass
class Commit:
    sha: str
    title: str
    message: str
    parent: str | None
    files: dict[str, Blob]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


class HubError(Exception):
    """An HTTP error answer with the Hub's error headers."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class HubState:
    """Repositories, LFS objects and a log of requests; all methods are thread-safe."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.RLock()

    # --------------------------------------------------------------------------- repos and revisions
    def repo(self, repo_id: str, token: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and token not in (WRITE_TOKEN, READ_TOKEN)):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def resolve(self, repo: Repo, revision: str) -> Commit:
        rev = unquote(revision)
        for prefix, table in (("refs/heads/", repo.branches), ("refs/tags/", repo.tags)):
            if rev.startswith(prefix) and rev[len(prefix):] in table:
                return repo.commits[table[rev[len(prefix):]]]
        if rev in repo.branches:
            return repo.commits[repo.branches[rev]]
        if rev in repo.tags:
            return repo.commits[repo.tags[rev]]
        if _SHA_RE.match(rev) and rev in repo.commits:
            return repo.commits[rev]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def create_repo(self, repo_id: str, private: bool, endpoint: str = "") -> Repo:
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", extra={"url": f"{endpoint}/{repo_id}"})
            repo = Repo(repo_id=repo_id, private=private)
            files = {".gitattributes": Blob(size=len(DEFAULT_GITATTRIBUTES), content=DEFAULT_GITATTRIBUTES)}
            first = self._new_commit(repo, "initial commit", "", None, files)
            repo.branches["main"] = first.sha
            self.repos[repo_id] = repo
            return repo

    def _new_commit(self, repo: Repo, title: str, message: str, parent: str | None, files: dict[str, Blob]) -> Commit:
        sha = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{title}\n{uuid.uuid4()}".encode()).hexdigest()
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        commit = Commit(sha=sha, title=title, message=message, parent=parent, files=files, date=date)
        repo.commits[sha] = commit
        return commit

    def history(self, repo: Repo, commit: Commit) -> list[Commit]:
        out = [commit]
        while out[-1].parent is not None:
            out.append(repo.commits[out[-1].parent])
        return out

    # --------------------------------------------------------------------------- commits
    def commit(self, repo: Repo, branch: str, lines: list[dict]) -> Commit:
        branch = unquote(branch)
        if branch.startswith("refs/heads/"):
            branch = branch[len("refs/heads/"):]
        with self.lock:
            if branch not in repo.branches:
                if branch in repo.tags or (_SHA_RE.match(branch) and branch in repo.commits):
                    raise HubError(400, f"Cannot commit to {branch}: only branches can receive commits")
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if not lines or lines[0].get("key") != "header":
                raise HubError(400, "The first line of a commit payload must be its header")
            header = lines[0]["value"]
            head = repo.commits[repo.branches[branch]]
            parent = header.get("parentCommit")
            if parent is not None and parent != head.sha:
                raise HubError(412, f"A commit has happened since {parent}: the branch head is now {head.sha}")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise HubError(400, f"Invalid path {path!r}")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, "Regular files must be base64-encoded")
                    data = base64.b64decode(value["content"])
                    if is_lfs_path(path, len(data)) and path != ".gitattributes":
                        raise HubError(400, f"{path} must be uploaded through LFS (it matches .gitattributes)")
                    files[path] = Blob(size=len(data), content=data)
                elif key == "lfsFile":
                    oid = value.get("oid", "")
                    obj = self.lfs_objects.get(oid)
                    if obj is None:
                        raise HubError(400, f"LFS object {oid} for {path} was never uploaded")
                    files[path] = Blob(size=len(obj), lfs_sha256=oid)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for name in [f for f in files if f.startswith(prefix)]:
                        del files[name]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            commit = self._new_commit(repo, header.get("summary", ""), header.get("description", ""), head.sha, files)
            repo.branches[branch] = commit.sha
            return commit

    def commit_count(self, repo_id: str, revision: str = "main") -> int:
        """Number of commits in a branch's history (the initial commit included)."""
        repo = self.repos[repo_id]
        return len(self.history(repo, self.resolve(repo, revision)))

    def file_bytes(self, blob: Blob) -> bytes:
        return self.lfs_objects[blob.lfs_sha256] if blob.lfs_sha256 is not None else (blob.content or b"")


# ----------------------------------------------------------------------------------------------------- card YAML


def validate_card_yaml(content: str) -> list[str]:
    """Errors the Hub's metadata validation would report for a README (empty list: valid)."""
    import yaml

    match = re.match(r"^\s*---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
    if match is None:
        return []
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return [f"YAML front matter is not valid YAML: {exc}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["YAML front matter must be a mapping"]
    errors: list[str] = []
    for key in ("tags", "datasets", "language"):
        value = data.get(key)
        strings = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        if value is not None and not strings:
            errors.append(f'"{key}" must be a string or a list of strings')
    for key in ("license", "library_name", "pipeline_tag"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    base = data.get("base_model")
    if base is not None:
        bases = [base] if isinstance(base, str) else base
        ids = isinstance(bases, list) and all(isinstance(b, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", b) for b in bases)
        if not ids:
            errors.append('"base_model" must be a repository id or a list of repository ids')
    index = data.get("model-index")
    if index is not None:
        if not isinstance(index, list) or not index:
            return errors + ['"model-index" must be a non-empty list']
        for i, entry in enumerate(index):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                errors.append(f'"model-index[{i}].name" must be a string')
                continue
            results = entry.get("results")
            if not isinstance(results, list) or not results:
                errors.append(f'"model-index[{i}].results" must be a non-empty list')
                continue
            for j, result in enumerate(results):
                where = f"model-index[{i}].results[{j}]"
                task = result.get("task") if isinstance(result, dict) else None
                if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                    errors.append(f'"{where}.task.type" must be a string')
                dataset = result.get("dataset") if isinstance(result, dict) else None
                if not isinstance(dataset, dict) or not isinstance(dataset.get("type"), str) or not isinstance(
                    dataset.get("name"), str
                ):
                    errors.append(f'"{where}.dataset" must have string "type" and "name"')
                metrics = result.get("metrics") if isinstance(result, dict) else None
                if not isinstance(metrics, list) or not metrics:
                    errors.append(f'"{where}.metrics" must be a non-empty list')
                    continue
                for k, metric in enumerate(metrics):
                    if not isinstance(metric, dict) or not isinstance(metric.get("type"), str):
                        errors.append(f'"{where}.metrics[{k}].type" must be a string')
                    elif "value" not in metric or isinstance(metric["value"], bool) or not isinstance(
                        metric["value"], (int, float, str)
                    ):
                        errors.append(f'"{where}.metrics[{k}].value" must be a number or a string')
    return errors


# ----------------------------------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "LocalHubServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    # ------------------------------------------------------------------ plumbing
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from exc

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, err: HubError, head: bool = False) -> None:
        headers = {"X-Error-Message": " ".join(err.message.split())}  # header values are one line
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers, head=head)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
        if token not in (WRITE_TOKEN, READ_TOKEN):
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _need_write(self, token: str | None, namespace: str | None = None) -> None:
        if token is None:
            raise HubError(401, "You must be authenticated to do this (no token given)")
        if token != WRITE_TOKEN:
            raise HubError(403, "You don't have the rights to write with this token (read-only token)")
        if namespace is not None and namespace not in ORGS:
            raise HubError(403, f"You don't have the rights to create a repository under the namespace {namespace}")

    def _dispatch(self, method: str) -> None:
        head = method == "HEAD"
        try:
            url = urlsplit(self.path)
            with self.state.lock:
                self.state.requests.append((method, url.path))
            token = self._token()
            segments = url.path.split("/")[1:]  # raw (still %-quoted) segments
            query = parse_qs(url.query)
            self._route(method, segments, query, token)
        except HubError as err:
            self._error(err, head=head)
        except (BrokenPipeError, ConnectionResetError):  # pragma: no cover - client went away
            pass
        except Exception as exc:  # pragma: no cover - a server bug: tell the client
            self._error(HubError(500, f"local hub error: {type(exc).__name__}: {exc}"), head=head)

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_HEAD = lambda self: self._dispatch("HEAD")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731
    do_PUT = lambda self: self._dispatch("PUT")  # noqa: E731
    do_DELETE = lambda self: self._dispatch("DELETE")  # noqa: E731

    # ------------------------------------------------------------------ routes
    def _route(self, method: str, seg: list[str], query: dict, token: str | None) -> None:
        s = self.state
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if method == "GET" and rest == ["whoami-v2"]:
                if token is None:
                    raise HubError(401, "Invalid username or password.")
                return self._send_json({"type": "user", "name": USER, "orgs": [{"name": o} for o in ORGS[1:]],
                                        "auth": {"accessToken": {"role": "write" if token == WRITE_TOKEN else "read"}}})
            if method == "POST" and rest == ["repos", "create"]:
                body = self._json_body()
                if body.get("type", "model") != "model":
                    raise HubError(400, "This local hub only hosts model repositories")
                namespace = body.get("organization") or USER
                self._need_write(token, namespace)
                name = body.get("name", "")
                if not re.fullmatch(r"[\w.-]{1,96}", name):
                    raise HubError(400, f"Invalid repository name {name!r}")
                private = bool(body.get("private")) or body.get("visibility") == "private"
                repo = s.create_repo(f"{namespace}/{name}", private, self.server.endpoint)
                return self._send_json({"url": f"{self.server.endpoint}/{repo.repo_id}", "name": repo.repo_id})
            if method == "POST" and rest == ["repos", "delete"]:
                body = self._json_body()
                repo_id = f"{body.get('organization') or USER}/{body.get('name')}"
                self._need_write(token)
                with s.lock:
                    if s.repos.pop(repo_id, None) is None:
                        raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
                return self._send_json({})
            if method == "POST" and rest == ["validate-yaml"]:
                body = self._json_body()
                errors = validate_card_yaml(body.get("content", ""))
                if errors:
                    raise HubError(400, "Invalid metadata in README.md.\n- " + "\n- ".join(errors))
                return self._send_json({"errors": [], "warnings": []})
            if len(rest) >= 3 and rest[0] == "models":
                return self._route_model_api(method, rest[1] + "/" + rest[2], rest[3:], query, token)
            raise HubError(404, f"No such API route: {'/'.join(seg)}")
        if len(seg) >= 2 and seg[0] == "__lfs":
            return self._route_lfs_transfer(method, seg[1:])
        if len(seg) >= 5 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{seg[0]}/{seg[1][:-4]}", token)
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo = s.repo(f"{seg[0]}/{seg[1]}", token)
            return self._resolve(repo, seg[3], unquote("/".join(seg[4:])), head=method == "HEAD")
        raise HubError(404, f"Not found: /{'/'.join(seg)}")

    def _route_model_api(self, method: str, repo_id: str, rest: list[str], query: dict, token: str | None) -> None:
        s = self.state
        repo = s.repo(repo_id, token)
        if method == "GET" and (not rest or rest[0] == "revision"):
            commit = s.resolve(repo, rest[1] if len(rest) > 1 else "main")
            return self._send_json(self._model_info(repo, commit))
        if method == "GET" and rest == ["refs"]:
            def refs(table: dict[str, str], kind: str) -> list[dict]:
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in sorted(table.items())]
            return self._send_json({"branches": refs(repo.branches, "heads"), "tags": refs(repo.tags, "tags"),
                                    "converts": [], "pullRequests": []})
        if method == "GET" and len(rest) == 2 and rest[0] == "commits":
            commit = s.resolve(repo, rest[1])
            return self._send_json([
                {"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                 "authors": [{"user": USER}]} for c in s.history(repo, commit)
            ])
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            commit = s.resolve(repo, rest[1])
            path = unquote("/".join(rest[2:])).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._send_json(self._tree(commit, path, recursive), headers={"X-Repo-Commit": commit.sha})
        if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            commit = s.resolve(repo, rest[1])
            body = self._json_body()
            paths = body.get("paths", [])
            paths = [paths] if isinstance(paths, str) else paths
            entries = []
            for p in paths:
                p = p.strip("/")
                if p in commit.files:
                    entries.append(self._file_entry(p, commit.files[p]))
                elif any(f.startswith(p + "/") for f in commit.files):
                    entries.append({"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest()})
            return self._send_json(entries)
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            self._need_write(token)
            commit = s.resolve(repo, rest[1])
            files = []
            for f in self._json_body().get("files", []):
                existing = commit.files.get(f["path"])
                files.append({
                    "path": f["path"],
                    "uploadMode": "lfs" if is_lfs_path(f["path"], int(f.get("size", 0))) else "regular",
                    "shouldIgnore": False,
                    "oid": existing.preupload_oid if existing is not None else None,
                })
            return self._send_json({"files": files, "commitOid": commit.sha})
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            self._need_write(token)
            if query.get("create_pr"):
                raise HubError(400, "This local hub does not support pull requests")
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            commit = s.commit(repo, rest[1], lines)
            return self._send_json({"commitUrl": f"{self.server.endpoint}/{repo.repo_id}/commit/{commit.sha}",
                                    "commitOid": commit.sha, "pullRequestUrl": None, "success": True})
        if len(rest) == 2 and rest[0] == "branch" and method in ("POST", "DELETE"):
            self._need_write(token)
            name = unquote(rest[1])
            with s.lock:
                if method == "DELETE":
                    if name not in repo.branches:
                        raise HubError(404, f"Branch {name} not found", "RevisionNotFound")
                    if name == "main":
                        raise HubError(403, "The main branch cannot be deleted")
                    del repo.branches[name]
                    return self._send_json({})
                if name in repo.branches:
                    raise HubError(409, f"Branch {name} already exists")
                start = self._json_body().get("startingPoint") or "main"
                repo.branches[name] = s.resolve(repo, start).sha
            return self._send_json({})
        if len(rest) == 2 and rest[0] == "tag" and method in ("POST", "DELETE"):
            self._need_write(token)
            with s.lock:
                if method == "DELETE":
                    name = unquote(rest[1])
                    if repo.tags.pop(name, None) is None:
                        raise HubError(404, f"Tag {name} not found", "RevisionNotFound")
                    return self._send_json({})
                commit = s.resolve(repo, rest[1])
                tag = self._json_body().get("tag", "")
                if not tag:
                    raise HubError(400, "A tag name is required")
                if tag in repo.tags:
                    raise HubError(409, f"Tag {tag} already exists")
                repo.tags[tag] = commit.sha
            return self._send_json({})
        raise HubError(404, f"No such API route for {repo_id}: {'/'.join(rest)}")

    # ------------------------------------------------------------------ views
    def _file_entry(self, path: str, blob: Blob) -> dict:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": blob.size, "oid": blob.git_oid}
        if blob.lfs_sha256 is not None:
            entry["lfs"] = {"oid": blob.lfs_sha256, "size": blob.size,
                            "pointerSize": len(lfs_pointer(blob.lfs_sha256, blob.size))}
        return entry

    def _tree(self, commit: Commit, path: str, recursive: bool) -> list[dict]:
        prefix = path + "/" if path else ""
        if path and path in commit.files:
            raise HubError(400, f"{path} is a file, not a folder")
        names = [f for f in commit.files if f.startswith(prefix)]
        if path and not names:
            raise HubError(404, f"{path} does not exist at {commit.sha}", "EntryNotFound")
        out, folders = [], set()
        for name in sorted(names):
            rel = name[len(prefix):]
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    out.append({"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                out.append(self._file_entry(name, commit.files[name]))
        return out

    def _model_info(self, repo: Repo, commit: Commit) -> dict:
        card_data = None
        readme = commit.files.get("README.md")
        if readme is not None and readme.content:
            import yaml

            m = re.match(r"^\s*---\s*\n(.*?)\n---", readme.content.decode("utf-8", "replace"), re.S)
            if m:
                try:
                    card_data = yaml.safe_load(m.group(1))
                except yaml.YAMLError:
                    card_data = None
        siblings = []
        for name, blob in sorted(commit.files.items()):
            sib: dict[str, Any] = {"rfilename": name, "size": blob.size, "blobId": blob.git_oid}
            if blob.lfs_sha256 is not None:
                sib["lfs"] = {"size": blob.size, "sha256": blob.lfs_sha256,
                              "pointerSize": len(lfs_pointer(blob.lfs_sha256, blob.size))}
            siblings.append(sib)
        info: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": commit.sha, "lastModified": commit.date,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": list((card_data or {}).get("tags") or []), "siblings": siblings,
        }
        if card_data is not None:
            info["cardData"] = card_data
            for key in ("library_name", "pipeline_tag"):
                if key in card_data:
                    info[key] = card_data[key]
        config = commit.files.get("config.json")
        if config is not None and config.content:
            try:
                info["config"] = json.loads(config.content)
            except json.JSONDecodeError:
                pass
        return info

    def _resolve(self, repo: Repo, revision: str, path: str, head: bool) -> None:
        commit = self.state.resolve(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path} at {commit.sha}", "EntryNotFound")
        data = self.state.file_bytes(blob)
        headers = {"ETag": f'"{blob.git_oid}"', "X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if blob.lfs_sha256 is not None:
            headers["X-Linked-Etag"] = f'"{blob.lfs_sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
        status = 200
        rng = self.headers.get("Range")
        if rng and not head:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                if start >= len(data):
                    raise HubError(416, "Requested range not satisfiable")
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start:end + 1], 206
        headers["Content-Length"] = str(len(data))
        self._send(status, data, headers, content_type="application/octet-stream", head=head)

    # ------------------------------------------------------------------ LFS
    def _lfs_batch(self, repo_id: str, token: str | None) -> None:
        s = self.state
        s.repo(repo_id, token)
        self._need_write(token)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only LFS uploads are supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in s.lfs_objects:
                base = f"{self.server.endpoint}/__lfs/{oid}/{size}"
                entry["actions"] = {"upload": {"href": base, "header": {}},
                                    "verify": {"href": f"{self.server.endpoint}/__lfs/verify", "header": {}}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _route_lfs_transfer(self, method: str, rest: list[str]) -> None:
        s = self.state
        if method == "PUT" and len(rest) == 2:
            oid, size = rest[0], int(rest[1])
            data = self._body()
            if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
                raise HubError(400, f"Uploaded content does not match LFS object {oid} ({size} bytes)")
            with s.lock:
                s.lfs_objects[oid] = data
            return self._send(200, b"", content_type="text/plain")
        if method == "POST" and rest == ["verify"]:
            body = self._json_body()
            obj = s.lfs_objects.get(body.get("oid", ""))
            if obj is None or len(obj) != int(body.get("size", -1)):
                raise HubError(404, f"LFS object {body.get('oid')} not found", "EntryNotFound")
            return self._send_json({})
        raise HubError(404, "Unknown LFS transfer route")


class LocalHubServer(ThreadingHTTPServer):
    """The HTTP server; ``state`` holds the repositories."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _Handler)
        self.state = HubState()
        self.endpoint = f"http://{host}:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "LocalHubServer":
        self._thread = threading.Thread(target=self.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


_SESSION: LocalHubServer | None = None


def start_session_hub(home: str | os.PathLike | None = None) -> LocalHubServer:
    """Start (once per process) the local Hub and point huggingface_hub at it through the environment.

    Sets HF_ENDPOINT, HF_HOME (a fresh folder), HF_HUB_DISABLE_XET=1, HF_HUB_OFFLINE=0 (and quiets telemetry,
    progress bars and implicit tokens). Call it before huggingface_hub is imported; if it already was,
    its import-time settings are re-pointed with a warning (see :func:`_retarget_imported_clients`).
    """
    global _SESSION
    if _SESSION is not None:
        return _SESSION
    server = LocalHubServer().start()
    if home is None:
        home = Path(tempfile.mkdtemp(prefix="scgpt-hf-hub-home-"))
        atexit.register(shutil.rmtree, home, ignore_errors=True)
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": server.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "HF_HUB_ETAG_TIMEOUT": "30",
        "HF_HUB_DOWNLOAD_TIMEOUT": "60",
    }
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_MODULES_CACHE",
                "TRANSFORMERS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH"):
        os.environ.pop(var, None)
    os.environ.update(env)
    if "huggingface_hub" in sys.modules:
        _retarget_imported_clients(server.endpoint, home)
    _SESSION = server
    return server


def _retarget_imported_clients(endpoint: str, home: Path) -> None:
    """Fallback when huggingface_hub was imported before :func:`start_session_hub`: re-point what it read."""
    import warnings

    from huggingface_hub import constants

    if constants.ENDPOINT == endpoint and constants.HF_HOME == str(home):
        return
    warnings.warn(
        "huggingface_hub was imported before the local Hub was configured; re-pointing its import-time settings. "
        "Call tests/hub_server.start_session_hub() from conftest.py before anything imports huggingface_hub.",
        stacklevel=3,
    )
    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HOME = str(home)
    constants.HF_HUB_CACHE = str(home / "hub")
    constants.HUGGINGFACE_HUB_CACHE = constants.HF_HUB_CACHE
    constants.HF_ASSETS_CACHE = str(home / "assets")
    constants.HF_TOKEN_PATH = str(home / "token")
    constants.HF_STORED_TOKENS_PATH = str(home / "stored_tokens")
    constants.HF_XET_CACHE = str(home / "xet")
    constants.HF_HUB_OFFLINE = False
    constants.HF_HUB_DISABLE_XET = True
    constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True
    import huggingface_hub.hf_api as hf_api_module

    hf_api_module.api.endpoint = endpoint
    tf_hub = sys.modules.get("transformers.utils.hub")
    if tf_hub is not None:
        tf_hub._hf_api = None
        tf_hub.HF_MODULES_CACHE = str(home / "modules")
    dyn = sys.modules.get("transformers.dynamic_module_utils")
    if dyn is not None:
        dyn.HF_MODULES_CACHE = str(home / "modules")


def snapshot(state: HubState) -> dict[str, Any]:
    """A JSON-able summary of the hub's repositories, for debugging failed tests."""
    with state.lock:
        return {
            rid: {"private": r.private, "branches": dict(r.branches), "tags": dict(r.tags),
                  "files": sorted(r.commits[r.branches["main"]].files)}
            for rid, r in copy.copy(state.repos).items()
        }


__all__ = ["LocalHubServer", "HubState", "READ_TOKEN", "WRITE_TOKEN", "start_session_hub", "validate_card_yaml",
           "git_blob_sha1"]
