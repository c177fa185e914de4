"""A Hub-protocol server for tests: the real huggingface_hub client talks to it over a socket.

It speaks what the client sends (huggingface_hub 2.x: hf_api.py, _commit_api.py, lfs.py,
file_download.py): repo create and info, branch create and delete, tree and paths-info, preupload,
validate-yaml, the LFS batch API with basic and multipart uploads and verify, the NDJSON commit (to a
branch, or a pull request on refs/pr/N; an LFS file may be one the repo already stores, as a copy from
another branch commits it), and resolve for downloads (ETag, X-Repo-Commit, X-Linked-Size, a redirect to a second
"storage" origin, Range). Tokens are checked (401 without one, 403 on another namespace), errors carry
X-Error-Code, and faults can be injected: a status (429 with Retry-After, 500, ...), a dropped
connection, or a body cut short. Every request is recorded for the tests to assert on.

As on the Hub, LFS objects are stored per repo, by sha256: the batch answer for an object the repo already
holds (on any branch) has no upload action, so the client sends nothing. `received` counts the bytes each
object's uploads carried, so a test can assert that a file's bytes reached the Hub once.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".model", ".pt")
REGULAR_MAX = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @functools.cached_property
    def sha1(self) -> str:  # a blob's bytes never change: hashed once, not on every listing
        return git_blob_sha1(self.data)

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def entry(self, path: str) -> dict:
        out = {"type": "file", "path": path, "size": len(self.data), "oid": self.sha1}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return out


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, Blob]
    parent: str | None
    description: str = ""


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1" -> commit oid
    lfs_oids: set[str] = field(default_factory=set)  # the LFS objects the repo stores (uploaded to any branch)


@dataclass
class Fault:
    method: str
    path: str  # a regex searched in the request path
    action: str | int  # an HTTP status, "drop" (close the socket), "truncate" (half the body) or "sleep"
    times: int = 1
    headers: dict = field(default_factory=dict)
    seconds: float = 0.0  # for "sleep": how long to wait before answering normally


@dataclass
class Request:
    method: str
    path: str
    query: dict
    authorized: bool
    body_bytes: int
    range: str | None = None
    status: int = 0

    @property
    def writes(self) -> bool:
        return self.method in ("POST", "PUT", "DELETE") and not any(
            p in self.path for p in ("/paths-info/", "/api/validate-yaml"))


class HubState:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # the storage behind every repo, by sha256
        self.received: dict[str, int] = {}  # sha256 -> bytes its uploads (whole or in parts) carried
        self.parts: dict[str, dict[int, bytes]] = {}
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.lock = threading.RLock()
        self.multipart_threshold = 1 << 62
        self.chunk_size = 1 << 20
        self.hub_url = self.storage_url = ""

    def new_commit(self, repo: Repo, message: str, files: dict[str, Blob], parent: str | None,
                   description: str = "") -> Commit:
        oid = hashlib.sha1(f"{repo.repo_id}{message}{time.time_ns()}{len(repo.commits)}".encode()).hexdigest()
        commit = Commit(oid, message, files, parent, description)
        repo.commits[oid] = commit
        return commit

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        first = self.new_commit(repo, "initial commit",
                                {".gitattributes": Blob(b"*.gguf filter=lfs diff=lfs merge=lfs -text\n", False)}, None)
        repo.refs["main"] = first.oid
        self.repos[repo_id] = repo
        return repo

    def add_files(self, repo_id: str, files: dict[str, bytes], message: str = "upload", ref: str = "main") -> str:
        """Seed a repo's branch directly (for fetch tests, or a hostile staging branch); returns the new commit oid."""
        repo = self.repos.get(repo_id) or self.create_repo(repo_id)
        head = repo.commits[repo.refs.get(ref) or repo.refs["main"]]
        tree = dict(head.files)
        for path, data in files.items():
            lfs = path.endswith(LFS_SUFFIXES) or len(data) > REGULAR_MAX
            tree[path] = Blob(data, lfs)
            if lfs:
                self.lfs[hashlib.sha256(data).hexdigest()] = data
                repo.lfs_oids.add(hashlib.sha256(data).hexdigest())
        commit = self.new_commit(repo, message, tree, head.oid)
        repo.refs[ref] = commit.oid
        return commit.oid

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {p: b.data for p, b in repo.commits[repo.refs[revision]].files.items()}

    def commits_on(self, repo_id: str, ref: str = "main") -> list[Commit]:
        repo = self.repos[repo_id]
        out, oid = [], repo.refs.get(ref)
        while oid:
            out.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return out

    @property
    def lfs_bytes_received(self) -> int:
        return sum(self.received.values())

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and re.search(fault.path, path):
                    fault.times -= 1
                    return fault
        return None


