"""Files of batch jobs (OpenAI's files, Fireworks' datasets, the jobs' outputs): the bytes on
a volume every gateway replica mounts (the chart's PersistentVolumeClaim), what is known of
each in Redis, per account (another account's file is not found, whatever its id).

Bounded before any byte is stored: a file's size (`batch_file_max_bytes`) and what one
account keeps in all (`batch_account_max_bytes`). An upload reserves its declared size (the
file limit when it declares none) against the account's bytes in one Redis script, so that
gateways taking uploads at once cannot pass the account's bound together; what it did not
use is given back at its end. A job's output is counted when it is written, never refused
(the job's work is done): the account's next upload is refused until it deletes files.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis

from gateway.errors import GatewayError
from gateway.server.client import FORM_SLACK

# KEYS: the account's bytes; ARGV: size, bound (0: none) -> 1 reserved, 0 past the bound
# A file's or a job's id: never ':' (Redis keys are `<account>:<id>`), '/' or a leading dot
# (job folders and temporary files are `.<name>` beside the files).
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
T = TypeVar("T")
MAX_FILES = 10_000  # files one account keeps (each also counts against its bytes)
RESERVE_LUA = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local size, bound = tonumber(ARGV[1]), tonumber(ARGV[2])
if bound > 0 and used + size > bound then return 0 end
redis.call('INCRBY', KEYS[1], size)
return 1
"""


@dataclass(frozen=True)
class StoredFile:
    id: str
    account: str
    purpose: str  # "batch", "batch_output", "dataset"
    filename: str
    bytes: int
    created_at: int
    lines: int = 0
    display_name: str = ""


