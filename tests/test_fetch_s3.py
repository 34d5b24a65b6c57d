"""fetch from s3:// against a real S3-compatible server on loopback (moto's standalone server).

boto3 finds the server through AWS_ENDPOINT_URL, exactly as a pod would find MinIO or a VPC
endpoint, so these tests exercise the real request path: signing or not, HEAD, list, ranged
downloads and error codes. What moto cannot do is judge a signature's principal, so the "these
credentials are refused but the bucket is public" case injects a 403 into the signed client
with a botocore event hook. Real AWS S3 (and the tutorial's public `neuron-s3` bucket) cannot be
reached from this machine.
"""

from __future__ import annotations

import hashlib
import json
import logging

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from recipe_runner.errors import UserError
from recipe_runner.prepare import transfer
from recipe_runner.prepare.fetch import fetch
from recipe_runner.prepare.sources import s3 as s3_source

moto_server = pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests (pip install -e .[test])")

PRIVATE_BODY = b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n' * 1000


@pytest.fixture(scope="module")
def endpoint():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    admin = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="admin", aws_secret_access_key="admin")
    admin.create_bucket(Bucket="public-data")
    for key in ("dpo/data_dpo.jsonl", "model/config.json", "model/shards/a.safetensors", "model/shards/b.safetensors"):
        admin.put_object(Bucket="public-data", Key=key, Body=key.encode() * 100, ACL="public-read")
    admin.create_bucket(Bucket="private-data")
    admin.put_object(Bucket="private-data", Key="train.jsonl", Body=PRIVATE_BODY)
    admin.create_bucket(Bucket="locked")
    admin.put_object(Bucket="locked", Key="x.jsonl", Body=b"x")
    admin.put_bucket_policy(Bucket="locked", Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": ["s3:GetObject", "s3:HeadObject"], "Resource": "arn:aws:s3:::locked/*"}]}))
    yield url, admin
    server.stop()


@pytest.fixture
def env(endpoint, monkeypatch, tmp_path):
    """A pod without credentials: only the endpoint, no keys, no config files, no instance metadata."""
    url, admin = endpoint
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setattr(transfer, "BASE_DELAY_S", 0.01)
    return admin


def with_fake_keys(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")


def test_public_object_unsigned_then_skipped_by_manifest(env, tmp_path, capsys):
    dest = tmp_path / "data" / "data_dpo.jsonl"
    assert fetch("s3://public-data/dpo/data_dpo.jsonl", dest) is True
    assert dest.read_bytes() == b"dpo/data_dpo.jsonl" * 100
    manifest = json.loads((tmp_path / "data" / "data_dpo.jsonl.manifest.json").read_text())
    obj = manifest["identity"]["objects"]["dpo/data_dpo.jsonl"]
    assert obj["size"] == 1800 and obj["etag"].strip('"') == hashlib.md5(dest.read_bytes()).hexdigest()
    inode = dest.stat().st_ino
    assert fetch("s3://public-data/dpo/data_dpo.jsonl", dest) is False
    assert dest.stat().st_ino == inode  # not rewritten
    assert "up to date" in capsys.readouterr().out


def test_changed_object_is_fetched_again(env, tmp_path):
    env.put_object(Bucket="public-data", Key="dpo/changing.jsonl", Body=b"v1", ACL="public-read")
    dest = tmp_path / "changing.jsonl"
    fetch("s3://public-data/dpo/changing.jsonl", dest)
    env.put_object(Bucket="public-data", Key="dpo/changing.jsonl", Body=b"v2", ACL="public-read")
    assert fetch("s3://public-data/dpo/changing.jsonl", dest) is True
    assert dest.read_bytes() == b"v2"


def test_prefix_downloads_every_object_into_a_directory(env, tmp_path):
    dest = tmp_path / "model"
    assert fetch("s3://public-data/model/", dest) is True
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == [".fetch-manifest.json", "config.json", "shards/a.safetensors", "shards/b.safetensors"]
    assert (dest / "shards" / "b.safetensors").read_bytes() == b"model/shards/b.safetensors" * 100
    manifest = json.loads((dest / ".fetch-manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["config.json", "shards/a.safetensors", "shards/b.safetensors"]
    assert fetch("s3://public-data/model/", dest) is False


def test_private_object_needs_credentials(env, tmp_path, monkeypatch):
    with pytest.raises(UserError) as e:
        fetch("s3://private-data/train.jsonl", tmp_path / "train.jsonl")
    msg = str(e.value)
    assert "access denied" in msg and "no credentials found" in msg and "IRSA" in msg and "Secret" in msg
    with_fake_keys(monkeypatch)  # moto accepts any signed request: stands for a role that may read
    assert fetch("s3://private-data/train.jsonl", tmp_path / "train.jsonl") is True
    assert (tmp_path / "train.jsonl").read_bytes() == PRIVATE_BODY


def test_refused_credentials_fall_back_to_unsigned(env, tmp_path, monkeypatch, capsys):
    with_fake_keys(monkeypatch)
    real = s3_source._candidate_clients

    def refuse_signed():
        clients = real()
        assert clients[0][0] == "credentials from env"

        def deny(request, **_):
            if "Authorization" in request.headers:
                body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
                return AWSResponse(request.url, 403, {}, _Raw(body))
            return None

        clients[0][1].meta.events.register("before-send.s3", deny)
        return clients

    monkeypatch.setattr(s3_source, "_candidate_clients", refuse_signed)
    assert fetch("s3://public-data/dpo/data_dpo.jsonl", tmp_path / "d.jsonl") is True
    assert (tmp_path / "d.jsonl").read_bytes() == b"dpo/data_dpo.jsonl" * 100
    assert "with credentials from env was refused" in capsys.readouterr().err


def test_denied_for_everyone_names_what_was_tried(env, tmp_path, monkeypatch):
    with_fake_keys(monkeypatch)
    with pytest.raises(UserError, match=r"access denied .*tried: credentials from env \(403\), anonymous unsigned requests \(403\)"):
        fetch("s3://locked/x.jsonl", tmp_path / "x.jsonl")
    assert list(tmp_path.iterdir()) == [tmp_path / "x.jsonl.lock"]


@pytest.mark.parametrize("uri, message", [
    ("s3://no-such-bucket/a.jsonl", "no such bucket 'no-such-bucket'"),
    ("s3://no-such-bucket/prefix/", "no such bucket 'no-such-bucket'"),
    ("s3://public-data/dpo/missing.jsonl", "no such key 'dpo/missing.jsonl' in bucket 'public-data'"),
    ("s3://public-data/empty/", "no objects under this prefix"),
])
def test_missing_bucket_key_prefix(env, tmp_path, uri, message):
    with pytest.raises(UserError, match=message):
        fetch(uri, tmp_path / "out")


def test_disk_full_before_download_says_how_much_and_where(env, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 100, 100))
    with_fake_keys(monkeypatch)
    with pytest.raises(UserError, match=rf"not enough disk space in {tmp_path}: need 48.0 KB, 100 B free"):
        fetch("s3://private-data/train.jsonl", tmp_path / "train.jsonl")


class _Raw:
    """The minimum of a urllib3 response that botocore reads an error body from."""

    def __init__(self, body: bytes):
        self._body = body

    def stream(self, *_a, **_k):
        yield self._body
