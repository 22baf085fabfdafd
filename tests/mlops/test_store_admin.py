"""`nvae store init --users`: scoped users and policies through MinIO's admin API, and the store over TLS.

The store is `FakeMinio` (tests/fake_minio_admin.py): MinIO's admin API in memory, checking signatures and
decrypting the SDK's encrypted bodies, in front of the session's moto server for the S3 API, enforcing each
user's policy on S3 requests; over TLS with a CA and certificate made here."""

from __future__ import annotations

import os
import uuid

import pytest
from fake_minio_admin import FakeMinio, allows, make_tls

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

ROOT_KEY, ROOT_SECRET = "nvae-root", "nvae-root-secret-0"
KEYS = {
    "NVAE_SAMPLER_ACCESS_KEY": "nvae-sampler",
    "NVAE_SAMPLER_SECRET_KEY": "sampler-secret-1",
    "NVAE_PIPELINE_ACCESS_KEY": "nvae-pipeline",
    "NVAE_PIPELINE_SECRET_KEY": "pipeline-secret-1",
}


@pytest.fixture
def clean_env(monkeypatch):
    """No AWS_*, NVAE_*, proxy or CA variables from the host (this one sets AWS_CA_BUNDLE system-wide), and a
    fresh boto3 default session: it caches the first credentials it finds, and these tests switch users."""
    import boto3

    for var in list(os.environ):
        if var.startswith(("AWS_", "NVAE_")) or "proxy" in var.lower():
            monkeypatch.delenv(var)
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _point_at(monkeypatch, store: FakeMinio, access=ROOT_KEY, secret=ROOT_SECRET) -> None:
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", store.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


@pytest.fixture
def minio(moto_s3_server, clean_env, monkeypatch):
    """A FakeMinio over HTTP in front of moto; the environment holds its root keys and the users' keys, as the
    bucket job's does."""
    with FakeMinio(ROOT_KEY, ROOT_SECRET, s3_upstream=moto_s3_server["endpoint_url"]) as store:
        _point_at(monkeypatch, store)
        for var, value in KEYS.items():
            monkeypatch.setenv(var, value)
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


# --- the policy documents ------------------------------------------------------------------------------------


def _actions(policy: dict) -> set[str]:
    return {a for st in policy["Statement"] for a in st["Action"]}


def test_sampler_policy_reads_only_the_models_prefix():
    policy = sampler_policy("nvae")
    assert _actions(policy) == {"s3:GetObject", "s3:ListBucket"}
    assert all(st["Effect"] == "Allow" for st in policy["Statement"])
    assert allows(policy, "s3:GetObject", "arn:aws:s3:::nvae/models/decoder.onnx")
    assert allows(policy, "s3:ListBucket", "arn:aws:s3:::nvae", prefix="models/")
    for action, resource, prefix in [
        ("s3:GetObject", "arn:aws:s3:::nvae/data/train.npy", None),  # outside the prefix
        ("s3:GetObject", "arn:aws:s3:::nvae/models-old/decoder.onnx", None),  # a look-alike prefix
        ("s3:GetObject", "arn:aws:s3:::other/models/decoder.onnx", None),  # another bucket
        ("s3:ListBucket", "arn:aws:s3:::nvae", ""),  # the whole bucket
        ("s3:ListBucket", "arn:aws:s3:::nvae", "data/"),
        ("s3:PutObject", "arn:aws:s3:::nvae/models/decoder.onnx", None),
        ("s3:DeleteObject", "arn:aws:s3:::nvae/models/decoder.onnx", None),
        ("s3:AbortMultipartUpload", "arn:aws:s3:::nvae/models/decoder.onnx", None),
        ("s3:PutLifecycleConfiguration", "arn:aws:s3:::nvae", None),
    ]:
        assert not allows(policy, action, resource, prefix), (action, resource, prefix)
    # The prefix is normalised: 'models' and '/models/' mean the folder, never 'models-old/'.
    assert sampler_policy("nvae", "models") == sampler_policy("nvae", "/models/") == policy
    whole = sampler_policy("nvae", "")
    assert allows(whole, "s3:GetObject", "arn:aws:s3:::nvae/data/x") and allows(
        whole, "s3:ListBucket", "arn:aws:s3:::nvae", prefix=""
    )


