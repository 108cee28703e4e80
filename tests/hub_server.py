"""A small local Hugging Face Hub for tests: the part of the Hub HTTP API that the real huggingface_hub client uses
to create a model repo, upload a folder and download it again.

Implemented (model repos only; repo ids ``namespace/name``, a repo created without a namespace goes to ``USER``):

- ``POST /api/repos/create`` (409 when the repo exists) and ``GET /api/whoami-v2``;
- ``POST /api/models/{repo}/preupload/{rev}``: every file is ``"regular"``, so the client sends its content inline
  (base64) in the commit; ``oid`` is the git blob id of the file already there, so unchanged files are skipped;
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON payload (``header``, ``file``, ``deletedFile``,
  ``deletedFolder``; ``lfsFile`` is refused, this server never asks for LFS), ``parentCommit`` checked;
- ``POST /api/models/{repo}/branch/{branch}``;
- ``POST /api/validate-yaml`` (the client sends a README's metadata before uploading it): the front matter must be
  a YAML mapping, ``tags`` a list of strings and ``model-index`` well formed (task, dataset, metrics with values);
- ``GET /api/models/{repo}[/revision/{rev}]`` (``sha``, ``siblings``, ``private``) and
  ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``recursive``);
- ``GET``/``HEAD /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (git blob id) and
  ``Content-Length``.

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) as the Hub does, so the
client raises its usual exceptions. Writes need an ``Authorization: Bearer`` header (any token). Every request is
recorded in ``requests`` (method, path) for tests that must see none.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import yaml
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "test-user"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> files at that commit
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    messages: dict[str, str] = field(default_factory=dict)  # commit sha -> summary

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> str:
        parent = self.branches.get(branch, "")
        h = hashlib.sha1(f"{self.repo_id}\0{parent}\0{message}\0{len(self.commits)}".encode())
        for path in sorted(files):
            h.update(f"{path}\0{git_blob_id(files[path])}\0".encode())
        sha = h.hexdigest()
        self.commits[sha], self.branches[branch], self.messages[sha] = dict(files), sha, message
        return sha


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, json_body: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.json_body = json_body or {"error": message}


class LocalHub:
    """``with LocalHub() as hub:`` serves on ``hub.url`` (127.0.0.1, a free port) from a background thread."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.tokens: set[str] = set()
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="local-hub", daemon=True)

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    # ------------------------------------------------------------------ API
    def _repo(self, repo_id: str, token: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and token is None):
            raise HubError(404, f"Repository Not Found for url: {repo_id}", "RepoNotFound")
        return repo

    @staticmethod
    def _commit_sha(repo: Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def create_repo(self, body: dict, token: str | None) -> dict:
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if body.get("type", "model") != "model":
            raise HubError(400, f"this test hub only hosts model repos, not {body.get('type')!r}")
        name = body.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise HubError(400, f"invalid repo name {name!r}")
        repo_id = f"{body.get('organization') or USER}/{name}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", json_body={  # the client reads "url"
                "error": "You already created this model repo", "url": url})
        private = body.get("visibility") == "private" or body.get("private") is True
        repo = self.repos[repo_id] = Repo(repo_id, private)
        repo.commit("main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        return {"url": url, "name": repo_id, "id": repo_id}

    def repo_info(self, repo_id: str, revision: str, token: str | None) -> dict:
        repo = self._repo(repo_id, token)
        sha = self._commit_sha(repo, revision)
        return {"id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                "private": repo.private, "disabled": False, "gated": False, "tags": [],
                "lastModified": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]}

    def preupload(self, repo_id: str, revision: str, body: dict, token: str | None) -> dict:
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        repo = self._repo(repo_id, token)
        current = repo.commits[self._commit_sha(repo, revision)]
        files = body.get("files")
        if not isinstance(files, list):
            raise HubError(400, "preupload: 'files' must be a list")
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                           "oid": git_blob_id(current[f["path"]]) if f["path"] in current else None}
                          for f in files], "commitOid": repo.branches.get(revision)}

    def create_commit(self, repo_id: str, revision: str, payload: bytes, query: dict, token: str | None) -> dict:
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by this test hub")
        repo = self._repo(repo_id, token)
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        lines = [json.loads(line) for line in payload.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit: the first NDJSON line must be the header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and not repo.branches[revision].startswith(parent):
            raise HubError(412, f"parentCommit {parent} is not the head of {revision}")
        files = dict(repo.commits[repo.branches[revision]])
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"commit: unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            elif key == "lfsFile":
                raise HubError(422, f"commit: LFS file {value.get('path')!r}: this test hub takes regular files only")
            else:
                raise HubError(400, f"commit: unknown operation {key!r}")
        sha = repo.commit(revision, files, header.get("summary", ""))
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True,
                "pullRequestUrl": None}

    @staticmethod
    def validate_yaml(body: dict) -> dict:
        content = body.get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        errors = []
        meta = yaml.safe_load(match.group(1)) if match else None
        if not isinstance(meta, dict):
            errors.append("metadata: the README has no YAML front matter mapping")
        else:
            tags = meta.get("tags", [])
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                errors.append(f"tags: must be a list of strings, got {tags!r}")
            for entry in meta.get("model-index", []) or []:
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    errors.append(f"model-index: every entry needs a name, got {entry!r}")
                    continue
                for result in entry.get("results", []):
                    ok = (isinstance(result.get("task"), dict) and "type" in result["task"]
                          and isinstance(result.get("dataset"), dict)
                          and {"type", "name"} <= set(result["dataset"])
                          and isinstance(result.get("metrics"), list) and result["metrics"]
                          and all(isinstance(m, dict) and {"type", "value"} <= set(m) for m in result["metrics"]))
                    if not ok:
                        errors.append(f"model-index: malformed result {result!r}")
        if errors:
            raise HubError(400, "; ".join(errors), json_body={"errors": [{"message": e} for e in errors]})
        return {"errors": [], "warnings": []}

    def create_branch(self, repo_id: str, branch: str, body: dict, token: str | None) -> dict:
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        repo = self._repo(repo_id, token)
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = self._commit_sha(repo, body.get("startingPoint") or "main")
        return {}

    def tree(self, repo_id: str, revision: str, path: str, query: dict, token: str | None) -> list[dict]:
        repo = self._repo(repo_id, token)
        files = repo.commits[self._commit_sha(repo, revision)]
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries: dict[str, dict] = {}
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folder = prefix + "/".join(parts[:depth])
                    entries.setdefault(folder, {"type": "directory", "oid": git_blob_id(folder.encode()),
                                                "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entries[p] = {"type": "file", "oid": git_blob_id(files[p]), "size": len(files[p]), "path": p}
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound")
        return list(entries.values())

    def resolve(self, repo_id: str, revision: str, path: str, token: str | None) -> tuple[bytes, dict]:
        repo = self._repo(repo_id, token)
        sha = self._commit_sha(repo, revision)
        if path not in repo.commits[sha]:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        data = repo.commits[sha][path]
        return data, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_id(data)}"',
                      "Content-Type": "application/octet-stream"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: LocalHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes, headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _handle(self, method: str) -> None:
        hub = self.server_hub
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        with hub.lock:
            hub.requests.append((method, path))
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") and len(auth) > len("Bearer ") else None
        body = self._body() if method == "POST" else b""
        try:
            with hub.lock:
                if token:
                    hub.tokens.add(token)
                self._route(hub, method, path, query, body, token)
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, json.dumps(err.json_body).encode(),
                       {"Content-Type": "application/json", **headers}, head=method == "HEAD")

    def _route(self, hub: LocalHub, method: str, path: str, query: dict, body: bytes, token: str | None) -> None:
        def match(pattern: str):
            m = re.fullmatch(pattern, path)
            return {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()} if m else None

        if method == "POST" and path == "/api/repos/create":
            return self._json(200, hub.create_repo(json.loads(body or b"{}"), token))
        if method == "POST" and path == "/api/validate-yaml":
            return self._json(200, hub.validate_yaml(json.loads(body or b"{}")))
        if method == "GET" and path == "/api/whoami-v2":
            if token is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return self._json(200, {"type": "user", "name": USER, "orgs": [],
                                    "auth": {"accessToken": {"role": "write"}}})
        if method == "POST" and (m := match(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)")):
            return self._json(200, hub.preupload(m["repo"], m["rev"], json.loads(body or b"{}"), token))
        if method == "POST" and (m := match(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)")):
            return self._json(200, hub.create_commit(m["repo"], m["rev"], body, query, token))
        if method == "POST" and (m := match(rf"/api/models/{REPO}/branch/(?P<rev>[^/]+)")):
            return self._json(200, hub.create_branch(m["repo"], m["rev"], json.loads(body or b"{}"), token))
        if method == "GET" and (m := match(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?")):
            return self._json(200, hub.repo_info(m["repo"], m["rev"] or "main", token))
        if method == "GET" and (m := match(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")):
            return self._json(200, hub.tree(m["repo"], m["rev"], m["path"] or "", query, token))
        if method in ("GET", "HEAD") and (m := match(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")):
            data, headers = hub.resolve(m["repo"], m["rev"], m["path"], token)
            return self._send(200, data, headers, head=method == "HEAD")
        raise HubError(404, f"{method} {path}: not implemented by the test hub")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")
