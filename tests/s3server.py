"""A local S3-compatible server for the tests: moto's, in its own process on 127.0.0.1.

Credentials are checked like a real server's: the first requests (unauthenticated, as moto's
INITIAL_NO_AUTH_ACTION_COUNT allows) create one IAM user with an allow-all policy and an access key;
every later request must sign with that key, so wrong credentials are refused (403)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BUCKET = "ctprep-test"


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    bucket: str = BUCKET

    def env(self) -> dict[str, str]:
        """The variables an s3fs/boto user sets to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    def fs(self):  # noqa: ANN201 - an s3fs.S3FileSystem
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=self.key, secret=self.secret)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_s3(log: Path, timeout: float = 30.0) -> Iterator[S3Server]:
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text(encoding='utf-8')[-2000:]}") \
                        from None
                time.sleep(0.1)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="ctprep")
        iam.put_user_policy(UserName="ctprep", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        access = iam.create_access_key(UserName="ctprep")["AccessKey"]
        server = S3Server(endpoint, access["AccessKeyId"], access["SecretAccessKey"])
        server.fs().mkdir(BUCKET)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