def test_pipeline_policy_reads_and_writes_the_bucket_and_nothing_else():
    policy = pipeline_policy("nvae")
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                   "s3:ListMultipartUploadParts"):  # fmt: skip
        assert allows(policy, action, "arn:aws:s3:::nvae/train/ckpt/step-000100.pt"), action
        assert not allows(policy, action, "arn:aws:s3:::other/x"), action
    assert allows(policy, "s3:ListBucket", "arn:aws:s3:::nvae", prefix="")
    assert allows(policy, "s3:ListBucketMultipartUploads", "arn:aws:s3:::nvae")
    for action in (
        "s3:PutLifecycleConfiguration",
        "s3:DeleteBucket",
        "s3:PutBucketPolicy",
        "s3:CreateBucket",
    ):
        assert not allows(policy, action, "arn:aws:s3:::nvae"), action
    assert not any("*" in a for a in _actions(policy)), "no wildcard actions"


# --- nvae store init --users ---------------------------------------------------------------------------------


def test_init_users_creates_each_user_with_its_own_policy(minio, capsys):
    bucket = _bucket()
    rc, out, err = _init(capsys, "--bucket", bucket, "--users")
    assert rc == 0, err
    assert f"bucket {bucket} created" in out
    assert "user nvae-sampler (sampler): policy nvae-sampler-read" in out
    assert "user nvae-pipeline (pipeline): policy nvae-pipeline-readwrite" in out
    assert not any(secret in out + err for secret in (KEYS["NVAE_SAMPLER_SECRET_KEY"], ROOT_SECRET))
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
    assert [path.split("?")[0] for _, path in minio.admin_calls] == 2 * [
        "/minio/admin/v3/add-canned-policy",
        "/minio/admin/v3/add-user",
        "/minio/admin/v3/set-user-or-group-policy",
    ]
    # The bucket part, unchanged: the abort rule for incomplete multipart uploads.
    (rule,) = s3_client_from_env().get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1


def test_without_users_the_admin_api_is_not_touched(minio, capsys):
    rc, _, err = _init(capsys, "--bucket", _bucket())
    assert rc == 0, err
    assert minio.admin_calls == [] and minio.users == {}


def _as(monkeypatch, store, role: str):
    """An S3 client with the keys of `role`, as its workload gets them from its Secret."""
    prefix = f"NVAE_{role.upper()}_"
    _point_at(monkeypatch, store, os.environ[prefix + "ACCESS_KEY"], os.environ[prefix + "SECRET_KEY"])
    return s3_client_from_env(max_attempts=1)


def _refused(call) -> str | None:
    """The S3 error code `call` fails with, None if it succeeds."""
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"]
    return None


def _denied(call) -> bool:
    return _refused(call) in ("AccessDenied", "403")  # HEAD answers carry no body: only the status


def test_each_workload_can_do_what_it_needs_and_no_more(minio, capsys, monkeypatch, tmp_path):
    bucket = _bucket()
    assert _init(capsys, "--bucket", bucket, "--users")[0] == 0

    pipeline = _as(monkeypatch, minio, "pipeline")
    pipeline.put_object(Bucket=bucket, Key="models/decoder.onnx", Body=b"onnx" * 100)
    pipeline.put_object(Bucket=bucket, Key="train/checkpoint.pt", Body=b"ckpt")
    assert pipeline.get_object(Bucket=bucket, Key="train/checkpoint.pt")["Body"].read() == b"ckpt"
    pipeline.delete_object(Bucket=bucket, Key="train/checkpoint.pt")
    assert _denied(
        lambda: pipeline.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": []}
        )
    )

    sampler = _as(monkeypatch, minio, "sampler")
    sampler.download_file(bucket, "models/decoder.onnx", str(tmp_path / "decoder.onnx"))  # the init container
    assert (tmp_path / "decoder.onnx").read_bytes() == b"onnx" * 100
    assert sampler.list_objects_v2(Bucket=bucket, Prefix="models/")["KeyCount"] == 1
    assert _denied(lambda: sampler.put_object(Bucket=bucket, Key="models/decoder.onnx", Body=b"evil"))
    assert _denied(lambda: sampler.delete_object(Bucket=bucket, Key="models/decoder.onnx"))
    assert _denied(lambda: sampler.list_objects_v2(Bucket=bucket))
    pipeline.put_object(Bucket=bucket, Key="data/train.npy", Body=b"data")
    assert _denied(lambda: sampler.get_object(Bucket=bucket, Key="data/train.npy"))


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
    rotated = _as(monkeypatch, minio, "sampler")
    monkeypatch.setenv("NVAE_SAMPLER_SECRET_KEY", "sampler-secret-1")
    stale = _as(monkeypatch, minio, "sampler")
    assert rotated.list_objects_v2(Bucket=bucket, Prefix="models/")["KeyCount"] == 0  # the new secret works
    assert _refused(lambda: stale.list_objects_v2(Bucket=bucket, Prefix="models/")) == "SignatureDoesNotMatch"


