"""s3://bucket/key (one object) and s3://bucket/prefix/ (every object under it), with boto3.

Credentials: the standard chain first when it finds any (environment, shared files, IRSA and EKS
Pod Identity, instance role), then anonymous unsigned requests, which is what public buckets
such as the tutorial's `neuron-s3` need (`aws s3 cp --no-sign-request`). With no credentials at
all only the unsigned client is tried. AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 are honoured by
botocore itself (tests point them at a local S3-compatible server).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError as S3TransferRetriesExceeded

from recipe_runner.errors import UserError
from recipe_runner.prepare.sources import Source
from recipe_runner.prepare.transfer import TransientError, progress, with_retries

T = TypeVar("T")

# Codes after which the next client (anonymous) is worth a try: the credentials are refused or
# do not reach this bucket, but the bucket may still be public.
AUTH_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
              "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "401"}
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "500", "502", "503", "504"}
HELP_ACCESS = ("If the bucket is private, give the pod read access: IRSA or EKS Pod Identity on its "
               "service account (s3:GetObject, and s3:ListBucket for a prefix), or a Kubernetes Secret "
               "with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY exposed as environment variables.")


class S3Source(Source):
    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri
        rest = uri[len("s3://"):]
        self.bucket, _, self.key = rest.partition("/")
        if not self.bucket:
            raise UserError(f"{uri}: no bucket name; write s3://bucket/key or s3://bucket/prefix/")
        self.is_dir = self.key == "" or self.key.endswith("/")
        self._objects: list[dict[str, Any]] = []
        self._client: Any = None
        self._clients = _candidate_clients()

    # Each call goes through `_call`, which picks the first client the bucket accepts.
    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        def attempt() -> T:
            tried = []
            candidates = [("the client that worked before", self._client)] if self._client else self._clients
            for label, client in candidates:
                try:
                    result = fn(client)
                    self._client = client
                    return result
                except ClientError as e:
                    code = _code(e)
                    if code in TRANSIENT_CODES:
                        raise TransientError(f"{what}: {code}") from e
                    if code in AUTH_CODES:
                        tried.append(f"{label} ({code})")
                        if client is not candidates[-1][1]:
                            print(f"fetch: {what} {self.uri} with {label} was refused ({code}); trying the next way",
                                  file=sys.stderr, flush=True)
                        continue
                    raise self._user_error(code, what, client) from e
                except (BotoCoreError, S3TransferRetriesExceeded) as e:
                    if _is_transient(e):
                        raise TransientError(f"{what}: {e}") from e
                    raise
            raise UserError(f"{self.uri}: access denied ({what}); tried: {', '.join(tried) or 'the credentials found'}. {HELP_ACCESS}")

        return with_retries(attempt, f"{what} {self.uri}")

    def _user_error(self, code: str, what: str, client: Any) -> UserError:
        if code == "NoSuchBucket":
            return UserError(f"{self.uri}: no such bucket {self.bucket!r}; check the name (and region/endpoint)")
        if code in ("NoSuchKey", "404", "NotFound"):
            if self._bucket_missing(client):
                return UserError(f"{self.uri}: no such bucket {self.bucket!r}; check the name (and region/endpoint)")
            return UserError(f"{self.uri}: no such key {self.key!r} in bucket {self.bucket!r}; "
                             "check the path (a prefix must end with '/')")
        return UserError(f"{self.uri}: {what} failed with {code}")

    def _bucket_missing(self, client: Any) -> bool:
        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            return _code(e) in ("404", "NoSuchBucket", "NotFound")
        except Exception:  # noqa: BLE001 - only a hint for the message
            return False
        return False

    def identity(self) -> dict[str, Any]:
        if self.is_dir:
            self._objects = self._call("list", self._list)
            if not self._objects:
                raise UserError(f"{self.uri}: no objects under this prefix; check the path")
        else:
            head = self._call("head", lambda c: c.head_object(Bucket=self.bucket, Key=self.key))
            self._objects = [{"Key": self.key, "Size": head["ContentLength"], "ETag": head.get("ETag"),
                              "LastModified": head.get("LastModified")}]
        self.total_size = sum(o["Size"] for o in self._objects)
        return {"objects": {o["Key"]: {"etag": o.get("ETag"), "size": o["Size"],
                                       "last_modified": str(o.get("LastModified"))} for o in self._objects}}

    def _list(self, client: Any) -> list[dict[str, Any]]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key)
        return [o for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]

    def download(self, target: Path) -> None:
        if not self.is_dir:
            self._get(self._objects[0], target)
            return
        target.mkdir(parents=True, exist_ok=True)
        for obj in self._objects:
            rel = obj["Key"][len(self.key):]
            path = (target / rel).resolve()
            if target.resolve() not in path.parents:
                raise UserError(f"{self.uri}: object key {obj['Key']!r} would land outside the destination")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._get(obj, path)

    def _get(self, obj: dict[str, Any], path: Path) -> None:
        key, desc = obj["Key"], f"s3://{self.bucket}/{obj['Key']}"

        def get(client: Any) -> None:
            with progress(obj["Size"], desc) as update:
                client.download_file(self.bucket, key, str(path), Callback=update,
                                     Config=TransferConfig(max_concurrency=8, use_threads=True))
            if path.stat().st_size != obj["Size"]:
                raise TransientError(f"{desc}: got {path.stat().st_size} of {obj['Size']} bytes")

        self._call("download", get)


def _candidate_clients() -> list[tuple[str, Any]]:
    """[(label, client)]: signed with the chain's credentials if it finds any, then unsigned."""
    retries = {"max_attempts": 3, "mode": "standard"}
    session = boto3.session.Session()
    creds = session.get_credentials()
    unsigned = session.client("s3", config=Config(signature_version=UNSIGNED, retries=retries))
    if creds is None:
        return [("anonymous unsigned requests (no credentials found)", unsigned)]
    signed = session.client("s3", config=Config(retries=retries))
    return [(f"credentials from {creds.method}", signed), ("anonymous unsigned requests", unsigned)]


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _is_transient(e: Exception) -> bool:
    from botocore.exceptions import (ConnectionError, ConnectTimeoutError, IncompleteReadError, ReadTimeoutError,
                                     ResponseStreamingError)

    return isinstance(e, (S3TransferRetriesExceeded, ConnectionError, ConnectTimeoutError, IncompleteReadError,
                          ReadTimeoutError, ResponseStreamingError))
