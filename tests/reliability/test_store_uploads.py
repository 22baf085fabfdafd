"""Uploads to the store never leave half an object or a dangling multipart upload behind."""

import pytest
from botocore.exceptions import ClientError

from common.errors import StorageError
from common.s3 import s3_client_from_env
from data.remote import upload_source


def test_a_failed_multipart_upload_is_aborted_and_leaves_no_object(s3_env, tmp_path):
    client = s3_client_from_env()
    s3_env["make_bucket"]("uploads")
    src = tmp_path / "raw"
    src.mkdir()
    (src / "big.bin").write_bytes(b"\x01" * (20 * 1024 * 1024))  # above boto3's 8 MiB multipart threshold
    parts = []

    def fail_third_part(params, **_):
        parts.append(params["PartNumber"])
        if len(parts) == 3:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "injected"}}, "UploadPart")

    client.meta.events.register("before-parameter-build.s3.UploadPart", fail_third_part)
    with pytest.raises(StorageError, match="s3://uploads/data/big.bin: cannot upload"):
        upload_source(src, "s3://uploads/data", client)
    assert len(parts) >= 3, "the upload was multipart"
    assert client.list_multipart_uploads(Bucket="uploads").get("Uploads", []) == []  # aborted, not dangling
    assert client.list_objects_v2(Bucket="uploads").get("KeyCount") == 0  # no half object