@pytest.mark.parametrize(
    ("access", "secret", "code"),
    [
        ("not-the-root", ROOT_SECRET, "InvalidAccessKeyId"),
        (ROOT_KEY, "wrong-secret-0", "SignatureDoesNotMatch"),
    ],
)
def test_a_bad_admin_key_is_one_line_and_exit_2(
    moto_s3_server, clean_env, monkeypatch, capsys, access, secret, code
):
    # S3 requests pass unchecked here (as with moto), so the failure comes from the admin API.
    with FakeMinio(
        ROOT_KEY, ROOT_SECRET, s3_upstream=moto_s3_server["endpoint_url"], check_s3_auth=False
    ) as store:
        _point_at(monkeypatch, store, access, secret)
        for var, value in KEYS.items():
            monkeypatch.setenv(var, value)
        rc, _, err = _init(capsys, "--bucket", _bucket(), "--users")
    assert rc == 2
    line = _assert_one_line_error(err)
    assert f"cannot add policy {SAMPLER_POLICY}: HTTP 403 {code}" in line
    assert store.users == {} and store.policies == {}


def test_a_bad_root_key_against_a_checking_store_fails_at_the_bucket(minio, capsys, monkeypatch):
    _point_at(monkeypatch, minio, ROOT_KEY, "wrong-secret-0")
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
        ("NVAE_SAMPLER_ACCESS_KEY", ROOT_KEY, "is the root key AWS_ACCESS_KEY_ID"),
        ("NVAE_PIPELINE_ACCESS_KEY", KEYS["NVAE_SAMPLER_ACCESS_KEY"], "must differ"),
    ],
)
def test_unusable_user_keys_are_refused_with_the_variable_named(var, value, says):
    env = {**KEYS, "AWS_ACCESS_KEY_ID": ROOT_KEY, var: value}
    with pytest.raises(StorageError, match=says) as err:
        users_from_env("nvae", env=env)
    assert var in str(err.value) or "must differ" in says
    assert not err.value.retryable


def test_a_store_without_the_admin_api_says_so(moto_s3_server, clean_env, monkeypatch, capsys):
    """A plain S3 store answers the admin path as an S3 request (moto: no bucket 'minio')."""
    with FakeMinio(ROOT_KEY, ROOT_SECRET, s3_upstream=moto_s3_server["endpoint_url"], admin_api=False) as store:
        _point_at(monkeypatch, store)
        for var, value in KEYS.items():
            monkeypatch.setenv(var, value)
        bucket = _bucket()
        rc, out, err = _init(capsys, "--bucket", bucket, "--users")
    assert rc == 2
    assert f"bucket {bucket} created" in out  # the S3 part still did its work
    line = _assert_one_line_error(err)
    assert "has no MinIO admin API" in line and "without --users" in line


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
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ROOT_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ROOT_SECRET)
    users = users_from_env("nvae", env={**KEYS, "AWS_ACCESS_KEY_ID": ROOT_KEY})
    with pytest.raises(StorageError, match="cannot reach .*Connection refused") as err:
        ensure_users(users, admin_client_from_env(retries=0))
    assert err.value.retryable and "\n" not in str(err.value)


# --- TLS -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_minio(moto_s3_server, clean_env, monkeypatch, tls):
    ca, context = tls
    with FakeMinio(ROOT_KEY, ROOT_SECRET, s3_upstream=moto_s3_server["endpoint_url"], tls=context) as store:
        assert store.endpoint_url.startswith("https://")
        _point_at(monkeypatch, store)
        for var, value in KEYS.items():
            monkeypatch.setenv(var, value)
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
    users = users_from_env("nvae", env={**KEYS, "AWS_ACCESS_KEY_ID": ROOT_KEY})
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
    sampler = _as(monkeypatch, store, "sampler")  # the sampler's init container, over TLS with the CA bundle
    assert sampler.list_objects_v2(Bucket=bucket, Prefix="models/")["KeyCount"] == 0


def test_a_ca_bundle_that_is_not_a_file_is_named(clean_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://127.0.0.1:1")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(StorageError, match="AWS_CA_BUNDLE=.*missing.pem: no such file"):
        s3_client_from_env()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ROOT_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ROOT_SECRET)
    with pytest.raises(StorageError, match="missing.pem: no such file"):
        admin_client_from_env()
    rc, _, err = _init(capsys)
    assert rc == 2 and "AWS_CA_BUNDLE" in _assert_one_line_error(err)