def _tree(commit: Commit, prefix: str, recursive: bool) -> list[dict]:
    """The Hub's tree listing: the files under `prefix` and their folders (type "directory"), every level deep
    with recursive=true, else only the first."""
    entries, folders = [], set()
    for path, blob in sorted(commit.files.items()):
        if prefix and not path.startswith(prefix + "/"):
            continue
        rest = path[len(prefix) + 1:] if prefix else path
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            folders.add("/".join(([prefix] if prefix else []) + parts[:depth]))
        if recursive or len(parts) == 1:
            entries.append(blob.entry(path))
    depth0 = prefix.count("/") + 1 if prefix else 0
    for folder in sorted(folders):
        if recursive or folder.count("/") == depth0:
            entries.append({"type": "directory", "path": folder, "size": 0,
                            "oid": hashlib.sha1(folder.encode()).hexdigest()})
    return entries


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
REV = r"(?P<rev>[^/]+)"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState

    def log_message(self, *args) -> None:  # quiet
        pass

    # ------------------------------------------------------------ plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
              truncate: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body[: len(body) // 2] if truncate else body)
        if truncate:
            self.wfile.flush()
            self.close_connection = True
        self.record.status = status

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, exc: HubError) -> None:
        headers = {"X-Error-Message": exc.message}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        self._json(exc.status, {"error": exc.message}, headers)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token is None:
            return None
        user = self.state.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _writer(self, repo_id: str) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write")
        if repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return user

    def _repo(self, repo_id: str) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and self._user() != repo_id.split("/")[0]):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        rev = unquote(rev)
        oid = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[oid]

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.record = Request(method, path, query, "Authorization" in self.headers, 0, self.headers.get("Range"))
        self.state.requests.append(self.record)
        body = self._body() if method in ("POST", "PUT") else b""
        self.record.body_bytes = len(body)
        fault = self.state.take_fault(method, path)
        if fault is not None and isinstance(fault.action, int):
            self._json(fault.action, {"error": "injected"}, fault.headers)
            return
        if fault is not None and fault.action == "sleep":
            time.sleep(fault.seconds)
            fault = None
        if fault is not None and fault.action == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            self.record.status = -1
            return
        try:
            with self.state.lock:
                self._route(method, parts.path, path, query, body, truncate=fault is not None)
        except HubError as exc:
            self._error(exc)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ------------------------------------------------------------ routes

    def _route(self, method: str, raw_path: str, path: str, query: dict, body: bytes, truncate: bool) -> None:
        s = self.state
        path = raw_path  # revisions such as refs%2Fpr%2F1 stay one segment; _commit unquotes them
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if method == "GET" and path == "/api/whoami-v2":  # who the token is: a user who writes to its own namespace
            user = self._user()
            if user is None:
                raise HubError(401, "You must be authenticated")
            return self._json(200, {"type": "user", "name": user, "orgs": [],
                                    "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        m = re.fullmatch(rf"/api/models/{REPO}(?:/revision/{REV})?", path)
        if method == "GET" and m:
            repo = self._repo(m["repo"])
            commit = self._commit(repo, m["rev"] or "main")
            return self._json(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid,
                                    "private": repo.private,
                                    "siblings": [{"rfilename": p} for p in sorted(commit.files)]})
        m = re.fullmatch(rf"/api/models/{REPO}/refs", path)
        if method == "GET" and m:  # llama.cpp's -hf asks for the branches first
            repo = self._repo(m["repo"])
            return self._json(200, {"branches": [{"name": ref, "ref": f"refs/heads/{ref}", "targetCommit": oid}
                                                 for ref, oid in repo.refs.items() if not ref.startswith("refs/")],
                                    "tags": [], "converts": []})
        m = re.fullmatch(rf"/api/models/{REPO}/branch/{REV}", path)
        if method in ("POST", "DELETE") and m:
            return self._branch(method, m["repo"], unquote(m["rev"]), json.loads(body or b"{}"))
        m = re.fullmatch(rf"/api/models/{REPO}/tree/{REV}(?:/(?P<sub>.*))?", path)
        if method == "GET" and m:
            commit = self._commit(self._repo(m["repo"]), m["rev"])
            prefix = unquote(m["sub"] or "").strip("/")
            return self._json(200, _tree(commit, prefix, query.get("recursive") == ["true"]))
        m = re.fullmatch(rf"/api/models/{REPO}/paths-info/{REV}", path)
        if method == "POST" and m:
            commit = self._commit(self._repo(m["repo"]), m["rev"])
            wanted = parse_qs(body.decode()).get("paths", [])
            return self._json(200, [commit.files[p].entry(p) for p in wanted if p in commit.files])
        m = re.fullmatch(rf"/api/models/{REPO}/preupload/{REV}", path)
        if method == "POST" and m:
            self._writer(m["repo"])
            commit = self._commit(self._repo(m["repo"]), "main" if query.get("create_pr") else m["rev"])
            out = []
            for f in json.loads(body)["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > REGULAR_MAX or b"\0" in sample
                existing = commit.files.get(f["path"])
                oid = None
                if existing is not None:
                    oid = existing.sha256 if existing.lfs else existing.sha1
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
            return self._json(200, {"files": out})
        m = re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/batch", path)
        if method == "POST" and m:
            self._writer(m["repo"])
            repo = self._repo(m["repo"])
            payload = json.loads(body)
            if payload.get("ref"):
                self._commit(repo, payload["ref"]["name"])  # the branch uploaded to must exist
            return self._json(200, {"transfer": "basic",
                                    "objects": [self._batch_object(repo, o) for o in payload["objects"]]})
        m = re.fullmatch(r"/lfs-upload/(?P<repo>[\w.\-]+/[\w.\-]+)/(?P<oid>[0-9a-f]{64})", path)
        if method == "PUT" and m:
            s.received[m["oid"]] = s.received.get(m["oid"], 0) + len(body)
            return self._store(m["repo"], m["oid"], body)
        m = re.fullmatch(r"/lfs-part/(?P<oid>[0-9a-f]{64})/(?P<n>\d+)", path)
        if method == "PUT" and m:
            s.received[m["oid"]] = s.received.get(m["oid"], 0) + len(body)
            s.parts.setdefault(m["oid"], {})[int(m["n"])] = body
            return self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        m = re.fullmatch(r"/lfs-complete/(?P<repo>[\w.\-]+/[\w.\-]+)/(?P<oid>[0-9a-f]{64})", path)
        if method == "POST" and m:
            parts = s.parts.pop(m["oid"], {})
            order = [p["partNumber"] for p in json.loads(body)["parts"]]
            return self._store(m["repo"], m["oid"], b"".join(parts[n] for n in order))
        m = re.fullmatch(r"/lfs-verify/(?P<repo>[\w.\-]+/[\w.\-]+)/(?P<oid>[0-9a-f]{64})", path)
        if method == "POST" and m:
            if m["oid"] not in s.repos[m["repo"]].lfs_oids:
                raise HubError(404, "object not found")
            return self._json(200, {})
        m = re.fullmatch(rf"/api/models/{REPO}/commit/{REV}", path)
        if method == "POST" and m:
            return self._commit_request(m["repo"], unquote(m["rev"]), query, body)
        m = re.fullmatch(rf"/{REPO}/resolve/{REV}/(?P<file>.+)", raw_path)
        if method in ("GET", "HEAD") and m:
            return self._resolve(method, m["repo"], unquote(m["rev"]), unquote(m["file"]), truncate)
        m = re.fullmatch(r"/lfs-objects/(?P<oid>[0-9a-f]{64})", path)
        if method in ("GET", "HEAD") and m:
            data = s.lfs.get(m["oid"])
            if data is None:
                raise HubError(404, "object not found")
            return self._ranged(method, data, {"ETag": f'"{m["oid"]}"'}, truncate)
        raise HubError(404, f"no route for {method} {path}")

    def _create_repo(self, payload: dict) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace}")
        url = f"{self.state.hub_url}/{repo_id}"
        if repo_id in self.state.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.state.create_repo(repo_id, private)
        return self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _branch(self, method: str, repo_id: str, branch: str, payload: dict) -> None:
        self._writer(repo_id)
        repo = self._repo(repo_id)
        if method == "DELETE":
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            if branch not in repo.refs:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del repo.refs[branch]
            return self._json(200, {})
        if branch in repo.refs:
            raise HubError(409, "Reference already exists")
        repo.refs[branch] = self._commit(repo, payload.get("startingPoint") or "main").oid
        return self._json(200, {})

    def _batch_object(self, repo: Repo, obj: dict) -> dict:
        oid, size = obj["oid"], obj["size"]
        if oid in repo.lfs_oids:  # stored in this repo already: nothing to upload
            return {"oid": oid, "size": size}
        base = self.state.storage_url
        verify = {"href": f"{self.state.hub_url}/lfs-verify/{repo.repo_id}/{oid}"}
        if size > self.state.multipart_threshold:
            chunk = self.state.chunk_size
            n_parts = -(-size // chunk)
            header = {"chunk_size": str(chunk), **{str(i): f"{base}/lfs-part/{oid}/{i}" for i in range(1, n_parts + 1)}}
            upload = {"href": f"{self.state.hub_url}/lfs-complete/{repo.repo_id}/{oid}", "header": header}
        else:
            upload = {"href": f"{base}/lfs-upload/{repo.repo_id}/{oid}"}
        return {"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload, "verify": verify}}

    def _store(self, repo_id: str, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"sha256 of the uploaded content is not {oid}")
        self.state.lfs[oid] = data
        self.state.repos[repo_id].lfs_oids.add(oid)
        return self._send(200, b"", {"ETag": f'"{oid}"'})

    def _commit_request(self, repo_id: str, rev: str, query: dict, body: bytes) -> None:
        self._writer(repo_id)
        repo = self._repo(repo_id)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        create_pr = query.get("create_pr") == ["1"]
        parent = header.get("parentCommit")
        if parent and create_pr:
            base = self._commit(repo, parent)
        else:
            base = self._commit(repo, "main" if create_pr else rev)
            if parent and parent != base.oid:  # the Hub's optimistic concurrency
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.state.lfs.get(value["oid"]) if value["oid"] in repo.lfs_oids else None
                if data is None:
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = Blob(data, True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
        commit = self.state.new_commit(repo, header["summary"], files, base.oid, header.get("description") or "")
        pr_url = None
        if create_pr:
            number = 1 + sum(1 for ref in repo.refs if ref.startswith("refs/pr/"))
            repo.refs[f"refs/pr/{number}"] = commit.oid
            pr_url = f"{self.state.hub_url}/{repo_id}/discussions/{number}"
        else:
            repo.refs[rev] = commit.oid
        return self._json(200, {"commitUrl": f"{self.state.hub_url}/{repo_id}/commit/{commit.oid}",
                                "commitOid": commit.oid, "pullRequestUrl": pr_url})

    def _resolve(self, method: str, repo_id: str, rev: str, file: str, truncate: bool) -> None:
        commit = self._commit(self._repo(repo_id), rev)
        blob = commit.files.get(file)
        if blob is None:
            raise HubError(404, f"Entry not found: {file}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid}
        if blob.lfs:
            sha = blob.sha256
            headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": len(blob.data), "ETag": f'"{sha}"',
                            "Location": f"{self.state.storage_url}/lfs-objects/{sha}"})
            return self._send(302, b"", headers, head=True)
        headers["ETag"] = f'"{blob.sha1}"'
        return self._ranged(method, blob.data, headers, truncate)

    def _ranged(self, method: str, data: bytes, headers: dict, truncate: bool) -> None:
        headers["Accept-Ranges"] = "bytes"
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match[1])
            end = int(match[2]) if match[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers, head=method == "HEAD", truncate=truncate)
        return self._send(200, data, headers, head=method == "HEAD", truncate=truncate)


class QuietServer(ThreadingHTTPServer):
    """A handler's exception (a client that hung up mid-answer: a killed moeq, a dropped connection) is kept in
    `errors`, not printed: socketserver prints it to sys.stderr, which may be the capture of a command another test
    runs in this process at that moment."""

    errors: list[str]

    def handle_error(self, request, client_address) -> None:
        import traceback

        self.errors.append(traceback.format_exc())


class TestHub:
    """A running test Hub: `url` for HF_ENDPOINT, `state` to seed, inspect and inject faults."""

    def __init__(self, tokens: dict[str, str]):
        self.state = HubState(tokens)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.servers = [QuietServer(("127.0.0.1", 0), handler) for _ in range(2)]
        self.errors: list[str] = []
        for server in self.servers:
            server.errors = self.errors
        self.url, self.state.storage_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)
        self.state.hub_url = self.url
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self.servers]
        for t in self.threads:
            t.start()

    @property
    def requests(self) -> list[Request]:
        return self.state.requests

    def close(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()
