"""Image loading for vision models: limits, decoding, and no server-side request forgery.

No model server is needed. Images come from data URIs and from a small HTTP server on
loopback, reached either because the policy's operator switch (``allow_private_networks``)
allows it, or through a public-looking name that the test's transport routes back to
loopback while the guard stays on. Every transport used here refuses any address off
this machine, and addresses such as 10.0.0.1 or 169.254.169.254 only ever come from a
stubbed resolver, so no test can reach another machine. Refusals are proven by a
listener on the very port the URL names: it must have accepted nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import io
import logging
import random
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image as PILImage

from server.errors import InvalidRequestError, PayloadTooLargeError, ServingError
from server.protocol.v4 import Image
from server.service.images import ImagePolicy, Resolver, decode_images, read_images, system_resolve
from server.service.images.guard import LOOKUP_THREADS, checked_address, refusal_reason
from server.settings import Settings

# A public address no test ever connects to: the transports below route it to loopback.
PUBLIC_IP = "93.184.216.34"
TRUSTED = ImagePolicy(allow_private_networks=True)


# --- images -------------------------------------------------------------------------


def encode(image: PILImage.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


PNG = encode(PILImage.new("RGB", (32, 16), "red"))
# Incompressible pixels, so that cutting the file cuts pixel data.
NOISY_PNG = encode(PILImage.frombytes("RGB", (128, 128), random.Random(0).randbytes(128 * 128 * 3)))


# --- a test HTTP server on loopback ------------------------------------------------------


class ImageServer:
    """Serves /img/<name>, /together/<name> (answers once 3 wait), /redirect[?to=], /slow/<name>, /stream/<bytes>."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.files: dict[str, bytes] = {"a.png": PNG, "noisy.png": NOISY_PNG}
        self.hosts: list[str] = []
        self.release = threading.Event()
        self.slow_answered: set[str] = set()  # the /slow/<name> requests answered
        self.together = threading.Barrier(3, timeout=60)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hosts.append(self.headers.get("Host", ""))
                parts = urlsplit(self.path)
                route, _, name = parts.path.lstrip("/").partition("/")
                if route == "redirect":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(parts.query).get("to", [self.path])[0])
                    self.end_headers()
                elif route == "slow":
                    owner.release.wait(30)
                    self._send(PNG)
                    owner.slow_answered.add(name)
                elif route == "stream":  # no Content-Length: the body ends when the socket does
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(int(name) // 1000):
                        self.wfile.write(b"\0" * 1000)
                elif route == "together":
                    owner.together.wait()
                    self._send(owner.files[name])
                elif route == "img" and name in owner.files:
                    self._send(owner.files[name])
                else:
                    self.send_error(404)

            def _send(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@pytest.fixture(scope="module")
def web() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


# --- transports and resolvers that keep every test on this machine ----------------------


def _on_this_machine(host: str) -> bool:
    address = ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class LocalOnlyTransport(httpx.AsyncHTTPTransport):
    """Connects to loopback only; PUBLIC_IP is routed to ``public_port`` on 127.0.0.1."""

    def __init__(self, public_port: int | None = None, **kwargs: object):
        super().__init__(**kwargs)
        self.public_port = public_port
        self.hosts: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.hosts.append(request.url.host)
        if request.url.host == PUBLIC_IP and self.public_port is not None:
            request.url = request.url.copy_with(host="127.0.0.1", port=self.public_port)
        elif not _on_this_machine(request.url.host):
            raise AssertionError(f"a test tried to connect to {request.url.host}")
        return await super().handle_async_request(request)


class StubResolver:
    """Answers from a table instead of DNS (IP literals stand for themselves); remembers what it was asked."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host in self.table:
            return self.table[host]
        try:
            return [str(ip_address(host))]
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, "not in the test's table") from None


class LoopbackProbe:
    """Listens on one port of 127.0.0.1 and ::1 and never answers: did anyone connect?"""

    def __init__(self) -> None:
        self.sockets = [socket.create_server(("127.0.0.1", 0))]
        self.port = self.sockets[0].getsockname()[1]
        with contextlib.suppress(OSError):  # no IPv6 loopback here; the [::1] cases skip
            self.sockets.append(socket.create_server(("::1", self.port), family=socket.AF_INET6))
        for sock in self.sockets:
            sock.setblocking(False)

    @property
    def has_ipv6(self) -> bool:
        return len(self.sockets) == 2

    def connections(self) -> int:
        count = 0
        for sock in self.sockets:
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                count += 1
        return count

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def probe() -> Iterator[LoopbackProbe]:
    listener = LoopbackProbe()
    yield listener
    listener.close()


async def load(
    urls: Sequence[str],
    policy: ImagePolicy = TRUSTED,
    *,
    max_images: int = 8,
    resolve: Resolver = system_resolve,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[PILImage.Image]:
    """Read then decode, as the service does (there with an engine lease in between)."""
    encoded = await read_images(
        [Image(image_url=url) for url in urls],
        policy,
        max_images=max_images,
        resolve=resolve,
        transport=transport or LocalOnlyTransport(),
    )
    return await decode_images(encoded, policy)


async def refusal(urls: Sequence[str], policy: ImagePolicy = TRUSTED, **kwargs: object) -> ServingError:
    with pytest.raises(ServingError) as caught:
        await load(urls, policy, **kwargs)  # type: ignore[arg-type]
    return caught.value


# --- loading ------------------------------------------------------------------------------


async def test_http_and_data_images_load_concurrently(web: ImageServer) -> None:
    # /together answers only once three requests wait at once: a serial fetch never would.
    web.together = threading.Barrier(3, timeout=60)
    urls = [web.url(f"/together/{name}") for name in ("a.png", "noisy.png", "a.png")] + [data_uri(PNG)]
    images = await load(urls)
    assert [image.size for image in images] == [(32, 16), (128, 128), (32, 16), (32, 16)]
    assert {image.mode for image in images} == {"RGB"}
    assert images[0].getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("fmt", "mode", "media_type"),
    [
        ("PNG", "RGBA", "image/png"),
        ("JPEG", "L", "image/jpeg"),
        ("GIF", "P", "image/gif"),
        ("WEBP", "RGB", "image/webp"),
        ("BMP", "RGB", "image/bmp"),
    ],
)
async def test_allowed_formats_decode_to_rgb(fmt: str, mode: str, media_type: str) -> None:
    [image] = await load([data_uri(encode(PILImage.new(mode, (8, 4)), fmt), media_type)])
    assert (image.size, image.mode) == ((8, 4), "RGB")


async def test_public_host_is_fetched_from_the_checked_address_under_its_own_name() -> None:
    seen: list[httpx.Request] = []

    class Body(httpx.AsyncByteStream):  # a streamed body, as from a real connection
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield PNG

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=Body())

    resolver = StubResolver({"images.example": [PUBLIC_IP]})
    policy = ImagePolicy(allowed_domains=frozenset({"images.example"}))
    await load(["https://images.example/a.png"], policy, resolve=resolver, transport=httpx.MockTransport(answer))
    [request] = seen
    assert request.url.host == PUBLIC_IP  # no second lookup: the connection goes to what was checked
    assert request.headers["host"] == "images.example"
    assert request.extensions["sni_hostname"] == "images.example"  # TLS verifies the name
    assert resolver.asked == ["images.example"]


async def test_tls_is_verified_against_the_name_not_the_address(tmp_path: Path) -> None:
    cert_pem, key_pem = _self_signed("images.example")
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = ImageServer(tls=server_tls)
    try:
        resolver = StubResolver({"images.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
        trust = ssl.create_default_context(cadata=cert_pem.decode())
        [image] = await load(
            [f"https://images.example:{server.port}/img/a.png"],
            resolve=resolver,
            transport=LocalOnlyTransport(verify=trust),
        )
        assert image.size == (32, 16)
        error = await refusal(
            [f"https://other.example:{server.port}/img/a.png"],
            resolve=resolver,
            transport=LocalOnlyTransport(verify=trust),
        )
        assert "certificate verify failed" in error.message
    finally:
        server.close()


def _self_signed(name: str) -> tuple[bytes, bytes]:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# --- the address guard --------------------------------------------------------------------

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "localhost",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0x7f.1",
    "017700000001",
    "[::ffff:127.0.0.1]",
    "[::1]",
]


NOT_ALLOWED = "is not allowed: this server fetches images only from public addresses"


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
async def test_loopback_in_any_spelling_is_refused_without_connecting(host: str, probe: LoopbackProbe) -> None:
    if "::1" in host and not probe.has_ipv6:
        pytest.skip("no IPv6 loopback on this machine")
    url = f"http://{host}:{probe.port}/a.png"
    error = await refusal([url], ImagePolicy())
    assert isinstance(error, InvalidRequestError) and error.param == "images[0].image_url"
    assert error.message == f"image URL host '{httpx.URL(url).host}' {NOT_ALLOWED}"
    assert probe.connections() == 0
    # Control: with the guard off the same URL does reach the listener, so zero above means something.
    # (The probe closes the connection it accepts, which ends that fetch.)
    control = asyncio.create_task(refusal([url], ImagePolicy(allow_private_networks=True, fetch_timeout=60)))
    connections = 0

    def connected() -> bool:
        nonlocal connections
        connections += probe.connections()
        return connections > 0

    await asyncio.wait_for(_until(connected), 60)
    await control
    assert connections + probe.connections() == 1


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.0.0.1", "a private address"),
        ("192.168.1.1", "a private address"),
        ("172.16.0.1", "a private address"),
        ("0.1.2.3", "a private address"),  # "this network"
        ("100.64.0.1", "a shared (carrier-grade NAT) address"),
        ("169.254.169.254", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("fc00::1", "a unique local (private) address"),
        ("fec0::1", "a site-local address"),
        ("192.0.0.8", "an IETF protocol assignment address"),  # the IPv4 dummy address
        ("192.0.0.170", "an IETF protocol assignment address"),  # NAT64 discovery
        ("192.0.2.1", "a documentation address"),
        ("198.18.0.1", "a benchmarking address"),
        ("192.88.99.1", "a 6to4 relay anycast address"),
        ("240.0.0.1", "a reserved address"),
        ("255.255.255.255", "a reserved address"),
        ("::ffff:10.0.0.1", "a private address"),  # IPv4-mapped: judged as its IPv4 address
        ("::ffff:0:a00:1", "an IPv4-translated address"),  # ::ffff:0:0:0/96, of 10.0.0.1
        ("::ffff:0:5db8:d822", "an IPv4-translated address"),  # even of a public address
        ("64:ff9b::a9fe:a9fe", "a link-local address"),  # NAT64 of 169.254.169.254
        ("64:ff9b::7f00:1", "a loopback address"),  # NAT64 of 127.0.0.1
        ("64:ff9b:1::a9fe:a9fe", "a local-use NAT64 address"),
        ("::127.0.0.1", "a reserved address"),  # IPv4-compatible, deprecated
        ("100::1", "a discard-only address"),
        ("2001::a9fe:a9fe", "an IETF protocol assignment address"),  # Teredo
        ("2001:db8::1", "a documentation address"),
        ("2002:a9fe:a9fe::", "a 6to4 address"),
        ("3fff::1", "a documentation address"),
        ("5f00::1", "a reserved address"),  # outside 2000::/3, the IPv6 global unicast space
    ],
)
async def test_non_public_addresses_are_refused_without_saying_where_a_name_points(
    address: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert refusal_reason(ip_address(address)) == reason
    resolver = StubResolver({"internal.example": [address]})
    caplog.set_level(logging.INFO, logger="server.service.images.guard")
    with pytest.raises(InvalidRequestError) as caught:
        await checked_address("internal.example", 80, ImagePolicy(), resolver, param="images[0].image_url")
    # The caller learns that the host is refused, not what the name points to inside.
    assert caught.value.message == f"image URL host 'internal.example' {NOT_ALLOWED}"
    assert caught.value.param == "images[0].image_url"
    # The operator's log says why.
    assert f"refused image URL host internal.example: it resolves to {reason} ({ip_address(address)})" in caplog.text


@pytest.mark.parametrize(
    "address",
    [
        PUBLIC_IP,
        "2606:4700::1111",
        "::ffff:93.184.216.34",  # IPv4-mapped public address: the packets go to 93.184.216.34
        "64:ff9b::5db8:d822",  # NAT64 of 93.184.216.34
    ],
)
def test_globally_reachable_addresses_pass(address: str) -> None:
    assert refusal_reason(ip_address(address)) is None


async def test_one_forbidden_address_among_public_ones_is_enough_to_refuse() -> None:
    resolver = StubResolver({"mixed.example": [PUBLIC_IP, "169.254.169.254"]})
    nothing = httpx.MockTransport(lambda request: pytest.fail(f"connected to {request.url}"))
    error = await refusal(["http://mixed.example/a.png"], ImagePolicy(), resolve=resolver, transport=nothing)
    assert error.message == f"image URL host 'mixed.example' {NOT_ALLOWED}"


async def test_public_addresses_pass_and_the_first_is_used() -> None:
    resolver = StubResolver({"cdn.example": [PUBLIC_IP, "2606:4700::1111"]})
    assert await checked_address("cdn.example", 443, ImagePolicy(), resolver, param="p") == PUBLIC_IP


async def test_hosts_outside_the_allowed_domains_are_not_even_resolved() -> None:
    resolver = StubResolver({"other.example": [PUBLIC_IP]})
    policy = ImagePolicy(allowed_domains=frozenset({"images.example"}))
    error = await refusal(["https://other.example/a.png"], policy, resolve=resolver)
    assert "not among the domains" in error.message
    assert resolver.asked == []


async def test_unresolvable_host_is_refused() -> None:
    error = await refusal(["http://nowhere.example/a.png"], ImagePolicy(), resolve=StubResolver({}))
    assert error.message == "image URL host 'nowhere.example' could not be resolved"


@pytest.mark.parametrize(
    "host", ["a..example", "a" * 64 + ".example", ".example"], ids=["empty-label", "label-over-63", "leading-dot"]
)
async def test_host_names_the_resolver_cannot_encode_are_refused(host: str) -> None:
    # The system resolver itself (no stub): its IDNA encoding is what used to fail with a 500.
    error = await refusal([f"http://{host}/x.png"], ImagePolicy())
    assert isinstance(error, InvalidRequestError) and error.param == "images[0].image_url"
    assert error.message == f"image URL host '{host}' is not a valid host name"


async def test_a_redirect_to_a_host_name_that_cannot_be_encoded_is_refused(web: ImageServer) -> None:
    error = await refusal([web.url("/redirect?to=http://a..example/x.png")])
    assert error.param == "images[0].image_url"
    assert error.message == "image URL host 'a..example' is not a valid host name"


async def test_blackholed_lookups_leave_the_default_executor_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name server that never answers ties up only the lookups' own threads: work on the
    default executor (tokenization, decoding, engine start-up) still runs, and each
    request still fails at its own deadline."""
    release = threading.Event()
    entered: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def blackholed(host: str, *args: object, **kwargs: object) -> object:
        if host != "blackholed.example":
            return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]
        entered.append(host)
        release.wait(60)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", blackholed)
    # More lookups than any default executor has threads (at most 32).
    patient = ImagePolicy(fetch_timeout=60)
    requests = [asyncio.create_task(refusal(["http://blackholed.example/a.png"], patient)) for _ in range(40)]
    try:
        # Every lookup thread is now stuck, and the other lookups wait for one.
        await asyncio.wait_for(_until(lambda: len(entered) >= LOOKUP_THREADS), 30)
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "ran"), 30) == "ran"
        assert len(entered) == LOOKUP_THREADS
        # A request whose lookup never answers fails at its deadline, the lookup still stuck.
        error = await refusal(["http://blackholed.example/a.png"], ImagePolicy(fetch_timeout=0.2))
        assert isinstance(error, InvalidRequestError) and error.param == "images"
        assert error.message == "reading the request's images took longer than this server's 0.2 s limit"
        assert not release.is_set()
    finally:
        release.set()
    for error in await asyncio.gather(*requests):
        assert error.message == "image URL host 'blackholed.example' could not be resolved"


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


