"""A local server that speaks the Hugging Face hub's download API, for `modelyard pull`.

No hub is reachable from the tests: this serves the calls `huggingface_hub.snapshot_download`
makes (repo info, the recursive tree listing, HEAD and GET of `resolve/`), for repos held in
memory. It records every request's Authorization header, can require a token (a gated repo),
and can send a file slowly, to see a progress bar move.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

from aiohttp import web

COMMIT = "a" * 40


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    token: str | None = None  # when set, every call must carry `Bearer <token>`


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    authorizations: list[str | None] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    chunk_delay_s: float = 0.0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/revision/{revision}", self._info)
        app.router.add_get("/api/models/{org}/{name}", self._info)
        app.router.add_get("/api/models/{org}/{name}/tree/{revision}", self._tree)
        app.router.add_get("/api/models/{org}/{name}/tree/{revision}/{path:.*}", self._tree)
        app.router.add_get("/{org}/{name}/resolve/{revision}/{path:.*}", self._file)
        return app

    def _repo(self, request: web.Request) -> FakeRepo:
        self.paths.append(request.path)
        authorization = request.headers.get("Authorization")
        self.authorizations.append(authorization)
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        headers = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
        if repo is None:
            raise web.HTTPNotFound(headers=headers, text='{"error":"Repository not found"}')
        if repo.token is not None and authorization != f"Bearer {repo.token}":
            headers["X-Error-Code"] = "GatedRepo"
            raise web.HTTPUnauthorized(headers=headers, text='{"error":"Access restricted"}')
        return repo

    async def _info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        return web.json_response(
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": COMMIT,
                "private": repo.token is not None,
                "siblings": [{"rfilename": name} for name in repo.files],
            }
        )

    async def _tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        return web.json_response(
            [
                {
                    "type": "file",
                    "oid": _git_oid(data),
                    "size": len(data),
                    "path": name,
                    **(
                        {"lfs": {"oid": _sha256(data), "size": len(data), "pointerSize": 134}}
                        if name.endswith(".safetensors")
                        else {}
                    ),
                }
                for name, data in repo.files.items()
            ]
        )

    async def _file(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        data = repo.files.get(request.match_info["path"])
        if data is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        etag = (
            _sha256(data) if request.match_info["path"].endswith(".safetensors") else _git_oid(data)
        )
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{etag}"',
            "Content-Length": str(len(data)),
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            return web.Response(headers=headers)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        step = max(len(data) // 20, 1)
        for start in range(0, len(data), step):
            await response.write(data[start : start + step])
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        await response.write_eof()
        return response


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
