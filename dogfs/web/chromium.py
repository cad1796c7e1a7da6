# -*- test-case-name: tests.test_dashboard_browser -*-
"""A headless Chromium driven over the DevTools protocol, for tests and screenshots.

L{Chromium.launch} starts Debian's C{chromium} with a fresh profile and a DevTools port,
reads the browser's WebSocket address from its stderr, and connects to it with autobahn;
L{Chromium.open} opens a tab (a flat DevTools session) as a L{Page}, which can evaluate
JavaScript, wait for a condition and capture a PNG. No selenium, no downloaded browser.

Imports nothing of ours. The reactor is passed in (it spawns a process and connects TCP).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from hyperlink import URL
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

CHROMIUM = "/usr/bin/chromium"
#: Flags for a quiet, self-contained headless browser (no network of its own, no GPU).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)
_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class DevToolsError(Exception):
    """A DevTools command failed, or the browser could not be started or reached."""


def speaks_tls(address: str, timeout: float = 5.0) -> bool:
    """Whether the server at "host:port" completes a TLS handshake (certificate unchecked).

    Blocking: for scripts and test set-up, to tell an C{https:} dashboard from an C{http:} one.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return True
    except (OSError, ssl.SSLError, ValueError):
        return False


def dashboard_url(http_address: str) -> str:
    """The dashboard's URL at "host:port", C{https:} when it speaks TLS."""
    return f"{'https' if speaks_tls(http_address) else 'http'}://{http_address}/"


