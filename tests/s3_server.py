"""A real S3-compatible server for the tests: `moto_server` on 127.0.0.1, reached through a TCP proxy.

The proxy is the "network": killing it makes the endpoint unreachable (connections refused, transfers
in flight cut) while moto keeps its objects in memory, and starting it again on the same port brings
the endpoint back with everything that was stored. `rate` throttles the proxy so an upload lasts long
enough to be cut in the middle. Run the proxy alone with `python -m tests.s3_server PORT TARGET [RATE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.mlflow_server import free_port

MOTO = str(Path(sys.executable).with_name("moto_server"))
ACCESS_KEY = "dinolab-test-access-key"
SECRET_KEY = "dinolab-test-secret-9f3b2c7d"  # grepped for in everything a run writes


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} not answering at {url} after {timeout_s} s")


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class S3Server:
    """moto_server + proxy; `env` holds the variables a client (or a `dinolab` process) needs."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.moto_port, self.port = free_port(), free_port()
        self.moto: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> S3Server:
        log = open(self.folder / "moto.log", "a")  # noqa: SIM115 - kept open by the server
        self.moto = subprocess.Popen(
            [MOTO, "-H", "127.0.0.1", "-p", str(self.moto_port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        _wait_http(f"http://127.0.0.1:{self.moto_port}/", self.moto, 60, "moto_server")
        return self.start_proxy()

    def start_proxy(self, rate: int = 0) -> S3Server:
        """(Re)open the endpoint; `rate` > 0 limits each direction to that many bytes per second."""
        self.stop_proxy()
        self.proxy = subprocess.Popen(
            [sys.executable, "-m", "tests.s3_server", str(self.port), str(self.moto_port), str(rate)],
            cwd=Path(__file__).resolve().parents[1], start_new_session=True,
        )  # fmt: skip
        _wait_http(self.endpoint + "/", self.proxy, 30, "s3 proxy")
        return self

    def stop_proxy(self) -> None:
        """The endpoint goes away: new connections are refused, open ones are cut."""
        _kill(self.proxy)
        self.proxy = None

    def stop(self) -> None:
        self.stop_proxy()
        _kill(self.moto)
        self.moto = None

    def client(self, direct: bool = False):
        """A boto3 client through the proxy, or `direct` to moto (it sees the objects during an outage)."""
        import boto3

        endpoint = f"http://127.0.0.1:{self.moto_port}" if direct else self.endpoint
        return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")  # fmt: skip

    def keys(self, url: str) -> list[str]:
        """Every object key under s3://bucket/prefix, read directly from moto."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        pages = (
            self.client(direct=True).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, url: str, key: str) -> bytes:
        bucket = url.removeprefix("s3://").partition("/")[0]
        return self.client(direct=True).get_object(Bucket=bucket, Key=key)["Body"].read()

    def make_bucket(self, name: str) -> str:
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: int) -> None:
    try:
        while data := await reader.read(65536 if not rate else max(1024, rate // 20)):
            writer.write(data)
            await writer.drain()
            if rate:
                await asyncio.sleep(len(data) / rate)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _proxy(port: int, target: int, rate: int) -> None:
    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, server_w, rate), _pipe(server_r, client_w, rate))

    server = await asyncio.start_server(handle, "127.0.0.1", port, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_proxy(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0))
