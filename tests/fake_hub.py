"""A local stand-in for the Hugging Face Hub HTTP API, enough for `HfApi.create_repo`, `upload_folder` (files sent
inline, as the Hub accepts small ones) and `snapshot_download`. It records what was uploaded and the tokens used."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REVISION = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> path -> bytes
        self.created: list[dict] = []
        self.tokens: set[str] = set()
        self.served: list[str] = []  # "repo/path" of every file body sent (not HEAD requests)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, code: int = 200, content_type: str = "application/json", head: bool = False,
              headers: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj, code: int = 200):
        self._send(json.dumps(obj).encode(), code)

    def _auth(self):
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if token:
            self.server.tokens.add(token)

    def do_POST(self):
        self._auth()
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/api/repos/create":
            req = json.loads(data)
            self.server.created.append(req)
            repo = f"{req.get('organization')}/{req['name']}"
            self.server.repos.setdefault(repo, {})
            return self._json({"url": f"{self.server.url}/{repo}"})
        if self.path == "/api/validate-yaml":  # the client checks a README's metadata before committing it
            return self._json({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(data)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
        if "/commit/" in self.path:
            repo = self.path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
            for line in data.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.server.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._json({"commitUrl": f"{self.server.url}/{repo}/commit/{REVISION}", "commitOid": REVISION,
                               "pullRequestUrl": None})
        self._json({"error": f"not handled: POST {self.path}"}, 404)

    def _get(self, head: bool):
        self._auth()
        path = self.path.split("?", 1)[0]
        if path.startswith("/api/models/"):
            repo = "/".join(path.removeprefix("/api/models/").split("/")[:2])
            if repo not in self.server.repos:
                return self._json({"error": "Repository not found"}, 404)
            if "/tree/" in path:
                return self._json([{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                   for p, b in sorted(self.server.repos[repo].items())])
            return self._json({"id": repo, "sha": REVISION, "private": True,
                               "siblings": [{"rfilename": p} for p in sorted(self.server.repos[repo])]})
        if "/resolve/" in path:
            repo, rest = path.lstrip("/").split("/resolve/", 1)
            name = rest.split("/", 1)[1]
            body = self.server.repos.get(repo, {}).get(name)
            if body is None:
                return self._json({"error": "Entry not found"}, 404)
            if not head:
                self.server.served.append(f"{repo}/{name}")
            return self._send(body, content_type="application/octet-stream", head=head,
                              headers={"ETag": f'"{hashlib.sha1(body).hexdigest()}"', "X-Repo-Commit": REVISION})
        self._json({"error": f"not handled: GET {self.path}"}, 404)

    def do_GET(self):
        self._get(head=False)

    def do_HEAD(self):
        self._get(head=True)