# --- redirects: every hop is checked again --------------------------------------------------


def _via_public_name(web: ImageServer, table: dict[str, list[str]] | None = None) -> dict[str, object]:
    """images.example resolves to PUBLIC_IP, which the transport routes to ``web``: the guard stays on."""
    resolver = StubResolver({"images.example": [PUBLIC_IP], **(table or {})})
    return {"resolve": resolver, "transport": LocalOnlyTransport(public_port=web.port)}


async def test_redirect_to_a_public_host_is_followed(web: ImageServer) -> None:
    url = "http://images.example/redirect?to=http://images.example/img/noisy.png"
    [image] = await load([url], ImagePolicy(), **_via_public_name(web))
    assert image.size == (128, 128)


async def test_redirect_into_loopback_is_refused_without_connecting(web: ImageServer, probe: LoopbackProbe) -> None:
    web.hosts.clear()
    route = _via_public_name(web)
    error = await refusal(
        [f"http://images.example/redirect?to=http://127.0.0.1:{probe.port}/a.png"], ImagePolicy(), **route
    )
    assert error.message == f"image URL host '127.0.0.1' {NOT_ALLOWED}"
    assert web.hosts == ["images.example"]  # the first hop was really served, under its name
    assert route["transport"].hosts == [PUBLIC_IP]  # type: ignore[attr-defined]
    assert probe.connections() == 0


