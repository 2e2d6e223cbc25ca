"""A local stand-in of the Hugging Face Hub API: the few endpoints huggingface_hub calls to create a
repository and a branch, validate a README's metadata, commit files (all uploaded inline, "regular"
mode: no LFS), and to download a snapshot (repo info, tree listing, resolve). Writes need a token;
private repositories are invisible without one. The ``hub`` fixture points huggingface_hub at it.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
import yaml

USER = "user"  # whose namespace a repository created without one goes to


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit id -> files

    def files(self, revision: str) -> dict[str, bytes] | None:
        return self.commits.get(self.branches.get(revision, revision))


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _metadata_errors(readme: str) -> list[str]:
    """What the Hub's README.md metadata check refuses: YAML that is not a mapping, a malformed
    ``model-index`` (each result: task type, dataset type and name, metrics with type and value)."""
    if not readme.startswith("---\n"):
        return []
    metadata = yaml.safe_load(readme.split("---\n")[1])
    if not isinstance(metadata, dict):
        return ["metadata is not a mapping"]
    errors = []
    for model in metadata.get("model-index", []):
        for result in model.get("results", []):
            if not (result.get("task", {}).get("type") and {"type", "name"} <= set(result.get("dataset", {}))):
                errors.append(f"model-index result without task type or dataset type/name: {result}")
            errors += [
                f"metric without type or value: {m}"
                for m in result.get("metrics", [])
                if not ({"type", "value"} <= set(m))
            ]
    return errors


class HubStandIn:
    """In-memory model repositories behind an HTTP server on localhost; ``requests`` records every
    request's method, path and Authorization header."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo_id: str, branch: str, files: dict[str, bytes | None]) -> str:
        """Apply ``files`` (None deletes) on top of ``branch``; returns the new commit id."""
        repo = self.repos[repo_id]
        tree = dict(repo.files(branch) or {})
        for path, content in files.items():
            if content is None:
                tree.pop(path, None)
            else:
                tree[path] = content
        oid = _sha1(
            json.dumps({p: _sha1(c) for p, c in sorted(tree.items())}).encode() + str(len(repo.commits)).encode()
        )
        repo.commits[oid] = tree
        repo.branches[branch] = oid
        return oid


def _handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _reply(self, status: int, payload=None, headers: dict[str, str] | None = None, body: bytes | None = None):
            if payload is not None:
                body = json.dumps(payload).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            if status >= 400:
                headers = {"X-Error-Message": str(payload and payload.get("error")), **(headers or {})}
            body = body or b""
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _body(self) -> bytes:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            return gzip.decompress(data) if self.headers.get("Content-Encoding") == "gzip" else data

        def _route(self) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Authorization")))
            parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
            if self.command == "POST" and parts != ["api", "validate-yaml"] and not self.headers.get("Authorization"):
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            if parts[:1] == ["api"]:
                return self._api(parts[1:])
            if len(parts) >= 5 and parts[2] == "resolve":  # /{org}/{name}/resolve/{revision}/{path}
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            self._reply(404, {"error": f"no route {self.path}"})

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is not None and repo.private and not self.headers.get("Authorization"):
                repo = None  # the Hub answers a private repository without a token as a missing one
            if repo is None:
                self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return repo

        def _api(self, parts: list[str]) -> None:
            if parts == ["repos", "create"] and self.command == "POST":
                payload = json.loads(self._body())
                repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
                if repo_id in hub.repos:
                    return self._reply(
                        409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                    )
                hub.repos[repo_id] = Repo(
                    private=payload.get("visibility") == "private" or bool(payload.get("private"))
                )
                hub.commit(repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
                return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if parts == ["validate-yaml"]:
                errors = [{"message": m} for m in _metadata_errors(json.loads(self._body())["content"])]
                return self._reply(400 if errors else 200, {"errors": errors, "warnings": []})
            if len(parts) < 5 or parts[0] != "models":  # /api/models/{org}/{name}/{action}/{revision}[/path]
                return self._reply(404, {"error": f"no route {self.path}"})
            repo = self._repo("/".join(parts[1:3]))
            if repo is None:
                return
            repo_id, action, revision = "/".join(parts[1:3]), parts[3], parts[4] if len(parts) > 4 else "main"
            files = repo.files(revision)
            if action != "branch" and files is None:
                return self._reply(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            if action == "revision":
                return self._reply(
                    200,
                    {
                        "id": repo_id,
                        "modelId": repo_id,
                        "private": repo.private,
                        "sha": repo.branches.get(revision, revision),
                        "siblings": [{"rfilename": p} for p in sorted(files)],
                    },
                )
            if action == "tree":
                return self._reply(
                    200,
                    [{"type": "file", "oid": _sha1(c), "size": len(c), "path": p} for p, c in sorted(files.items())],
                )
            if action == "branch" and self.command == "POST":
                if revision in repo.branches:
                    return self._reply(409, {"error": "Reference already exists"})
                repo.branches[revision] = repo.branches["main"]
                return self._reply(200, {})
            if action == "preupload":
                paths = [f["path"] for f in json.loads(self._body())["files"]]
                return self._reply(
                    200, {"files": [{"path": p, "uploadMode": "regular", "shouldIgnore": False} for p in paths]}
                )
            if action == "commit":
                changes: dict[str, bytes | None] = {}
                for line in self._body().splitlines():
                    entry = json.loads(line)
                    if entry["key"] == "file":
                        changes[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                    elif entry["key"] == "deletedFile":
                        changes[entry["value"]["path"]] = None
                    elif entry["key"] != "header":
                        return self._reply(400, {"error": f"the stand-in does not handle {entry['key']!r}"})
                oid = hub.commit(repo_id, revision, changes)
                return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})
            self._reply(404, {"error": f"no route {self.path}"})

        def _resolve(self, repo_id: str, revision: str, path: str) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            files = repo.files(revision) or {}
            if path not in files:
                return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            content = files[path]
            headers = {"X-Repo-Commit": repo.branches.get(revision, revision), "ETag": f'"{_sha1(content)}"'}
            self._reply(200, headers=headers, body=content)

        do_GET = do_HEAD = do_POST = _route

    return Handler


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running :class:`HubStandIn` that huggingface_hub talks to, with an empty cache and no token
    (``HF_TOKEN`` unset, the login token file in ``tmp_path``)."""
    from huggingface_hub import constants

    with HubStandIn() as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
        monkeypatch.setattr(constants, "ENDPOINT", stand_in.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", stand_in.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        yield stand_in
