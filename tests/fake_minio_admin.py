"""A fake of MinIO's admin API for `nvae store init --users`, in front of a real S3 server.

MinIO's server cannot be installed here, and no other store has MinIO's admin API. This fake holds only what
that path needs: the admin calls `ensure_users` makes (info, to know it talks to MinIO; add-canned-policy,
add-user and set-user-or-group-policy), kept in memory. Each admin request is checked as MinIO checks it: signed (AWS
SigV4) by the root key with its secret, with a payload hash that matches the body, and the add-user body
decrypts with the root secret through the SDK's own `minio.crypto`. Every other request goes unchanged,
Host header and signature included, to the S3 upstream (the test run's SeaweedFS server), which checks its
signature itself: the fake's root keys must be the upstream's. The fake serves HTTP or TLS on loopback.
Importable from any test module (pytest's `pythonpath` includes tests/).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import io
import ipaddress
import json
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

ADMIN_PREFIX = "/minio/admin/v3/"
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]*)/s3/aws4_request,\s*"
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+),\s*Signature=(?P<signature>[0-9a-f]{64})"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "upgrade"}


class FakeMinio:
    """`with FakeMinio(root_access, root_secret, s3_upstream=url) as store: store.endpoint_url`.

    State, for assertions: `policies` {name: document}, `users` {access key: {"secretKey", "status",
    "policies"}}, `admin_calls` [(method, path?query)] in order. `fail_admin` = (status, code) makes every
    admin call answer that error (503 "XMinioServerNotInitialized": a MinIO still starting)."""

    def __init__(self, root_access_key: str, root_secret_key: str, s3_upstream: str, tls=None):
        self.root_access_key, self.root_secret_key = root_access_key, root_secret_key
        self.s3_upstream, self.tls = s3_upstream, tls
        self.policies: dict[str, dict] = {}
        self.users: dict[str, dict] = {}
        self.admin_calls: list[tuple[str, str]] = []
        self.fail_admin: tuple[int, str] | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> FakeMinio:
        fake = self

        class Handler(_Handler):
            store = fake

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:  # the handshake happens in the handler's thread, on the first read
            self._server.socket = self.tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeMinio:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        port = self._server.server_address[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    # --- the admin API -----------------------------------------------------------------------------------

    def authenticate(self, method: str, target: str, headers, body: bytes) -> tuple[int, str, str] | None:
        """None for an admin request correctly signed by the root key, else (status, code, message)."""
        found = _AUTH.fullmatch(headers.get("Authorization", ""))
        if not found:
            return 403, "AccessDenied", "Access Denied: no AWS4-HMAC-SHA256 Authorization header"
        if found["key"] != self.root_access_key:
            return 403, "InvalidAccessKeyId", "The Access Key Id you provided does not exist in our records."
        payload_hash = headers.get("x-amz-content-sha256", "")
        if payload_hash != hashlib.sha256(body).hexdigest():  # the SDK signs admin payloads
            return 400, "XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' does not match"
        url = urlsplit(target)
        query = sorted(
            (quote(k, safe="-_.~"), quote(v, safe="-_.~"))
            for k, v in parse_qsl(url.query, keep_blank_values=True)
        )
        canonical = "\n".join(
            [
                method,
                url.path,
                "&".join(f"{k}={v}" for k, v in query),
                *(f"{h}:{' '.join(headers.get(h, '').split())}" for h in found["signed"].split(";")),
                "",
                found["signed"],
                payload_hash,
            ]
        )
        scope = f"{found['date']}/{found['region']}/s3/aws4_request"
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                headers.get("x-amz-date", ""),
                scope,
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        signing_key = ("AWS4" + self.root_secret_key).encode()
        for part in (found["date"], found["region"], "s3", "aws4_request"):
            signing_key = hmac.new(signing_key, part.encode(), hashlib.sha256).digest()
        expected = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, found["signature"]):
            return (
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        return None

    def admin(self, method: str, target: str, body: bytes) -> tuple[int, dict]:
        """One authenticated admin call -> (status, JSON body)."""
        url = urlsplit(target)
        command, q = url.path[len(ADMIN_PREFIX) :], dict(parse_qsl(url.query, keep_blank_values=True))
        with self._lock:
            self.admin_calls.append((method, target))
            if self.fail_admin:
                return self.fail_admin[0], _error(self.fail_admin[1], "fake failure", url.path)
            handler = {
                ("PUT", "add-canned-policy"): self._add_policy,
                ("PUT", "add-user"): self._add_user,
                ("PUT", "set-user-or-group-policy"): self._set_policy,
                ("GET", "info"): lambda q, b: (200, {"mode": "online", "deploymentID": "fake-minio"}),
            }.get((method, command))
            if handler is None:
                return 400, _error("XMinioAdminNotImplemented", f"fake: {method} {command}", url.path)
            return handler(q, body)

    def _add_policy(self, q: dict, body: bytes) -> tuple[int, dict]:
        try:
            doc = json.loads(body)
            assert doc["Version"] == "2012-10-17" and doc["Statement"]
        except (ValueError, KeyError, AssertionError):
            return 400, _error(
                "XMinioMalformedJSON", "The JSON you provided was not well-formed", q.get("name")
            )
        self.policies[q["name"]] = doc
        return 200, {}

    def _add_user(self, q: dict, body: bytes) -> tuple[int, dict]:
        from minio.crypto import decrypt  # the SDK's own AEAD reader: what a MinIO server would decrypt

        if q.get("accessKey") == self.root_access_key:
            return 400, _error("XMinioAdminInvalidArgument", "Invalid arguments specified.", "add-user")
        try:
            plain = json.loads(decrypt(_Body(body), self.root_secret_key))
        except Exception as exc:  # a body encrypted with another secret fails its AEAD tag
            return 400, _error("XMinioAdminConfigBadJSON", f"cannot decrypt: {exc!r}", "add-user")
        user = self.users.setdefault(q["accessKey"], {"policies": []})
        user.update(secretKey=plain["secretKey"], status=plain["status"])
        return 200, {}

    def _set_policy(self, q: dict, body: bytes) -> tuple[int, dict]:
        names = [n for n in q.get("policyName", "").split(",") if n]
        if q.get("isGroup") != "false":
            return 400, _error(
                "XMinioAdminNotImplemented", "groups are not faked", "set-user-or-group-policy"
            )
        if q.get("userOrGroup") not in self.users:
            return 404, _error(
                "XMinioAdminNoSuchUser", "The specified user does not exist.", q.get("userOrGroup")
            )
        if missing := [n for n in names if n not in self.policies]:
            return 404, _error("XMinioAdminNoSuchPolicy", "The canned policy does not exist.", missing[0])
        self.users[q["userOrGroup"]]["policies"] = names
        return 200, {}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client hanging up mid-TLS is no news
        pass


def _error(code: str, message: str, resource) -> dict:
    return {"Code": code, "Message": message, "Resource": str(resource), "RequestId": "FAKE"}


class _Body(io.BytesIO):
    """A request body where `minio.crypto.decrypt` expects a urllib3 response."""

    def release_conn(self) -> None:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: FakeMinio

    def log_message(self, *args) -> None:  # quiet
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ssl.SSLError, ConnectionError):  # a client that distrusts our certificate hangs up
            self.close_connection = True

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._reply(501, b"", {})  # not needed by the clients under test
        body = self.rfile.read(length) if length else b""
        if not urlsplit(self.path).path.startswith(ADMIN_PREFIX):
            return self._forward(body)
        failure = self.store.authenticate(self.command, self.path, self.headers, body)
        status, doc = (
            (failure[0], _error(*failure[1:], self.path))
            if failure
            else self.store.admin(self.command, self.path, body)
        )
        self._reply(status, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

    def _forward(self, body: bytes) -> None:
        up = urlsplit(self.store.s3_upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}  # Host as signed
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP | {"content-length"}}
            if self.command == "HEAD":  # no body, but the length of the object it describes
                out["Content-Length"] = resp.getheader("Content-Length", "0")
            self._reply(resp.status, data, out)
        finally:
            conn.close()

    def _reply(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def make_tls(directory: Path, hosts=("127.0.0.1", "localhost")) -> tuple[Path, ssl.SSLContext]:
    """A private CA and a server certificate it signs for `hosts`: (the CA's PEM path, a server SSLContext)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, issuer, public_key, signing_key, ca: bool, sans=()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
            )
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            names = [
                x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in sans
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False).add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("nvae test CA", "nvae test CA", ca_key.public_key(), ca_key, ca=True)
    server_cert = cert("minio", "nvae test CA", server_key.public_key(), ca_key, ca=False, sans=hosts)
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    (directory / "public.crt").write_bytes(server_cert.public_bytes(pem))
    (directory / "private.key").write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(directory / "public.crt", directory / "private.key")
    return directory / "ca.crt", ctx
