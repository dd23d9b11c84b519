"""Running the app under uvicorn: the two things the ASGI app cannot do by itself.

- **Unparsable requests.** uvicorn's HTTP layer (h11) answers a request it cannot parse (a malformed
  `Content-Length`, a bad request line or header, headers over 16 KiB) with a 400 of its own before the app
  sees it, in plain text. `_JSONErrorsProtocol` sends that 400 as OpenAI-shaped JSON instead.
- **Shutdown.** uvicorn's graceful shutdown stops accepting, waits for in-flight requests, and at its timeout
  cancels them: a stream cancelled so just stops, with no error and no `[DONE]`. `DrainingServer` ends them
  first: once the grace period is over the engine fails every request still in flight (a stream gets an error
  event and `[DONE]`, a non-streamed request a 503), and uvicorn's own timeout, CUT_MARGIN_S later, is only
  the backstop.

Not bounded here: the time a client takes to send its headers (uvicorn has no such timeout; its keep-alive
timeout closes idle connections between requests). Put a reverse proxy in front for untrusted networks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import error_json

CUT_MARGIN_S = 5.0  # after the grace period: time for cut requests to send their last events before uvicorn cancels


class _JSONErrorsProtocol(H11Protocol):
    """uvicorn's h11 protocol with its answer to an unparsable request in OpenAI's error shape. The parse error
    itself is not passed on by uvicorn, so the message lists what can cause it."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error_json(400, "the HTTP request could not be parsed: a malformed request line or "
                                          "header (such as a Content-Length that is not a number), or headers "
                                          "over the size limit")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # h11 cannot find the next request after a broken one
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, calling `cut` once the shutdown has lasted `grace_s` seconds: it must end every request
    still in flight, so that each gets its final events before uvicorn's timeout cancels what is left."""

    def __init__(self, config: uvicorn.Config, cut: Callable[[], None], grace_s: float):
        super().__init__(config)
        self._cut, self._grace_s = cut, grace_s

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self._grace_s, self._cut)
        try:
            await super().shutdown(sockets)  # returns early when everything finishes within the grace period
        finally:
            timer.cancel()


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **uvicorn_options) -> DrainingServer:
    """The uvicorn server for an app from `build_app`, with its limits' grace period; `.run()` serves until
    SIGINT/SIGTERM (or `should_exit`), then drains."""
    state = app.state.server
    grace = state.limits.shutdown_grace_s
    config = uvicorn.Config(app, host=host, port=port, http=_JSONErrorsProtocol,
                            timeout_graceful_shutdown=grace + CUT_MARGIN_S, **uvicorn_options)
    message = f"the server shut down before this request finished (the shutdown grace period is {grace:g} s)"
    return DrainingServer(config, lambda: state.bridge.cut(message), grace)


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGINT/SIGTERM, then drain within the limits' shutdown grace period."""
    url_host = f"[{host}]" if ":" in host else host
    print(f"deepmoe serve: {app.state.server.model_name!r} at http://{url_host}:{port}/v1", flush=True)
    make_server(app, host, port).run()
