"""A real S3-compatible server on 127.0.0.1 for tests: moto's server mode (`moto[server]`), in this
process, on a free port, stopped at the end of the `with`.

Why moto: it is a registry package (pip, no docker, no binaries), speaks the S3 REST API over HTTP
(boto3 and Streaming talk to it exactly as to AWS, through S3_ENDPOINT_URL), keeps objects in
memory (nothing to clean up) and starts in well under a second. Requests to it are bounded by the
clients' own timeouts (llmshearing.data.remote: 5 s connect, 2 attempts)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """What a client needs to reach the test server: endpoint and (dummy) credentials, env only."""
    return {"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost"}


@contextlib.contextmanager
def s3_server(*buckets: str) -> Iterator[dict[str, str]]:
    """Start the server, create `buckets`, set the env in this process too; yields the env."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = s3_env(f"http://{host}:{port}")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        c = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
        for b in buckets:
            c.create_bucket(Bucket=b)
        yield env
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
