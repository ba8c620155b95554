"""The viewer's server: aiohttp (a maintained asyncio HTTP server and client; it parses requests, normalises paths
and is already installed with Lightning's fsspec[http]) answering every GET with the site's content (viewer/site.py).
Tiles are made in a thread pool, so slow reads never block other requests.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from aiohttp import web

from histoflow.common.errors import ConfigError
from histoflow.viewer.site import Site, content_type

LOCAL = "127.0.0.1"


def make_app(site: Site, workers: int = 4) -> web.Application:
    pool = ThreadPoolExecutor(workers, thread_name_prefix="histoflow-view")

    async def answer(request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        body = await asyncio.get_running_loop().run_in_executor(pool, site.get, path)
        if body is None:
            raise web.HTTPNotFound(text=f"{path}: not part of this run's viewer\n")
        return web.Response(body=body, content_type=content_type(path or "index.html"),
                            headers={"Cache-Control": "no-cache"})

    async def close(_: web.Application) -> None:
        pool.shutdown(wait=False, cancel_futures=True)
        site.close()

    app = web.Application()
    app.router.add_get("/{path:.*}", answer)
    app.on_cleanup.append(close)
    return app


def bind(host: str, port: int | None) -> socket.socket:
    """A listening socket on host:port; port None: a free one. A port in use is refused, naming the fix."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port or 0))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"view.port={port}: the port is in use by another program. Fix: view.port=<another "
                              "port>, or leave view.port out for a free one") from e
        raise ConfigError(f"view.host={host} view.port={port}: cannot listen there ({e.strerror})") from e
    sock.listen(128)
    return sock


def serve(site: Site, host: str = LOCAL, port: int | None = None,
          announce: Callable[[str], None] = print) -> None:
    """Serve the site until interrupted; `announce` gets the address once listening."""
    sock = bind(host, port)
    address = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}/"

    async def run() -> None:
        runner = web.AppRunner(make_app(site), access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        announce(address)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
