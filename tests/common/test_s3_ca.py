"""Which CA bundle the store clients trust: AWS_CA_BUNDLE when set, else the optional mounted one if present."""

import pytest

from common.errors import StorageError
from common.s3 import OPTIONAL_CA_ENV, ca_bundle_from_env


def test_an_optional_ca_is_used_only_when_its_file_exists(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    mounted = tmp_path / "s3-ca" / "ca.crt"
    monkeypatch.setenv(OPTIONAL_CA_ENV, str(mounted))
    assert ca_bundle_from_env() is None  # a cluster without TLS to the store: no Secret, no file
    mounted.parent.mkdir()
    mounted.write_text("-----BEGIN CERTIFICATE-----\n")
    assert ca_bundle_from_env() == str(mounted)
    explicit = tmp_path / "explicit.pem"
    explicit.write_text("pem")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(explicit))
    assert ca_bundle_from_env() == str(explicit)  # the explicit setting wins
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(StorageError, match="AWS_CA_BUNDLE=.*no such file"):
        ca_bundle_from_env()  # an explicit path that is not there stays an error
