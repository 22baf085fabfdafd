"""`nvae store init --users`: scoped users and policies through MinIO's admin API, and the store over TLS.

MinIO's server cannot be installed here. Its admin API is `FakeMinio` (tests/fake_minio_admin.py): the
admin calls `--users` makes, checking the root key's signature and decrypting the SDK's encrypted bodies. Every S3
request goes through it unchanged to the test run's real SeaweedFS server, which checks the signatures. What
each scoped user may do is MinIO's to enforce, by the policy documents asserted here; the same scopes on
SeaweedFS, enforced by the real server, are in test_seaweedfs_identities."""

from __future__ import annotations

import os
import uuid

import pytest
from fake_minio_admin import FakeMinio, make_tls

from cli.main import main
from common.errors import StorageError
from common.s3 import ensure_bucket, s3_client_from_env
from common.store_admin import (
    PIPELINE_POLICY,
    SAMPLER_POLICY,
    admin_client_from_env,
    ensure_users,
    pipeline_policy,
    sampler_policy,
    users_from_env,
)

KEYS = {
    "NVAE_SAMPLER_ACCESS_KEY": "nvae-sampler",
    "NVAE_SAMPLER_SECRET_KEY": "sampler-secret-1",
    "NVAE_PIPELINE_ACCESS_KEY": "nvae-pipeline",
    "NVAE_PIPELINE_SECRET_KEY": "pipeline-secret-1",
}


@pytest.fixture
def clean_env(monkeypatch):
    """No AWS_*, NVAE_*, proxy or CA variables from the host (this one sets AWS_CA_BUNDLE system-wide), and a
    fresh boto3 default session: it caches the first credentials it finds, and these tests switch keys."""
    import boto3

    for var in list(os.environ):
        if var.startswith(("AWS_", "NVAE_")) or "proxy" in var.lower():
            monkeypatch.delenv(var)
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _point_at(monkeypatch, endpoint_url: str, access: str, secret: str) -> None:
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    for var, value in KEYS.items():
        monkeypatch.setenv(var, value)


def _fake_minio(s3_server, **kwargs) -> FakeMinio:
    """The admin API with SeaweedFS's root keys as MinIO's root keys, SeaweedFS behind it for S3."""
    return FakeMinio(
        s3_server["access_key"], s3_server["secret_key"], s3_upstream=s3_server["endpoint_url"], **kwargs
    )


@pytest.fixture
def minio(s3_server, clean_env, monkeypatch):
    """A FakeMinio over HTTP; the environment holds its root keys and the users' keys, as the bucket job's
    does."""
    with _fake_minio(s3_server) as store:
        _point_at(monkeypatch, store.endpoint_url, store.root_access_key, store.root_secret_key)
        yield store


def _bucket() -> str:
    return f"nvae-{uuid.uuid4().hex[:12]}"