def find_chromium() -> str | None:
    """The Chromium binary's path, or None when it is not installed."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _BrowserProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.endpoint: Deferred[str] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._stderr = b""

    def errReceived(self, data: bytes) -> None:
        if self.endpoint.called:
            return
        self._stderr = (self._stderr + data)[-65536:]
        match = _LISTENING.search(self._stderr)
        if match is not None:
            self.endpoint.callback(match.group(1).decode("ascii"))

    def processEnded(self, reason: Failure) -> None:
        if not self.endpoint.called:
            tail = self._stderr[-2000:].decode("utf-8", "replace")
            self.endpoint.errback(DevToolsError(f"chromium exited before listening: {tail}"))
        self.ended.callback(None)


class _DevToolsProtocol(WebSocketClientProtocol):
    factory: _DevToolsFactory

    def onOpen(self) -> None:
        self.factory.connected(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.browser._received(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.browser._lost(reason or "closed")


class _DevToolsFactory(WebSocketClientFactory):
    protocol = _DevToolsProtocol  # type: ignore[assignment]

    def __init__(self, url: str, browser: Chromium) -> None:
        super().__init__(url)
        self.browser = browser
        self.ready: Deferred[_DevToolsProtocol] = Deferred()

    def connected(self, proto: _DevToolsProtocol) -> None:
        if not self.ready.called:
            self.ready.callback(proto)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(reason)


class Chromium:
    """A running headless browser and its DevTools connection."""

    def __init__(self, reactor: Any, process: Any, protocol: _BrowserProcess, profile: str) -> None:
        """Use L{launch}."""
        self.reactor = reactor
        self._process = process
        self._protocol = protocol
        self._profile = profile
        self._ws: _DevToolsProtocol | None = None
        self._next_id = 0
        self._pending: dict[int, Deferred[dict[str, Any]]] = {}

    @classmethod
    async def launch(
        cls,
        reactor: Any,
        *,
        binary: str | None = None,
        timeout: float = 30.0,
        ignore_certificate_errors: bool = False,
    ) -> Chromium:
        """Start a headless Chromium with a fresh profile and connect to its DevTools.

        C{ignore_certificate_errors} lets it open a local cluster's HTTPS dashboard, whose
        certificate comes from the cluster's own CA.
        """
        path = binary or find_chromium()
        if path is None:
            raise DevToolsError("chromium is not installed (apt-get install chromium)")
        profile = tempfile.mkdtemp(prefix="dogfs-chromium-")
        proto = _BrowserProcess()
        args = [path, *FLAGS, f"--user-data-dir={profile}"]
        if ignore_certificate_errors:
            args.append("--ignore-certificate-errors")
        args.append("about:blank")
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TZ")}
        env.setdefault("HOME", profile)
        process = reactor.spawnProcess(proto, path, args, env=env)
        browser = cls(reactor, process, proto, profile)
        try:
            url = await proto.endpoint.addTimeout(timeout, reactor)
            parsed = URL.from_text(url)
            factory = _DevToolsFactory(url, browser)
            factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
            reactor.connectTCP(parsed.host, parsed.port, factory, timeout=timeout)
            browser._ws = await factory.ready.addTimeout(timeout, reactor)
        except BaseException:
            await browser.close()
            raise
        return browser

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> Deferred[dict[str, Any]]:
        """Send one DevTools command; the Deferred fires with its C{result}."""
        if self._ws is None:
            raise DevToolsError("not connected to chromium")
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        waiting: Deferred[dict[str, Any]] = Deferred()
        self._pending[self._next_id] = waiting
        self._ws.sendMessage(json.dumps(message).encode("utf-8"), isBinary=False)
        return waiting

    def _received(self, message: dict[str, Any]) -> None:
        waiting = self._pending.pop(message.get("id", -1), None)
        if waiting is None:
            return
        if "error" in message:
            waiting.errback(DevToolsError(json.dumps(message["error"])))
        else:
            waiting.callback(message.get("result") or {})

    def _lost(self, reason: str) -> None:
        self._ws = None
        pending, self._pending = self._pending, {}
        for waiting in pending.values():
            waiting.errback(DevToolsError(f"DevTools connection lost: {reason}"))

    async def open(self, url: str, *, width: int = 1400, height: int = 1000) -> Page:
        """Open C{url} in a new tab of C{width} x C{height} CSS pixels."""
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"], target["targetId"])
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        await page.send("Page.enable")
        await page.send("Page.navigate", {"url": url})
        return page

    async def close(self) -> None:
        """Close the browser, wait for its process to end and remove its profile."""
        if self._ws is not None:
            try:
                await self.send("Browser.close").addTimeout(5, self.reactor)
            except Exception:
                pass
        if not self._protocol.ended.called:
            try:
                await self._protocol.ended.addTimeout(5, self.reactor)
            except Exception:
                try:
                    self._process.signalProcess("KILL")
                except Exception:
                    pass
                await self._protocol.ended
        shutil.rmtree(self._profile, ignore_errors=True)


class Page:
    """One tab of a L{Chromium}, as a flat DevTools session."""

    def __init__(self, browser: Chromium, session: str, target: str) -> None:
        """Use L{Chromium.open}."""
        self.browser = browser
        self.session = session
        self.target = target

    def send(self, method: str, params: dict[str, Any] | None = None) -> Deferred[dict[str, Any]]:
        """Send a DevTools command to this tab."""
        return self.browser.send(method, params, self.session)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression evaluated in the page."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression!r} raised: {json.dumps(result['exceptionDetails'])}")
        return result.get("result", {}).get("value")

    async def wait_for(
        self,
        expression: str,
        timeout: float,
        *,
        interval: float = 0.2,
        check: Callable[[Any], bool] = bool,
    ) -> Any:
        """Evaluate C{expression} every C{interval} s until C{check(value)}; return the value.

        Raises L{DevToolsError} with the last value after C{timeout} seconds.
        """
        reactor = self.browser.reactor
        deadline = reactor.seconds() + timeout
        value: Any = None
        while True:
            try:
                value = await self.evaluate(expression)
            except DevToolsError as error:
                # The page may be between navigations; try again until the deadline.
                value = error
            if not isinstance(value, DevToolsError) and check(value):
                return value
            if reactor.seconds() >= deadline:
                raise DevToolsError(f"timed out after {timeout} s waiting for {expression!r}: {value!r}")
            await deferLater(reactor, interval, lambda: None)

    async def screenshot(self, width: int = 1400) -> bytes:
        """A PNG of the whole page, C{width} CSS pixels wide, as tall as its content."""
        height = await self.evaluate("document.documentElement.scrollHeight")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": int(height or 1000), "deviceScaleFactor": 1, "mobile": False},
        )
        # Let the page lay out (and redraw its canvas) at the new size before the capture.
        await deferLater(self.browser.reactor, 0.3, lambda: None)
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(result["data"])

