"""A fake MinIO for tests: MinIO's admin API for users and policies, kept in memory, and the S3 API forwarded to
a moto server, on one loopback endpoint, over HTTP or TLS. MinIO's server cannot be installed here and moto
has no admin API.

It checks what a MinIO server checks of the requests the `minio` SDK and boto3 send:
- every request is signed (AWS SigV4) by a known key with its secret, and the signed payload hash matches the
  body; the admin API accepts only the root key;
- the bodies the SDK encrypts (add-user) decrypt with the root secret, with the SDK's own `minio.crypto`;
- a scoped user's S3 request is allowed or denied (403 AccessDenied) by that user's policies, with a small
  evaluator (`allows`: Allow statements, `*` wildcards, the `s3:prefix` StringLike condition), so a test can
  show what each user can and cannot do. The root key may do anything.
Only the admin calls `nvae store init --users` makes are implemented: add-canned-policy, add-user and
set-user-or-group-policy (plus info-canned-policy and user-info, to read back). Other admin paths answer 400.
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
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

ADMIN_PREFIX = "/minio/admin/v3/"
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]*)/s3/aws4_request,\s*"
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+),\s*Signature=(?P<signature>[0-9a-f]{64})"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "upgrade"}


class FakeMinio:
    """`with FakeMinio(root_access, root_secret, s3_upstream=moto_url) as store: store.endpoint_url`.

    State, for assertions: `policies` {name: document}, `users` {access key: {"secretKey", "status",
    "policies"}}, `admin_calls` [(method, path?query)] in order. `fail_admin` = (status, code) makes every
    admin call answer that error (503 "XMinioServerNotInitialized": a MinIO still starting). Without
    `admin_api`, admin paths go to the S3 upstream like any other request: a plain S3 store. Without
    `check_s3_auth`, S3 requests pass unchecked, as moto passes them."""

    def __init__(
        self,
        root_access_key: str,
        root_secret_key: str,
        s3_upstream: str | None = None,
        tls: ssl.SSLContext | None = None,
        admin_api: bool = True,
        check_s3_auth: bool = True,
    ):
        self.root_access_key, self.root_secret_key = root_access_key, root_secret_key
        self.s3_upstream, self.tls, self.admin_api = s3_upstream, tls, admin_api
        self.check_s3_auth = check_s3_auth
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

    # --- authentication ----------------------------------------------------------------------------------

    def authenticate(self, method: str, target: str, headers, body: bytes) -> tuple[str | None, tuple | None]:
        """(access key, None) for a correctly signed request, else (None, (status, code, message))."""
        found = _AUTH.fullmatch(headers.get("Authorization", ""))
        if not found:
            return None, (403, "AccessDenied", "Access Denied: no AWS4-HMAC-SHA256 Authorization header")
        key = found["key"]
        with self._lock:
            secret = (
                self.root_secret_key
                if key == self.root_access_key
                else self.users.get(key, {}).get("secretKey")
            )
        if secret is None:
            return None, (
                403,
                "InvalidAccessKeyId",
                "The Access Key Id you provided does not exist in our records.",
            )
        payload_hash = headers.get("x-amz-content-sha256", "")
        signed_payload = not payload_hash.startswith(("UNSIGNED-PAYLOAD", "STREAMING-"))
        if signed_payload and payload_hash != hashlib.sha256(body).hexdigest():
            return None, (
                400,
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' does not match",
            )
        url = urlsplit(target)
        query = sorted(
            (quote(k, safe="-_.~"), quote(v, safe="-_.~"))
            for k, v in parse_qsl(url.query, keep_blank_values=True)
        )
        signed = found["signed"].split(";")
        canonical = "\n".join(
            [
                method,
                url.path or "/",
                "&".join(f"{k}={v}" for k, v in query),
                *(f"{h}:{' '.join(headers.get(h, '').split())}" for h in signed),
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
        signing_key = ("AWS4" + secret).encode()
        for part in (found["date"], found["region"], "s3", "aws4_request"):
            signing_key = hmac.new(signing_key, part.encode(), hashlib.sha256).digest()
        expected = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, found["signature"]):
            return None, (
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        return key, None

    # --- the admin API -----------------------------------------------------------------------------------

    def admin(self, method: str, target: str, key: str, body: bytes) -> tuple[int, dict]:
        """One admin call by an authenticated key -> (status, JSON body)."""
        url = urlsplit(target)
        command, q = url.path[len(ADMIN_PREFIX) :], dict(parse_qsl(url.query, keep_blank_values=True))
        with self._lock:
            self.admin_calls.append((method, target))
            if self.fail_admin:
                return self.fail_admin[0], _error(self.fail_admin[1], "fake failure", url.path)
            if key != self.root_access_key:
                return 403, _error("AccessDenied", "Access Denied.", url.path)
            handler = {
                ("PUT", "add-canned-policy"): self._add_policy,
                ("PUT", "add-user"): self._add_user,
                ("PUT", "set-user-or-group-policy"): self._set_policy,
                ("GET", "info-canned-policy"): lambda q, b: (200, self.policies.get(q.get("name"), {})),
                ("GET", "user-info"): lambda q, b: (200, self.users.get(q.get("accessKey"), {})),
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

    # --- the S3 API --------------------------------------------------------------------------------------

    def s3_allowed(self, key: str, method: str, target: str) -> bool:
        if key == self.root_access_key:
            return True
        action, resource, prefix = s3_action(method, target)
        with self._lock:
            names = self.users.get(key, {}).get("policies", [])
            return any(allows(self.policies.get(n, {}), action, resource, prefix) for n in names)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client hanging up mid-TLS is no news
        pass


def _error(code: str, message: str, resource) -> dict:
    return {"Code": code, "Message": message, "Resource": str(resource), "RequestId": "FAKE"}


class _Body(io.BytesIO):
    """A request body where `minio.crypto.decrypt` expects a urllib3 response."""

    def release_conn(self) -> None:
        pass


def s3_action(method: str, target: str) -> tuple[str, str, str | None]:
    """The IAM action, resource ARN and listing prefix of an S3 REST request (the subset boto3 uses here)."""
    url = urlsplit(target)
    bucket, _, key = unquote(url.path).lstrip("/").partition("/")
    q = dict(parse_qsl(url.query, keep_blank_values=True))
    if not bucket:
        return "s3:ListAllMyBuckets", "arn:aws:s3:::*", None
    arn = f"arn:aws:s3:::{bucket}"
    if not key:
        if "lifecycle" in q:
            return (
                ("s3:PutLifecycleConfiguration" if method == "PUT" else "s3:GetLifecycleConfiguration"),
                arn,
                None,
            )
        if "uploads" in q:
            return "s3:ListBucketMultipartUploads", arn, None
        if "location" in q:
            return "s3:GetBucketLocation", arn, None
        if "delete" in q and method == "POST":
            return "s3:DeleteObject", f"{arn}/*", None
        action = {"PUT": "s3:CreateBucket", "DELETE": "s3:DeleteBucket"}.get(method, "s3:ListBucket")
        return action, arn, q.get("prefix", "")
    obj = f"{arn}/{key}"
    if method in ("GET", "HEAD"):
        return ("s3:ListMultipartUploadParts" if "uploadId" in q else "s3:GetObject"), obj, None
    if method == "DELETE":
        return ("s3:AbortMultipartUpload" if "uploadId" in q else "s3:DeleteObject"), obj, None
    return "s3:PutObject", obj, None  # PUT, multipart POSTs


def allows(policy: dict, action: str, resource: str, prefix: str | None = None) -> bool:
    """Whether an identity policy allows `action` on `resource`: an Allow statement whose actions and
    resources match (`*` spans anything) and whose conditions hold (only StringLike on s3:prefix is known;
    any other condition fails closed). A matching Deny wins."""

    def as_list(v):
        return v if isinstance(v, list) else [v]

    def matches(st) -> bool:
        if not any(fnmatchcase(action, a) for a in as_list(st.get("Action", []))):
            return False
        if not any(fnmatchcase(resource, r) for r in as_list(st.get("Resource", []))):
            return False
        for operator, keys in st.get("Condition", {}).items():
            for name, values in keys.items():
                if operator != "StringLike" or name != "s3:prefix" or prefix is None:
                    return False
                if not any(fnmatchcase(prefix, v) for v in as_list(values)):
                    return False
        return True

    statements = as_list(policy.get("Statement", []))
    if any(st.get("Effect") == "Deny" and matches(st) for st in statements):
        return False
    return any(st.get("Effect") == "Allow" and matches(st) for st in statements)


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
        store = self.store
        admin = urlsplit(self.path).path.startswith(ADMIN_PREFIX) and store.admin_api
        if not admin and not store.check_s3_auth:
            return self._forward(body)
        key, failure = store.authenticate(self.command, self.path, self.headers, body)
        if failure:
            return self._error(*failure, json_body=admin)
        if admin:
            status, doc = store.admin(self.command, self.path, key, body)
            return self._reply(status, json.dumps(doc).encode(), {"Content-Type": "application/json"})
        if not store.s3_allowed(key, self.command, self.path):
            return self._error(403, "AccessDenied", "Access Denied.", json_body=False)
        self._forward(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

    def _forward(self, body: bytes) -> None:
        if self.store.s3_upstream is None:
            return self._error(404, "NoSuchBucket", "The specified bucket does not exist", json_body=False)
        up = urlsplit(self.store.s3_upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
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

    def _error(self, status: int, code: str, message: str, json_body: bool) -> None:
        if json_body:  # MinIO's admin API answers JSON
            body, ctype = json.dumps(_error(code, message, self.path)).encode(), "application/json"
        else:  # S3 answers XML
            body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
            ctype = "application/xml"
        self._reply(status, body, {"Content-Type": ctype})

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
