"""A small Hugging Face Hub stand-in on 127.0.0.1, for tests.

It answers the requests ``huggingface_hub`` makes: ``HEAD``/``GET`` on
``/{repo}/resolve/{rev}/{file}`` (with ``X-Repo-Commit``, ``ETag``, ``Range``), the model
info and tree APIs of ``snapshot_download``, and the upload flow (create repo, preupload,
NDJSON commit). Repositories live in memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    private: bool = False
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[str] = []  # Range headers seen (resumed downloads)
        self.drop_once: dict[str, int] = {}  # file name -> bytes sent before the first GET breaks off
        self.lock = threading.Lock()
        self.fail_uploads = False  # answer commits with 403, as the Hub does without write access
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def add_file(self, repo_id: str, name: str, data: bytes) -> None:
        self.repos.setdefault(repo_id, Repo()).files[name] = data

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)

            def _json(self, code: int, obj, headers: dict | None = None) -> None:
                self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _not_found(self, code: str, head: bool = False) -> None:
                self._send(404, b"" if head else json.dumps({"error": code}).encode(), {"X-Error-Code": code}, head)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _resolve(self, head: bool) -> None:
                m = re.match(r"^/(?:models/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", unquote(urlparse(self.path).path))
                if not m:
                    return self._not_found("RepoNotFound", head)
                repo_id, rev, name = m.groups()
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._not_found("RepoNotFound", head)
                if rev not in ("main", repo.sha):
                    return self._not_found("RevisionNotFound", head)
                if name not in repo.files:
                    return self._not_found("EntryNotFound", head)
                data = repo.files[name]
                etag = hashlib.sha256(data).hexdigest()
                headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
                rng = self.headers.get("Range")
                if rng and not head:
                    hub.ranges.append(rng)
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                    part = data[start:]
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    return self._send(206, part, headers)
                if not head and name in hub.drop_once:  # a broken transfer: promise all, send part
                    cut = hub.drop_once.pop(name)
                    self.send_response(200)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return None
                if head:
                    self.send_response(200)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return None
                return self._send(200, data, headers)

            def do_HEAD(self) -> None:
                with hub.lock:
                    hub.requests.append(("HEAD", self.path))
                self._resolve(head=True)

            def do_GET(self) -> None:
                with hub.lock:
                    hub.requests.append(("GET", self.path))
                path = unquote(urlparse(self.path).path)
                m = re.match(r"^/api/models/([^/]+/[^/]+)/revision/([^/]+)$", path) or re.match(
                    r"^/api/models/([^/]+/[^/]+)$", path
                )
                if m:
                    repo = hub.repos.get(m.group(1))
                    if repo is None:
                        return self._not_found("RepoNotFound")
                    siblings = [{"rfilename": n, "size": len(d)} for n, d in sorted(repo.files.items())]
                    return self._json(
                        200, {"id": m.group(1), "modelId": m.group(1), "sha": repo.sha, "siblings": siblings}
                    )
                m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path)
                if m:
                    repo = hub.repos.get(m.group(1))
                    if repo is None:
                        return self._not_found("RepoNotFound")
                    items = [
                        {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for n, d in sorted(repo.files.items())
                    ]
                    return self._json(200, items)
                return self._resolve(head=False)

            def do_POST(self) -> None:
                path = unquote(urlparse(self.path).path)
                body = self._body()
                with hub.lock:
                    hub.requests.append(("POST", self.path))
                if path == "/api/repos/create":
                    req = json.loads(body or b"{}")
                    repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
                    with hub.lock:
                        created = repo_id not in hub.repos
                        private = req.get("visibility") == "private" or bool(req.get("private"))
                        hub.repos.setdefault(repo_id, Repo(private=private))
                    return self._json(200 if created else 409, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                m = re.match(r"^/api/models/([^/]+/[^/]+)/preupload/([^/]+)$", path)
                if m:
                    files = json.loads(body).get("files", [])
                    return self._json(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                            ],
                            "commitOid": hub.repos.get(m.group(1), Repo()).sha,
                        },
                    )
                m = re.match(r"^/api/models/([^/]+/[^/]+)/commit/([^/]+)$", path)
                if m and hub.fail_uploads:
                    return self._json(403, {"error": "You don't have the rights to push to this repository"})
                if m:
                    repo = hub.repos.setdefault(m.group(1), Repo())
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if item.get("key") == "file":
                            v = item["value"]
                            repo.files[v["path"]] = base64.b64decode(v["content"])
                        elif item.get("key") == "header":
                            repo.commits.append(item["value"].get("summary", ""))
                    return self._json(
                        200,
                        {
                            "commitUrl": f"{hub.url}/{m.group(1)}/commit/{repo.sha}",
                            "commitOid": repo.sha,
                            "success": True,
                        },
                    )
                self._json(404, {"error": "not found"})

        return Handler


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for the hub and for accelerate launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