class FileStore:
    def __init__(self, client: aioredis.Redis, prefix: str, root: Path, *,
                 file_max: int, account_max: int) -> None:
        self.client = client
        self.prefix = f"{prefix}batch:"
        self.root = root
        self.file_max, self.account_max = file_max, account_max
        self._reserve = client.register_script(RESERVE_LUA)

    def folder(self, account: str) -> Path:
        """The account's folder on the volume (its id hashed: any id is a safe name)."""
        return self.root / hashlib.blake2b(account.encode(), digest_size=12).hexdigest()

    def _temporary(self, account: str, file_id: str) -> Path:
        """Where a file is written before it is renamed into place (its folder made)."""
        folder = self.folder(account)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f".{file_id}.{secrets.token_hex(4)}.part"

    def path(self, stored: StoredFile) -> Path:
        return self.folder(stored.account) / stored.id

    async def check_count(self, account: str) -> None:
        if await self.client.zcard(f"{self.prefix}files:{account}") >= MAX_FILES:
            raise GatewayError(429, f"The account keeps {MAX_FILES} files; delete some first")

    def _key(self, account: str, file_id: str) -> str:
        return f"{self.prefix}file:{account}:{file_id}"

    async def upload(self, account: str, chunks: AsyncIterator[bytes], declared: int | None,
                     fields: dict[str, str], check: Callable[[dict[str, str]], None],
                     file_id: str | None = None) -> StoredFile:
        """Store what `chunks` give, within the bounds (413 past either; nothing kept).
        `fields` (purpose, filename, display_name) are known once the chunks are read, and
        `check`ed then."""
        if declared is not None and declared > self.file_max + FORM_SLACK:
            raise too_large(self.file_max)
        reserved = min(declared, self.file_max) if declared is not None else self.file_max
        await self.check_count(account)
        await self.reserve(account, reserved)
        file_id = file_id or "file-" + secrets.token_hex(12)
        temporary = self._temporary(account, file_id)
        size, lines, last = 0, 0, b"\n"
        try:
            with temporary.open("wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > reserved:
                        raise too_large(self.file_max) if size > self.file_max \
                            else GatewayError(400, "The upload is longer than it declared")
                    lines += chunk.count(b"\n")
                    if chunk:
                        last = chunk[-1:]
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            check(fields)
            stored = StoredFile(file_id, account, fields.get("purpose", ""),
                                fields.get("filename", ""), size, int(time.time()),
                                lines + (last != b"\n"), fields.get("display_name", ""))
            temporary.rename(self.path(stored))
            await self.save(stored)
        except BaseException:
            temporary.unlink(missing_ok=True)
            await self.release(account, reserved)
            raise
        await self.release(account, reserved - size)
        return stored

    async def write(self, account: str, purpose: str, filename: str, data: bytes,
                    file_id: str | None = None) -> StoredFile:
        """A file the gateway writes (a job's output): counted, not refused. Written again
        under the same id (a job finalized twice) it replaces the first."""
        file_id = file_id or "file-" + secrets.token_hex(12)
        stored = StoredFile(file_id, account, purpose, filename, len(data), int(time.time()),
                            data.count(b"\n"))
        previous = await self.find(account, file_id)
        temporary = self._temporary(account, file_id)
        temporary.write_bytes(data)
        temporary.rename(self.path(stored))
        await self.client.incrby(self._bytes(account),
                                 len(data) - (previous.bytes if previous else 0))
        await self.save(stored)
        return stored

    async def save(self, stored: StoredFile) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self._key(stored.account, stored.id), orjson.dumps(asdict(stored)))
            pipe.zadd(f"{self.prefix}files:{stored.account}",
                      {stored.id: stored.created_at})
            await pipe.execute()

    def _bytes(self, account: str) -> str:
        return f"{self.prefix}bytes:{account}"

    async def reserve(self, account: str, size: int) -> None:
        if not await self._reserve(keys=[self._bytes(account)],
                                   args=[size, self.account_max]):
            raise GatewayError(413, f"The account's files would take more than "
                                    f"{self.account_max} bytes; delete some first")

    async def release(self, account: str, size: int) -> None:
        if size:
            await self.client.decrby(self._bytes(account), size)

    async def used(self, account: str) -> int:
        return int(await self.client.get(self._bytes(account)) or 0)

    async def find(self, account: str, file_id: str) -> StoredFile | None:
        if not ID.fullmatch(file_id):
            return None
        raw = await self.client.get(self._key(account, file_id))
        return None if raw is None else StoredFile(**orjson.loads(raw))

    async def get(self, account: str, file_id: str) -> StoredFile:
        found = await self.find(account, file_id)
        if found is None:
            raise GatewayError(404, f"No such file: {file_id}")
        return found

    async def listed(self, account: str, purpose: str | None = None, limit: int = 10000,
                     after: str | None = None, newest_first: bool = True) -> list[StoredFile]:
        async def wanted(file_id: str) -> StoredFile | None:
            stored = await self.find(account, file_id)
            return stored if stored is not None and purpose in (None, stored.purpose) \
                else None
        return await page(self.client, f"{self.prefix}files:{account}", wanted, limit, after,
                          newest_first)

    async def delete(self, account: str, file_id: str) -> StoredFile:
        stored = await self.get(account, file_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(account, file_id))
            pipe.zrem(f"{self.prefix}files:{account}", file_id)
            deleted, _ = await pipe.execute()
        if not deleted:  # another delete of it came first, and gave its bytes back
            raise GatewayError(404, f"No such file: {file_id}")
        self.path(stored).unlink(missing_ok=True)
        await self.release(account, stored.bytes)
        return stored

    def read(self, stored: StoredFile) -> bytes:
        return self.path(stored).read_bytes()


async def page(client: aioredis.Redis, index: str, find: Callable[[str], Awaitable[T | None]],
               limit: int, after: str | None, newest_first: bool = True) -> list[T]:
    """Up to `limit` of the things an index (a sorted set of ids by time) names, after the
    id `after`, each read with `find` (None: skipped)."""
    ids: Any = await client.zrange(index, 0, -1, desc=newest_first)
    found: list[T] = []
    started = after is None
    for raw in ids:
        name = raw.decode()
        if not started:
            started = name == after
            continue
        thing = await find(name)
        if thing is not None:
            found.append(thing)
            if len(found) >= limit:
                break
    return found


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The file is larger than {limit} bytes",
                        headers={"connection": "close"})


def openai_file(stored: StoredFile) -> dict[str, Any]:
    """The file object OpenAI's files API answers with."""
    return {"id": stored.id, "object": "file", "bytes": stored.bytes,
            "created_at": stored.created_at, "filename": stored.filename,
            "purpose": stored.purpose, "status": "processed", "expires_at": None,
            "status_details": None}