def _init(capsys, *args: str) -> tuple[int, str, str]:
    """`nvae store init ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        rc = main(["store", "init", *args])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvae store: error: "), err
    return lines[0]


# --- the policy documents: what MinIO enforces for each workload ---------------------------------------------


def test_sampler_policy_gets_and_lists_the_models_prefix_only():
    assert sampler_policy("nvae") == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ReadModels",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": ["arn:aws:s3:::nvae/models/*"],
            },
            {
                "Sid": "ListModels",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": ["arn:aws:s3:::nvae"],
                "Condition": {"StringLike": {"s3:prefix": ["models/*"]}},
            },
        ],
    }
    # The prefix is normalised to one folder with its slash, so 'models' never matches 'models-old/'.
    assert sampler_policy("nvae", "models") == sampler_policy("nvae", "/models/") == sampler_policy("nvae")
    # An empty prefix is the whole bucket: no listing condition.
    whole = sampler_policy("nvae", "")
    assert whole["Statement"][0]["Resource"] == ["arn:aws:s3:::nvae/*"]
    assert "Condition" not in whole["Statement"][1]


def test_pipeline_policy_reads_and_writes_the_bucket_and_no_bucket_settings():
    assert pipeline_policy("nvae") == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Bucket",
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"],
                "Resource": ["arn:aws:s3:::nvae"],
            },
            {
                "Sid": "Objects",
                "Effect": "Allow",
                "Action": [
                    "s3:GetObject",
                    "s3:PutObject",
                    "s3:DeleteObject",
                    "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts",
                ],
                "Resource": ["arn:aws:s3:::nvae/*"],
            },
        ],
    }


# --- nvae store init --users ---------------------------------------------------------------------------------


def test_init_users_creates_each_user_with_its_own_policy(minio, capsys):
    bucket = _bucket()
    rc, out, err = _init(capsys, "--bucket", bucket, "--users")
    assert rc == 0, err
    assert f"bucket {bucket} created" in out
    assert "user nvae-sampler (sampler): policy nvae-sampler-read" in out
    assert "user nvae-pipeline (pipeline): policy nvae-pipeline-readwrite" in out
    assert not any(secret in out + err for secret in (KEYS["NVAE_SAMPLER_SECRET_KEY"], minio.root_secret_key))
    # What the server stored, after decrypting the SDK's add-user bodies with the root secret.
    assert minio.policies == {
        SAMPLER_POLICY: sampler_policy(bucket),
        PIPELINE_POLICY: pipeline_policy(bucket),
    }
    assert minio.users == {
        "nvae-sampler": {"secretKey": "sampler-secret-1", "status": "enabled", "policies": [SAMPLER_POLICY]},
        "nvae-pipeline": {
            "secretKey": "pipeline-secret-1",
            "status": "enabled",
            "policies": [PIPELINE_POLICY],
        },
    }
    assert [path.split("?")[0] for _, path in minio.admin_calls] == ["/minio/admin/v3/info"] + 2 * [
        "/minio/admin/v3/add-canned-policy",
        "/minio/admin/v3/add-user",
        "/minio/admin/v3/set-user-or-group-policy",
    ]
    # The bucket part, on the real store: the abort rule for incomplete multipart uploads.
    (rule,) = s3_client_from_env().get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1


def test_without_users_the_admin_api_is_not_touched(minio, capsys):
    rc, _, err = _init(capsys, "--bucket", _bucket())
    assert rc == 0, err
    assert minio.admin_calls == [] and minio.users == {}


def test_rerunning_is_idempotent_and_resets_a_changed_secret(minio, capsys, monkeypatch):
    bucket = _bucket()
    assert _init(capsys, "--bucket", bucket, "--users")[0] == 0
    first = (dict(minio.policies), {k: dict(v) for k, v in minio.users.items()})
    rc, out, err = _init(capsys, "--bucket", bucket, "--users")
    assert rc == 0, err
    assert f"bucket {bucket} exists" in out
    assert (minio.policies, minio.users) == first

    monkeypatch.setenv("NVAE_SAMPLER_SECRET_KEY", "sampler-secret-2")  # the Secret was rotated
    assert _init(capsys, "--bucket", bucket, "--users")[0] == 0
    assert minio.users["nvae-sampler"]["secretKey"] == "sampler-secret-2"
    assert minio.users["nvae-sampler"]["policies"] == [SAMPLER_POLICY]
    assert len(minio.users) == 2 and len(minio.policies) == 2


@pytest.mark.parametrize(
    ("wrong", "code"), [("access", "InvalidAccessKeyId"), ("secret", "SignatureDoesNotMatch")]
)
def test_a_bad_admin_key_is_refused_and_named(s3_server, clean_env, monkeypatch, wrong, code):
    with _fake_minio(s3_server) as store:
        access, secret = store.root_access_key, store.root_secret_key
        _point_at(
            monkeypatch,
            store.endpoint_url,
            "not-the-root" if wrong == "access" else access,
            "wrong-secret-0" if wrong == "secret" else secret,
        )
        users = users_from_env("nvae", env={**KEYS, "AWS_ACCESS_KEY_ID": access})
        with pytest.raises(StorageError) as err:
            ensure_users(users, admin_client_from_env(retries=0))
    assert f"cannot read the server info: HTTP 403 {code}" in str(err.value)
    assert "\n" not in str(err.value) and not err.value.retryable
    assert store.users == {} and store.policies == {}


def test_a_bad_root_key_against_a_checking_store_fails_at_the_bucket(minio, capsys, monkeypatch):
    """SeaweedFS, behind the admin API, checks the S3 signature itself."""
    _point_at(monkeypatch, minio.endpoint_url, minio.root_access_key, "wrong-secret-0")
    rc, _, err = _init(capsys, "--bucket", _bucket(), "--users")
    assert rc == 2
    assert "cannot set up the bucket" in _assert_one_line_error(err)
    assert minio.admin_calls == []


@pytest.mark.parametrize("var", sorted(KEYS))
def test_a_missing_user_key_names_its_variable_before_touching_the_store(minio, capsys, monkeypatch, var):
    monkeypatch.delenv(var)
    bucket = _bucket()
    rc, _, err = _init(capsys, "--bucket", bucket, "--users")
    assert rc == 2
    assert var in _assert_one_line_error(err)
    assert minio.admin_calls == []
    assert bucket not in {b["Name"] for b in s3_client_from_env().list_buckets()["Buckets"]}


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("NVAE_PIPELINE_SECRET_KEY", "short", "at least 8 characters"),
        ("NVAE_SAMPLER_ACCESS_KEY", "a=b", "no '='"),
        ("NVAE_SAMPLER_ACCESS_KEY", "nvae-root", "is the root key AWS_ACCESS_KEY_ID"),
        ("NVAE_PIPELINE_ACCESS_KEY", KEYS["NVAE_SAMPLER_ACCESS_KEY"], "must differ"),
    ],
)
def test_unusable_user_keys_are_refused_with_the_variable_named(var, value, says):
    env = {**KEYS, "AWS_ACCESS_KEY_ID": "nvae-root", var: value}
    with pytest.raises(StorageError, match=says) as err:
        users_from_env("nvae", env=env)
    assert var in str(err.value) or "must differ" in says
    assert not err.value.retryable


def test_a_store_without_the_admin_api_says_so(s3_server, clean_env, monkeypatch, capsys):
    """A plain S3 store, the real SeaweedFS, answers the admin path as an S3 request; it would even store
    the admin calls' bodies as objects of a new bucket `minio`, so nothing is sent before the server has
    said it is MinIO."""
    _point_at(monkeypatch, s3_server["endpoint_url"], s3_server["access_key"], s3_server["secret_key"])
    bucket = _bucket()
    rc, out, err = _init(capsys, "--bucket", bucket, "--users")
    assert rc == 2
    assert f"bucket {bucket} created" in out  # the S3 part still did its work
    line = _assert_one_line_error(err)
    assert "has no MinIO admin API" in line and "without --users" in line
    assert "minio" not in {b["Name"] for b in s3_client_from_env().list_buckets()["Buckets"]}


@pytest.mark.parametrize("answer", ["<ListBucketResult/>", "[]", '{"Code": "NoSuchKey"}', ""])
def test_a_server_info_that_is_not_minios_stops_before_any_write(answer, monkeypatch):
    """A 200 to GET /minio/admin/v3/info that is not MinIO's server info (an object some store keeps under
    that key, a proxy's page) is not taken for the admin API."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://store.example:9000")

    class Admin:
        writes = []

        def info(self):
            return answer

        def __getattr__(self, name):  # policy_add, user_add, policy_set
            return lambda *a, **k: self.writes.append(name)

    users = users_from_env("nvae", env={**KEYS, "AWS_ACCESS_KEY_ID": "nvae-root"})
    with pytest.raises(StorageError, match="store.example:9000 has no MinIO admin API"):
        ensure_users(users, Admin())
    assert Admin.writes == []


