"""Who may talk to `align annotate`, and what every answer carries: the access guard around its web app.

Every request passes, in order:

    Host header    one of the names the server is bound to (127.0.0.1, localhost, [::1], the --host, any
                   --allow-host; bare or with the port), else 403: a page on another site that re-points its
                   own name at 127.0.0.1 (DNS rebinding) sends its own name and is refused
    Origin         when a browser sends one, it must be http://<an allowed host>, else 403 (cross-site posts)
    token          when one is set (always, when bound to anything but loopback): the page takes it once as
                   `/?token=...`, answers with an HttpOnly, SameSite=Strict cookie and a redirect to `/`; the
                   API takes the cookie or `Authorization: Bearer <token>`; compared in constant time; else 401
    body           a POST must be `application/json` (415) with a Content-Length (411) of at most
                   MAX_BODY_BYTES (413), checked before a byte of it is read

and every answer, refusals included, carries SECURITY_HEADERS.
"""

import hmac
import ipaddress
import json
import re
import secrets
import socket
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

MAX_BODY_BYTES = 64 * 1024
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_.~-]{16,256}")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
WILDCARDS = ("0.0.0.0", "::")


class AccessError(ValueError):
    """A set-up of the access guard that is refused (the message says why)."""


def is_loopback(host: str) -> bool:
    """True for names and addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(32)


def check_token(token: str) -> str:
    """The token as given, or AccessError if it is too short to be secret or would not survive a URL."""
    if not TOKEN_PATTERN.fullmatch(token):
        raise AccessError("--token: give 16 to 256 characters from A-Z a-z 0-9 _ . ~ - "
                          "(or leave it out to have one generated)")
    return token


def primary_address() -> str | None:
    """The address other machines most likely reach this one by (the source of its default route), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # a UDP connect sends nothing: it only picks the route
            return s.getsockname()[0]
        except OSError:
            return None


def _host_names(host: str) -> set[str]:
    """The names a client may put in its Host header to reach a server bound to `host`."""
    names = {host.lower()}
    if host in WILDCARDS:  # every interface: the machine's own names and addresses
        names = {socket.gethostname().lower(), socket.getfqdn().lower(), primary_address() or "localhost"}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:  # a machine whose own name does not resolve: its names stay
            pass
    return names


def allowed_hosts(host: str, port: int, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """Host header values accepted: each name bare and with `:port`, IPv6 addresses in brackets."""
    out = set()
    for name in {*LOOPBACK_NAMES, *_host_names(host), *(e.lower() for e in extra)}:
        shown = f"[{name}]" if ":" in name and not name.startswith("[") else name
        out |= {shown, f"{shown}:{port}"}
    return frozenset(out)


@dataclass(frozen=True)
class Access:
    """What the guard lets in: the bound host and port, extra Host names, and the token (None: no token)."""
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    allow_hosts: tuple[str, ...] = ()

    def __post_init__(self):
        if self.token is None and not is_loopback(self.host):
            raise AccessError(f"--host {self.host}: a server reachable from other machines needs a token")
        if self.token is not None:
            check_token(self.token)

    @property
    def cookie(self) -> str:
        return f"annotate_token_{self.port}"  # one per port: two servers on one machine keep their own


def token_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


class AccessGuard:
    """ASGI middleware in front of the whole app (outside its error handler, so a 500 carries the headers)."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access
        self.hosts = allowed_hosts(access.host, access.port, access.allow_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message, headers=[*message.get("headers", []), *(
                    (k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in names)])
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, detail, extra = refusal
            return await _answer(send_with_headers, status, detail, extra)
        if scope["method"] not in ("GET", "HEAD"):
            receive = await self._bounded_body(receive)
            if receive is None:
                return await _answer(send_with_headers, 413, f"request body: more than {MAX_BODY_BYTES} bytes")
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope, headers: dict) -> tuple[int, str, list] | None:
        """(status, message, extra headers) of a request refused before the app sees it, or None."""
        host = headers.get("host", "").lower()
        if host not in self.hosts:
            return 403, (f"Host {host[:100]!r} is not a name this server answers to (restart align annotate with "
                         "--allow-host NAME to add one)"), []
        origin = headers.get("origin")
        if origin is not None and (urlsplit(origin).scheme != "http" or urlsplit(origin).netloc.lower() not in self.hosts):
            return 403, f"Origin {origin[:100]!r}: requests from other sites are refused", []
        if self.access.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
            if scope["path"] == "/" and query is not None:  # the shared link: set the cookie, drop the token from the URL
                if not token_matches(query, self.access.token):
                    return 401, "token: wrong token in the link", []
                cookie = f"{self.access.cookie}={self.access.token}; HttpOnly; SameSite=Strict; Path=/"
                return 303, "token accepted", [(b"location", b"/"), (b"set-cookie", cookie.encode())]
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.startswith("Bearer ") else _cookie(headers.get("cookie", ""), self.access.cookie)
            if not token_matches(given, self.access.token):
                return 401, ("token: this server needs its access token: open the link align annotate printed at "
                             "start (/?token=...), or send Authorization: Bearer <token>"), []
        if scope["method"] not in ("GET", "HEAD"):
            if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                return 415, "request body: send it as application/json", []
            length = headers.get("content-length")
            if length is None or not length.isdigit():
                return 411, "request body: a Content-Length header is required", []
            if int(length) > MAX_BODY_BYTES:
                return 413, f"request body: {int(length)} bytes is more than {MAX_BODY_BYTES}", []
        return None

    @staticmethod
    async def _bounded_body(receive):
        """Read the body (at most MAX_BODY_BYTES; None past it) and a `receive` that replays it to the app."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                return None
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay


async def _answer(send, status: int, detail: str, extra_headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": body})