async def test_redirect_to_a_name_for_cloud_metadata_is_refused(web: ImageServer) -> None:
    route = _via_public_name(web, {"metadata.example": ["169.254.169.254"]})
    url = "http://images.example/redirect?to=http://metadata.example/latest"
    error = await refusal([url], ImagePolicy(), **route)
    assert error.message == f"image URL host 'metadata.example' {NOT_ALLOWED}"
    assert route["transport"].hosts == [PUBLIC_IP]  # type: ignore[attr-defined]


async def test_redirect_to_another_scheme_is_refused(web: ImageServer, tmp_path: Path) -> None:
    policy = ImagePolicy(allow_private_networks=True, file_root=tmp_path)
    (tmp_path / "a.png").write_bytes(PNG)
    error = await refusal([web.url(f"/redirect?to=file://{tmp_path}/a.png")], policy)
    assert error.message == "image URL redirected to a 'file:' URL"


async def test_redirect_loops_stop(web: ImageServer) -> None:
    error = await refusal([web.url("/redirect")])  # with no ?to=, it redirects to itself
    assert error.message == "image URL redirected more than 5 times"


# --- limits ---------------------------------------------------------------------------------


async def test_too_many_images() -> None:
    error = await refusal([data_uri(PNG)] * 3, max_images=2)
    assert isinstance(error, InvalidRequestError) and error.param == "images"
    assert "at most 2 image(s)" in error.message