def test_a_store_still_starting_is_retryable_exit_75(minio, capsys):
    minio.fail_admin = (503, "XMinioServerNotInitialized")
    rc, _, err = _init(capsys, "--bucket", _bucket(), "--users")
    assert rc == 75
    line = _assert_one_line_error(err)
    assert "HTTP 503 XMinioServerNotInitialized" in line
    assert len(minio.admin_calls) == 4, "the first try and three retries"


def test_an_unreachable_admin_endpoint_is_a_retryable_storage_error(clean_env, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nvae-root")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nvae-root-secret-0")
    users = users_from_env("nvae", env={**KEYS, "AWS_ACCESS_KEY_ID": "nvae-root"})
    with pytest.raises(StorageError, match="cannot reach .*Connection refused") as err:
        ensure_users(users, admin_client_from_env(retries=0))
    assert err.value.retryable and "\n" not in str(err.value)


# --- TLS -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_minio(s3_server, clean_env, monkeypatch, tls):
    ca, context = tls
    with _fake_minio(s3_server, tls=context) as store:
        assert store.endpoint_url.startswith("https://")
        _point_at(monkeypatch, store.endpoint_url, store.root_access_key, store.root_secret_key)
        yield store, ca


def test_ensure_bucket_over_tls_trusts_the_ca_bundle_and_fails_clearly_without_it(tls_minio, monkeypatch):
    store, ca = tls_minio
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    bucket = _bucket()
    assert ensure_bucket(bucket, s3_client_from_env())[0] == f"bucket {bucket} created"

    monkeypatch.delenv("AWS_CA_BUNDLE")  # botocore's default trust store does not know our CA
    with pytest.raises(StorageError, match="certificate verify failed") as err:
        ensure_bucket(bucket, s3_client_from_env(max_attempts=1))
    assert "set AWS_CA_BUNDLE" in str(err.value) and "\n" not in str(err.value)
    assert not err.value.retryable, "an untrusted certificate does not heal on a retry"


