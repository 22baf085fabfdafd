"""Scoped users of the object store, so that no workload holds MinIO's root keys (`nvae store init --users`).

Two users, each with its own policy built here as JSON: the sampler may only read the models under one prefix
of the bucket, the pipeline may read and write the whole bucket. The bucket job creates them through MinIO's
admin API (the `minio` SDK's `MinioAdmin`) with the root keys; plain S3 stores have no such API and make keys
with their own tools. Re-running converges: each policy is replaced, each user's secret reset and its policy
mapping set again. The users' keys come from the environment (the workloads' Secrets, docs in
k8s/base/store/secret.template.yaml); nothing here prints a secret.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from common.errors import StorageError
from common.s3 import (
    RETRYABLE_CODES,
    UNTRUSTED_HINT,
    ca_bundle_from_env,
    endpoint_from_env,
    is_untrusted_certificate,
    one_line,
    region_from_env,
)

SAMPLER_POLICY = "nvae-sampler-read"
PIPELINE_POLICY = "nvae-pipeline-readwrite"
DEFAULT_SAMPLER_PREFIX = "models/"  # where the sampler's MODEL_URI points (k8s/base/sampler/configmap.yaml)

# Role -> the variables holding its access key and secret key.
KEY_ENV = {
    "sampler": ("NVAE_SAMPLER_ACCESS_KEY", "NVAE_SAMPLER_SECRET_KEY"),
    "pipeline": ("NVAE_PIPELINE_ACCESS_KEY", "NVAE_PIPELINE_SECRET_KEY"),
}
MIN_ACCESS_KEY, MIN_SECRET_KEY = 3, 8  # MinIO refuses shorter keys

PIPELINE_BUCKET_ACTIONS = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
PIPELINE_OBJECT_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                           "s3:ListMultipartUploadParts"]  # fmt: skip


def sampler_policy(bucket: str, prefix: str = DEFAULT_SAMPLER_PREFIX) -> dict:
    """Read-only: get objects under `prefix` of `bucket` and list that prefix; an empty prefix means the
    whole bucket."""
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""  # 'models' must not match 'models-old/'
    only_prefix = {"StringLike": {"s3:prefix": [f"{prefix}*"]}} if prefix else None
    return _policy(
        _allow("ReadModels", ["s3:GetObject"], f"arn:aws:s3:::{bucket}/{prefix}*"),
        _allow("ListModels", ["s3:ListBucket"], f"arn:aws:s3:::{bucket}", only_prefix),
    )


def pipeline_policy(bucket: str) -> dict:
    """Read-write on `bucket`: objects, listings and multipart uploads; nothing on other buckets, no bucket
    settings (lifecycle, policy, deletion)."""
    return _policy(
        _allow("Bucket", PIPELINE_BUCKET_ACTIONS, f"arn:aws:s3:::{bucket}"),
        _allow("Objects", PIPELINE_OBJECT_ACTIONS, f"arn:aws:s3:::{bucket}/*"),
    )


def _policy(*statements: dict) -> dict:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def _allow(sid: str, actions: list[str], resource: str, condition: dict | None = None) -> dict:
    statement = {"Sid": sid, "Effect": "Allow", "Action": list(actions), "Resource": [resource]}
    if condition:
        statement["Condition"] = condition
    return statement


@dataclass(frozen=True)
class ScopedUser:
    """One workload's identity in the store: its keys and the policy it gets."""

    role: str
    access_key: str
    secret_key: str = field(repr=False)
    policy_name: str
    policy: dict


def users_from_env(bucket: str, sampler_prefix: str = DEFAULT_SAMPLER_PREFIX, env=None) -> list[ScopedUser]:
    """The sampler's and the pipeline's users, keys from NVAE_{SAMPLER,PIPELINE}_{ACCESS,SECRET}_KEY; every
    missing or unusable key is an error naming its variable, raised before the store is touched."""
    env = os.environ if env is None else env
    keys = {}
    for role, (access_var, secret_var) in KEY_ENV.items():
        for var in (access_var, secret_var):
            if not env.get(var):
                raise StorageError(
                    f"{var} is not set: the {role} user's key (from the nvae-s3-{role} Secret)"
                )
        access, secret = env[access_var], env[secret_var]
        if len(access) < MIN_ACCESS_KEY or re.search(r"[=,\s]", access):
            raise StorageError(f"{access_var}: at least {MIN_ACCESS_KEY} characters, no '=', ',' or spaces")
        if len(secret) < MIN_SECRET_KEY:
            raise StorageError(f"{secret_var}: at least {MIN_SECRET_KEY} characters")
        if access == env.get("AWS_ACCESS_KEY_ID"):
            raise StorageError(f"{access_var} is the root key AWS_ACCESS_KEY_ID: give the {role} its own")
        keys[role] = (access, secret)
    if keys["sampler"][0] == keys["pipeline"][0]:
        raise StorageError("NVAE_SAMPLER_ACCESS_KEY and NVAE_PIPELINE_ACCESS_KEY must differ")
    return [
        ScopedUser("sampler", *keys["sampler"], SAMPLER_POLICY, sampler_policy(bucket, sampler_prefix)),
        ScopedUser("pipeline", *keys["pipeline"], PIPELINE_POLICY, pipeline_policy(bucket)),
    ]