@pytest.mark.parametrize("path", ["/img/noisy.png", "/stream/50000"], ids=["declared", "streamed"])
async def test_oversized_body_is_413(web: ImageServer, path: str) -> None:
    error = await refusal([web.url(path)], ImagePolicy(allow_private_networks=True, max_bytes=10_000))
    assert isinstance(error, PayloadTooLargeError)
    assert error.message == "image is larger than this server's limit of 10000 bytes"


async def test_oversized_data_uri_is_refused_before_decoding() -> None:
    policy = ImagePolicy(max_bytes=10_000)
    assert isinstance(await refusal([data_uri(NOISY_PNG)], policy), PayloadTooLargeError)
    # Not even valid base64, yet refused for its size: it was never decoded.
    assert isinstance(await refusal(["data:image/png;base64," + "!" * 20_000], policy), PayloadTooLargeError)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
async def test_too_many_pixels_is_refused_before_decoding() -> None:
    bomb = encode(PILImage.new("1", (10_000, 10_000)))
    assert len(bomb) < 50_000
    error = await refusal([data_uri(PNG), data_uri(bomb)])
    assert isinstance(error, PayloadTooLargeError) and error.param == "images[1].image_url"
    assert "is 10000x10000 pixels, over this server's limit of 40000000 pixels" in error.message


