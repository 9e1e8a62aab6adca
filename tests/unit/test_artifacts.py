"""The embedded artifact store: digests verified on write, blobs served only under a covering, unexpired grant."""

from __future__ import annotations

import hashlib

import pytest
from aiohttp.test_utils import TestClient, TestServer

from fleetlet.artifacts import (
    BlobNotFound,
    BlobStore,
    DigestMismatch,
    GrantError,
    GrantSigner,
    blob_path,
    make_app,
)

KEY = b"0123456789abcdef0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(tmp_path / "store")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(store, clock):
    client = TestClient(TestServer(make_app(store, GrantSigner(KEY, clock=clock))))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def test_put_returns_the_sha256_and_refuses_bytes_that_do_not_match(store, tmp_path):
    digest = store.put_bytes(b"model bytes")
    assert digest == sha(b"model bytes")
    with store.open(digest) as f:
        assert f.read() == b"model bytes"
    src = tmp_path / "shard.npy"
    src.write_bytes(b"x" * (3 << 20))
    assert store.put_file(src, expected=sha(src.read_bytes())) == sha(src.read_bytes())

    with pytest.raises(DigestMismatch):
        store.put_bytes(b"tampered", expected=sha(b"original"))
    assert not store.has(sha(b"original")) and not store.has(sha(b"tampered"))
    assert list(store.tmp_dir.iterdir()) == []  # no partial file left behind
    with pytest.raises(BlobNotFound):
        store.open(sha(b"never stored"))


def test_verify_detects_a_blob_corrupted_on_disk(store):
    digest = store.put_bytes(b"good")
    assert store.verify(digest)
    store.path(digest).write_bytes(b"bit rot")
    assert not store.verify(digest)


def test_grants_are_signed_scoped_and_expire(clock):
    signer = GrantSigner(KEY, clock=clock)
    d = sha(b"a")
    grant = signer.verify(signer.issue_grant([d], ttl=60, subject="job/0/car-1"))
    assert grant.allows_read(d) and not grant.allows_read(sha(b"b")) and not grant.upload
    token = signer.issue_grant([d], ttl=60)
    with pytest.raises(GrantError) as e:
        GrantSigner(b"another key, 32 bytes long......", clock=clock).verify(token)
    assert e.value.reason == "GrantInvalid"
    clock.now += 61
    with pytest.raises(GrantError) as e:
        signer.verify(token)
    assert e.value.reason == "GrantExpired"
    with pytest.raises(ValueError):
        GrantSigner(b"short")


async def test_get_serves_a_granted_blob_with_head_and_streaming(client, store, clock):
    data = b"\x00\x01" * (1 << 20)
    digest = store.put_bytes(data)
    token = GrantSigner(KEY, clock=clock).issue_grant([digest], ttl=60)
    r = await client.get(blob_path(digest), params={"grant": token})
    assert r.status == 200
    assert await r.read() == data
    r = await client.head(blob_path(digest), headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200
    assert int(r.headers["Content-Length"]) == len(data)
    assert r.headers["X-Content-SHA256"] == digest


async def test_get_refuses_digests_outside_the_grant_and_expired_or_missing_grants(client, store, clock):
    mine, theirs = store.put_bytes(b"mine"), store.put_bytes(b"theirs")
    signer = GrantSigner(KEY, clock=clock)
    token = signer.issue_grant([mine], ttl=30)

    r = await client.get(blob_path(theirs), params={"grant": token})
    assert r.status == 403
    assert (await r.json())["reason"] == "DigestNotGranted"

    absent = sha(b"absent")
    r = await client.get(blob_path(absent), params={"grant": token})
    assert r.status == 403  # not granted: the car does not even learn whether it exists
    r = await client.get(blob_path(absent), params={"grant": signer.issue_grant([absent], ttl=30)})
    assert r.status == 404

    r = await client.get(blob_path(mine))
    assert r.status == 403 and (await r.json())["reason"] == "GrantMissing"
    r = await client.get(blob_path(mine), params={"grant": token[:-2] + "AA"})
    assert r.status == 403 and (await r.json())["reason"] == "GrantInvalid"
    clock.now += 31
    r = await client.get(blob_path(mine), params={"grant": token})
    body = await r.json()
    assert r.status == 403 and body["reason"] == "GrantExpired" and "re-issued" in body["error"]

    r = await client.get("/v1/blobs/sha256/NOT-A-DIGEST", params={"grant": token})
    assert r.status == 400


async def test_put_stores_a_result_only_under_an_upload_grant_and_only_if_it_hashes_to_the_path(
    client, store, clock
):
    signer = GrantSigner(KEY, clock=clock)
    result = b"result bytes" * 1000
    digest = sha(result)

    r = await client.put(blob_path(digest), data=result, params={"grant": signer.issue_grant([], ttl=30)})
    assert r.status == 403 and (await r.json())["reason"] == "UploadNotGranted"
    assert not store.has(digest)

    up = signer.issue_grant([], ttl=30, upload=True)
    r = await client.put(blob_path(digest), data=b"not the result", params={"grant": up})
    assert r.status == 400 and (await r.json())["reason"] == "DigestMismatch"
    assert not store.has(digest) and list(store.tmp_dir.iterdir()) == []

    r = await client.put(blob_path(digest), data=result, params={"grant": up})
    assert r.status == 201
    assert (await r.json()) == {"sha256": digest, "size": len(result)}
    assert store.has(digest) and store.verify(digest)

    small = signer.issue_grant([], ttl=30, upload=True, max_upload_bytes=100)
    r = await client.put(blob_path(digest), data=result, params={"grant": small})
    assert r.status == 413