def admin_client_from_env(retries: int = 3):
    """A `minio.MinioAdmin` for the endpoint and root keys in the environment (the bucket job's
    nvae-s3-credentials), over TLS for an https:// endpoint, trusting AWS_CA_BUNDLE's CA when it is set.
    `retries`: further tries on connection errors and 5xx, never on an untrusted certificate."""
    try:
        import certifi
        import urllib3
        from minio import MinioAdmin
        from minio.credentials import StaticProvider
    except ModuleNotFoundError as exc:
        raise StorageError(
            f"--users needs the minio SDK (pip install 'nvae-pipeline[mlops]'): {exc}"
        ) from None
    endpoint = endpoint_from_env()
    if endpoint is None:
        raise StorageError("AWS_ENDPOINT_URL is not set: users are made through a MinIO server's admin API")
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname or url.path.strip("/"):
        raise StorageError(f"AWS_ENDPOINT_URL={endpoint}: expected http(s)://host[:port]")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if not os.environ.get(var):
            raise StorageError(f"{var} is not set: the store's root key makes the users")
    credentials = StaticProvider(
        os.environ["AWS_ACCESS_KEY_ID"],
        os.environ["AWS_SECRET_ACCESS_KEY"],
        os.environ.get("AWS_SESSION_TOKEN"),
    )
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10, read=60),
        cert_reqs="CERT_REQUIRED",
        ca_certs=ca_bundle_from_env() or os.environ.get("SSL_CERT_FILE") or certifi.where(),
        # other=0: a TLS failure is not a connection error and is not retried; raise_on_status=False: after
        # the last 5xx the server's own error reaches the message.
        retries=urllib3.Retry(
            total=retries,
            other=0,
            backoff_factor=0.5,
            raise_on_status=False,
            status_forcelist=(500, 502, 503, 504),
        ),
    )
    return MinioAdmin(
        endpoint=url.netloc,
        credentials=credentials,
        region=region_from_env(),
        secure=url.scheme == "https",
        http_client=http,
    )


def ensure_users(users: list[ScopedUser], admin=None) -> list[str]:
    """Create or update each user's policy, the user (its secret reset) and the user's policy mapping.
    Idempotent; returns what it did, one line each, without secrets."""
    admin = admin or admin_client_from_env()
    _require_admin_api(admin)
    done = []
    for user in users:
        _admin_call(
            f"cannot add policy {user.policy_name}", admin.policy_add, user.policy_name, policy=user.policy
        )
        _admin_call(f"cannot add user {user.access_key}", admin.user_add, user.access_key, user.secret_key)
        _admin_call(
            f"cannot attach policy {user.policy_name} to user {user.access_key}",
            admin.policy_set,
            user.policy_name,
            user=user.access_key,
        )
        done.append(f"user {user.access_key} ({user.role}): policy {user.policy_name}")
    return done


def _require_admin_api(admin) -> None:
    """Ask the server who it is before writing anything. A plain S3 store takes the admin API's paths as
    object keys: SeaweedFS, for one, answers a PUT of /minio/admin/v3/add-user by creating a bucket `minio`
    and storing the request body in it, with 200, so without this check `--users` would report users that
    do not exist. MinIO answers GET /minio/admin/v3/info with its server info as a JSON object."""
    text = _admin_call("cannot read the server info", admin.info)
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    if not isinstance(info, dict) or not ({"mode", "deploymentID"} & set(info)):
        raise StorageError(
            f"{endpoint_from_env()} has no MinIO admin API (its /minio/admin/v3/info is not MinIO's server "
            "info); run `nvae store init` without --users and make the scoped keys with the store's own tools"
        )


def _admin_call(what: str, fn, *args, **kwargs):
    """Run one admin request, turning its failures into a one-line StorageError."""
    from minio.error import MinioAdminException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except MinioAdminException as exc:
        raise _admin_error(what, exc) from None
    except HTTPError as exc:
        if is_untrusted_certificate(exc):
            raise StorageError(one_line(f"{what}: {UNTRUSTED_HINT}: {_cause(exc)}")) from None
        raise StorageError(
            one_line(f"{what}: cannot reach {endpoint_from_env()}: {_cause(exc)}"), True
        ) from None


def _admin_error(what: str, exc) -> StorageError:
    """MinIO's admin API answers errors as JSON ({"Code", "Message"}); an S3 store without that API answers
    the same path as an S3 request, with XML or nothing."""
    status = int(exc._code) if str(exc._code).isdigit() else 0
    try:
        body = json.loads(exc._body)
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict):
        code, message = body.get("Code", ""), body.get("Message", "")
        retryable = status >= 500 or status == 429 or code in RETRYABLE_CODES
        return StorageError(one_line(f"{what}: HTTP {status} {code}: {message}"), retryable)
    found = re.search(r"<Code>(.*?)</Code>", exc._body or "")
    code = found[1] if found else ""
    if status >= 500 or status == 429:  # a proxy in front of a store still starting
        return StorageError(one_line(f"{what}: HTTP {status} {code}"), True)
    return StorageError(
        one_line(
            f"{what}: {endpoint_from_env()} has no MinIO admin API (HTTP {status} {code}); run "
            "`nvae store init` without --users and make the scoped keys with the store's own tools"
        )
    )


def _cause(exc: BaseException) -> str:
    """The innermost reason of a urllib3 failure ('Connection refused', 'certificate verify failed: ...')."""
    reason = getattr(exc, "reason", None)
    while isinstance(getattr(reason, "reason", None), BaseException):
        reason = reason.reason
    reason = reason if isinstance(reason, BaseException) else exc
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason).rpartition(">: ")[2]  # urllib3 prefixes '<HTTPConnection object at 0x...>: '