async def test_slow_server_hits_the_time_limit(web: ImageServer) -> None:
    error = await refusal([web.url("/slow/limit")], ImagePolicy(allow_private_networks=True, fetch_timeout=0.5))
    assert error.message == "reading the request's images took longer than this server's 0.5 s limit"
    assert "limit" not in web.slow_answered  # refused at the limit, not once the server answered


async def test_one_refused_image_fails_the_request_without_waiting_for_the_others(web: ImageServer) -> None:
    error = await refusal([web.url("/slow/other"), "ftp://example.com/a.png"], ImagePolicy(allow_private_networks=True))
    assert error.param == "images[1].image_url"
    assert "other" not in web.slow_answered  # refused without waiting for the slow one


# --- content --------------------------------------------------------------------------------


async def test_not_an_image() -> None:
    error = await refusal([data_uri(b"<html>hello</html>")])
    assert error.message == "images[0].image_url is not a PNG, JPEG, GIF, WEBP or BMP image"


async def test_format_outside_the_allowed_ones() -> None:
    error = await refusal([data_uri(encode(PILImage.new("RGB", (4, 4)), "TIFF"), "image/tiff")])
    assert "is not a PNG, JPEG, GIF, WEBP or BMP image" in error.message


async def test_truncated_image_names_its_index() -> None:
    error = await refusal([data_uri(PNG), data_uri(NOISY_PNG[: len(NOISY_PNG) // 2])])
    assert isinstance(error, InvalidRequestError) and error.param == "images[1].image_url"
    assert error.message.startswith("images[1].image_url is a broken or truncated image")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,iVBORw0KGgo*", "data: image URL holds malformed base64"),
        ("data:image/png,rawbytes", "a data: image URL must be base64"),
        ("ftp://example.com/a.png", "image URL must be an http, https or data: URL"),
        ("/a.png", "image URL must be an http, https or data: URL"),
    ],
)
async def test_malformed_urls(url: str, message: str) -> None:
    assert (await refusal([url])).message.startswith(message)


async def test_http_error_status(web: ImageServer) -> None:
    assert (await refusal([web.url("/img/missing.png")])).message == "image URL answered HTTP 404"


# --- file: ----------------------------------------------------------------------------------


async def test_file_urls_are_refused_by_default(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    error = await refusal([f"file://{tmp_path}/a.png"])
    assert "this server names no folder to read from" in error.message


async def test_file_urls_read_only_inside_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    (root / "link.png").symlink_to(outside / "secret.png")
    policy = ImagePolicy(file_root=root)
    [image] = await load([f"file://{root}/a.png"], policy)
    assert image.size == (32, 16)
    for url in (f"file://{outside}/secret.png", f"file://{root}/../outside/secret.png", f"file://{root}/link.png"):
        assert "outside the folder" in (await refusal([url], policy)).message, url
    assert "could not be opened" in (await refusal([f"file://{root}/missing.png"], policy)).message
    assert "local path" in (await refusal([f"file://elsewhere{root}/a.png"], policy)).message


@pytest.mark.parametrize("name", ["a%00.png", "a\0.png"], ids=["percent-encoded", "raw"])
async def test_a_nul_in_a_file_url_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    error = await refusal([f"file://{tmp_path}/{name}"], ImagePolicy(file_root=tmp_path))
    assert isinstance(error, InvalidRequestError) and error.param == "images[0].image_url"
    assert error.message == "a file: image URL must not hold a NUL character"


async def test_a_malformed_file_url_is_refused(tmp_path: Path) -> None:
    error = await refusal([f"file://[{tmp_path}/a.png"], ImagePolicy(file_root=tmp_path))
    assert isinstance(error, InvalidRequestError) and error.param == "images[0].image_url"
    assert error.message.startswith("file: image URL is malformed")


# --- settings -------------------------------------------------------------------------------


def test_policy_from_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert ImagePolicy.from_settings(Settings()) == ImagePolicy()
    monkeypatch.setenv("V4SERVE_IMAGE_FETCH_TIMEOUT", "2.5")
    monkeypatch.setenv("V4SERVE_IMAGE_MAX_BYTES", "1000")
    monkeypatch.setenv("V4SERVE_IMAGE_MAX_PIXELS", "500")
    monkeypatch.setenv("V4SERVE_IMAGE_DECODED_PIXELS", "2000")
    monkeypatch.setenv("V4SERVE_IMAGE_FORMATS", '["png", "jpeg"]')
    monkeypatch.setenv("V4SERVE_IMAGE_ALLOWED_DOMAINS", '["Images.Example."]')
    monkeypatch.setenv("V4SERVE_IMAGE_ALLOW_PRIVATE_NETWORKS", "true")
    monkeypatch.setenv("V4SERVE_IMAGE_FILE_ROOT", str(tmp_path))
    assert ImagePolicy.from_settings(Settings()) == ImagePolicy(
        fetch_timeout=2.5,
        max_bytes=1000,
        max_pixels=500,
        decoded_pixels=2000,
        formats=("PNG", "JPEG"),
        allowed_domains=frozenset({"images.example"}),
        allow_private_networks=True,
        file_root=tmp_path,
    )


def test_unknown_format_fails_at_start_up() -> None:
    with pytest.raises(ValueError, match="unknown image formats"):
        ImagePolicy(formats=("PNG", "NOPE"))