def test_the_admin_client_over_tls_trusts_the_ca_bundle_and_fails_clearly_without_it(tls_minio, monkeypatch):
    store, ca = tls_minio
    users = users_from_env("nvae", env={**KEYS, "AWS_ACCESS_KEY_ID": store.root_access_key})
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    assert len(ensure_users(users, admin_client_from_env(retries=0))) == 2
    assert set(store.users) == {"nvae-sampler", "nvae-pipeline"}

    monkeypatch.delenv("AWS_CA_BUNDLE")
    with pytest.raises(StorageError, match="set AWS_CA_BUNDLE") as err:
        ensure_users(users, admin_client_from_env())  # with retries: a TLS failure is still not retried
    assert "certificate verify failed" in str(err.value) and not err.value.retryable


def test_init_users_over_tls_end_to_end(tls_minio, monkeypatch, capsys):
    store, ca = tls_minio
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    bucket = _bucket()
    rc, out, err = _init(capsys, "--bucket", bucket, "--users")
    assert rc == 0, err
    assert f"bucket {bucket} created" in out and store.policies[SAMPLER_POLICY] == sampler_policy(bucket)
    assert s3_client_from_env().list_objects_v2(Bucket=bucket)["KeyCount"] == 0  # S3 over TLS, then SeaweedFS


def test_a_ca_bundle_that_is_not_a_file_is_named(clean_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://127.0.0.1:1")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(StorageError, match="AWS_CA_BUNDLE=.*missing.pem: no such file"):
        s3_client_from_env()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nvae-root")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nvae-root-secret-0")
    with pytest.raises(StorageError, match="missing.pem: no such file"):
        admin_client_from_env()
    rc, _, err = _init(capsys)
    assert rc == 2 and "AWS_CA_BUNDLE" in _assert_one_line_error(err)
