"""The HTTP transport of the built-in server: uvicorn's h11 protocol with deadlines for slow clients.

A connection must deliver a request's headers within `header_timeout_s` (else it is dropped) and its body
within `body_timeout_s` (else the app answers 408). On SIGTERM the server stops accepting, lets in-flight
requests finish for up to `shutdown_timeout_s`, then stops the runs still going and exits.
"""

from __future__ import annotations

import logging
import math

from serving.config import ServeConfig

log = logging.getLogger(__name__)


def guarded_h11(header_timeout_s: float):
    """uvicorn's h11 protocol with a header deadline: a connection that has not completed a request's
    headers `header_timeout_s` after it opened (or after its previous response) is closed. uvicorn alone
    keeps a client that sends headers a byte at a time forever (its keep-alive timer stops at the first
    byte)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # still waiting for headers
                log.info(
                    "dropping %s: no complete request headers within %s s", self.client, header_timeout_s
                )
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a new request's headers arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def uvicorn_config(app, cfg: ServeConfig, **kwargs):
    """The uvicorn settings that enforce `cfg`'s connection limits (header deadline, bounded shutdown)."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=guarded_h11(cfg.header_timeout_s),
        timeout_keep_alive=5,
        timeout_graceful_shutdown=max(1, math.ceil(cfg.shutdown_timeout_s)),
        **kwargs,
    )
