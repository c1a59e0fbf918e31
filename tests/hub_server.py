"""A local, Hub-compatible HTTP server on 127.0.0.1 for the tests.

It answers the endpoints huggingface_hub calls for model info, tree listings and file downloads,
with the headers the client reads (X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size) and the
X-Error-Code values it turns into typed exceptions. Test-only: moeprep itself speaks to the Hub
through huggingface_hub alone.

Branches work as on the Hub: `create_branch` (POST .../branch/NAME, 409 when it exists), commits to a
branch, every revision (`main`, a branch, any commit sha ever made) resolving in info, tree,
paths-info and resolve, and `CommitOperationCopy`'s `lfsFile` lines, which name an LFS object by
sha256 alone: a commit may reference any object the repo's LFS store holds, from any branch, with
no bytes sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

GRANTED_TOKEN = "hf_test_granted_0123456789"  # reads gated repos, writes nowhere
WRITE_TOKEN = "hf_test_write_9876543210"  # writes to the namespaces in HubServer.writable
LFS = re.compile(r"\.(safetensors|model|gguf|bin|png)$")


@dataclass
class Repo:
    files: dict[str, bytes]  # main's files
    commit: str = ""  # main's head
    gated: bool = False
    advertised_sha256: dict[str, str] = field(default_factory=dict)  # lies, for integrity tests
    branches: dict[str, str] = field(default_factory=dict)  # branch other than main -> its head commit
    history: dict[str, dict[str, bytes]] = field(default_factory=dict)  # every commit sha -> its files

    def __post_init__(self):
        if not self.commit:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + hashlib.sha256(self.files[name]).digest())
            self.commit = digest.hexdigest()

    def resolve(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit, files) of a branch or commit sha; main's files are `self.files`, which tests may edit."""
        if rev in ("main", self.commit):
            return self.commit, self.files
        if rev in self.branches:
            rev = self.branches[rev]
        return (rev, self.history[rev]) if rev in self.history else None

    def at(self, rev: str) -> Repo:
        """A view of the repo at `rev`, for the per-file helpers below."""
        commit, files = self.resolve(rev)
        return Repo(files, commit=commit, advertised_sha256=self.advertised_sha256)

    def branch_files(self, rev: str) -> dict[str, bytes]:
        return self.resolve(rev)[1]

    def sha256(self, path: str) -> str:
        return self.advertised_sha256.get(path) or hashlib.sha256(self.files[path]).hexdigest()

    def blob_id(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def sibling(self, path: str) -> dict:
        entry = {"rfilename": path, "size": len(self.files[path]), "blobId": self.blob_id(path)}
        if LFS.search(path):
            entry["lfs"] = {"sha256": self.sha256(path), "size": len(self.files[path]), "pointerSize": 134}
        return entry

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": len(self.files[path]), "oid": self.blob_id(path)}
        if LFS.search(path):
            entry["lfs"] = {"oid": self.sha256(path), "size": len(self.files[path]), "pointerSize": 134}
        return entry


def repo_from_folder(folder: Path, **kwargs) -> Repo:
    return Repo({p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}, **kwargs)


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.writable = {"me", "some-org"}
        self.lfs: dict[str, dict[str, bytes]] = {}  # uploaded LFS objects: repo id -> sha256 -> bytes
        self.puts_left: int | None = None  # when set, LFS uploads past this many drop the connection
        self.commits: list[tuple[str, str, str, list[str]]] = []  # (repo, branch, commit, the NDJSON line keys)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever, so only after start()
            self.httpd.shutdown()
        self.httpd.server_close()


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, data, headers: dict | None = None, head: bool = False):
            body = json.dumps(data).encode()
            self._send(status, body, {"Content-Type": "application/json", **(headers or {})}, head)

        def _error(self, status: int, code: str, message: str, head: bool = False):
            self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            return auth.removeprefix("Bearer ").strip() or None

        def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository not found: {repo_id}", head)
            return repo

        def _revision_ok(self, repo: Repo, rev: str, head: bool = False) -> bool:
            if repo.resolve(rev) is not None:
                return True
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            return False

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _can_write(self, repo_id: str) -> bool:
            if self._token() is None:
                self._error(401, "Unauthorized", "Invalid username or password.")
                return False
            if self._token() != WRITE_TOKEN or repo_id.split("/")[0] not in hub.writable:
                self._error(403, "Forbidden", f"You don't have the rights to write to {repo_id}")
                return False
            return True

        def do_POST(self):
            path = unquote(urlparse(self.path).path)
            hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
            body = self._body()
            if path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create":
                data = json.loads(body)
                repo_id = f"{data.get('organization') or 'me'}/{data['name']}"
                if not self._can_write(repo_id):
                    return
                if repo_id in hub.repos:  # the Hub names the existing repo in its 409 answer
                    return self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                hub.repos[repo_id] = Repo({}, commit=hashlib.sha1(repo_id.encode()).hexdigest())
                return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", path):
                repo = self._repo(m.group(1))
                if not repo or not self._can_write(m.group(1)):
                    return
                start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
                with hub.lock:
                    if m.group(2) == "main" or m.group(2) in repo.branches:
                        return self._error(409, "Conflict", f"Reference already exists: refs/heads/{m.group(2)}")
                    if not self._revision_ok(repo, start):
                        return
                    commit, files = repo.resolve(start)
                    repo.history.setdefault(commit, dict(files))
                    repo.branches[m.group(2)] = commit
                return self._json(200, {})
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/([^/]+)", path):
                repo = self._repo(m.group(1))
                if not repo or not self._revision_ok(repo, m.group(2)):
                    return
                form = parse_qs(body.decode())
                view = repo.at(m.group(2))
                return self._json(200, [view.tree_entry(p) for p in form.get("paths", []) if p in view.files])
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
                repo = self._repo(m.group(1))
                if not repo or not self._can_write(m.group(1)) or not self._revision_ok(repo, m.group(2)):
                    return
                files = json.loads(body)["files"]
                return self._json(200, {"files": [
                    {"path": f["path"], "uploadMode": "lfs" if LFS.search(f["path"]) else "regular", "shouldIgnore": False}
                    for f in files]})
            if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                if not self._repo(m.group(1)) or not self._can_write(m.group(1)):
                    return
                objects = []
                store = hub.lfs.setdefault(m.group(1), {})
                for o in json.loads(body)["objects"]:
                    entry = {"oid": o["oid"], "size": o["size"]}
                    if o["oid"] not in store:
                        href = f"{hub.url}/lfs-upload/{m.group(1)}/{o['oid']}"
                        entry["actions"] = {"upload": {"href": href, "header": {}}}
                    objects.append(entry)
                return self._json(200, {"transfer": "basic", "objects": objects})
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
                repo = self._repo(m.group(1))
                if not repo or not self._can_write(m.group(1)):
                    return
                branch = m.group(2)
                if branch != "main" and branch not in repo.branches:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
                with hub.lock:  # commits to one branch apply one after another on its current head, as on the Hub
                    parent, old = repo.resolve(branch)
                    files = dict(old)
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "lfsFile":
                            oid = item["value"]["oid"]
                            store = hub.lfs.get(m.group(1), {})
                            if oid not in store:
                                return self._error(422, "BadRequest", f"LFS object {oid} was never uploaded")
                            files[item["value"]["path"]] = store[oid]
                        elif item["key"] == "deletedFile":
                            files.pop(item["value"]["path"], None)
                    commit = hashlib.sha1(parent.encode() + body).hexdigest()
                    repo.history[commit] = files
                    if branch == "main":
                        if repo.history.get(parent) is repo.files:  # the old head keeps its own files
                            repo.history[parent] = dict(repo.files)
                        repo.files.clear()
                        repo.files.update(files)
                        repo.history[commit] = repo.files
                        repo.commit = commit
                    else:
                        repo.branches[branch] = commit
                    hub.commits.append((m.group(1), branch, commit, [json.loads(x)["key"] for x in body.splitlines()]))
                return self._json(200, {"commitUrl": f"{hub.url}/{m.group(1)}/commit/{commit}",
                                        "commitOid": commit, "pullRequestUrl": None})
            self._error(404, "EntryNotFound", f"no route for POST {path}")

        def do_PUT(self):
            path = unquote(urlparse(self.path).path)
            hub.requests.append(("PUT", self.path, self.headers.get("Authorization")))
            if hub.puts_left is not None:
                if hub.puts_left <= 0:  # the network fails mid-upload: the connection just drops
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                hub.puts_left -= 1
            body = self._body()
            if m := re.fullmatch(r"/lfs-upload/([^/]+/[^/]+)/([0-9a-f]{64})", path):
                if hashlib.sha256(body).hexdigest() != m.group(2):
                    return self._error(400, "BadRequest", "sha256 mismatch")
                hub.lfs.setdefault(m.group(1), {})[m.group(2)] = body
                return self._send(200)
            self._error(404, "EntryNotFound", f"no route for PUT {path}")

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        def _route(self, head: bool):
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.requests.append((self.command, self.path, self.headers.get("Authorization")))
            if path == "/api/whoami-v2":
                if self._token() in (GRANTED_TOKEN, WRITE_TOKEN):
                    return self._json(200, {"type": "user", "name": "tester", "auth": {}}, head=head)
                return self._error(401, "Unauthorized", "Invalid credentials", head)
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                repo = self._repo(m.group(1), head)
                if repo and self._revision_ok(repo, m.group(2) or "main", head):
                    repo = repo.at(m.group(2) or "main") if m.group(2) else repo
                    return self._json(200, {
                        "_id": repo.commit[:24], "id": m.group(1), "modelId": m.group(1), "sha": repo.commit,
                        "private": False, "disabled": False, "gated": "manual" if repo.gated else False,
                        "siblings": [repo.sibling(p) for p in sorted(repo.files)],
                    }, head=head)
                return
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)/?(.*)", path):
                repo = self._repo(m.group(1), head)
                if repo and self._revision_ok(repo, m.group(2), head):
                    view = repo.at(m.group(2))
                    prefix = m.group(3).strip("/")
                    return self._json(200, [view.tree_entry(p) for p in sorted(view.files)
                                            if not prefix or p.startswith(prefix + "/")], head=head)
                return
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                repo = self._repo(m.group(1), head)
                if not repo or not self._revision_ok(repo, m.group(2), head):
                    return
                gated, repo = repo.gated, repo.at(m.group(2))
                if gated and self._token() != GRANTED_TOKEN:
                    return self._error(401 if not self._token() else 403, "GatedRepo",
                                       f"Access to model {m.group(1)} is restricted.", head)
                name = m.group(3)
                if name not in repo.files:
                    return self._error(404, "EntryNotFound", f"{name} does not exist", head)
                data = repo.files[name]
                headers = {"X-Repo-Commit": repo.commit, "Content-Type": "application/octet-stream"}
                if LFS.search(name):
                    headers |= {"ETag": f'"{repo.sha256(name)}"', "X-Linked-Etag": f'"{repo.sha256(name)}"',
                                "X-Linked-Size": str(len(data))}
                else:
                    headers["ETag"] = f'"{repo.blob_id(name)}"'
                if rng := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                    start = int(rng.group(1))
                    end = int(rng.group(2)) if rng.group(2) else len(data) - 1
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                    return self._send(206, data[start:end + 1], headers, head)
                return self._send(200, data, headers, head)
            self._error(404, "EntryNotFound", f"no route for {path}", head)

    return Handler
