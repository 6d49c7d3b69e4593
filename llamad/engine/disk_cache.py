"""Saved KV states on disk, so that a restart, a reload or an eviction from memory does not
cost a cold prompt again (Claude Code's first request is ~12,000 tokens: minutes on a CPU).

One file per saved state, in `cache.dir`:

    magic "LLAMADKV" | version u32 | model identity 16 bytes | token count u32 | state length u64
    | tokens (i32 each) | blake2b-16 of all the above (the header's own check)
    | the state (llama.cpp's seq state bytes) | blake2b-32 of everything before it

At start only the headers are read, into an index (tokens, size, last use) that answers
"which saved state shares the longest prefix with this prompt" without touching the states.
A state is read, and its checksum verified, only when a prompt is about to reuse it.

Files are written by one background thread (never the step loop's), to a temporary name
that is then renamed, so a reader never sees half a file. A file that fails a check (bad
magic, another format version, a size that does not match its header, a checksum that does
not match) is logged once, removed and never loaded. A valid file written for another model
(or another KV layout, or another llama.cpp) is "foreign": never loaded, but it counts
toward `cache.max_bytes` and goes, least recently used first, like the others, so a model
change does not leave the old model's states on disk for ever. The directory holds at most
`cache.max_bytes`; the least recently used state (by last write or read; a file's mtime
keeps it across restarts) goes first.
"""

from __future__ import annotations

import collections
import hashlib
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("llamad.disk_cache")

MAGIC = b"LLAMADKV"
VERSION = 1
SUFFIX = ".kv"
# magic, version, identity, token count, state length
_FIXED = struct.Struct("<8sI16sIQ")
_HEADER_DIGEST = 16
_DIGEST = 32
# Sanity bounds on what a header may claim before anything is allocated for it.
MAX_TOKENS = 1 << 22
# A state shorter than this many tokens is cheaper to evaluate again than to keep on disk
# (~0.5 s of prompt on a 2-core CPU; reading it back is milliseconds).
DISK_MIN_TOKENS = 256
# A temporary file older than this was left by a process that died while writing it.
STALE_TEMP_S = 600.0
# States waiting for the writer beyond this many bytes are dropped (counted): a disk slower
# than the saves must not make the queue hold the process's memory.
MAX_PENDING_BYTES = 1 << 30


def fingerprint(model_path: Path, context: str) -> bytes:
    """The identity a saved state is valid for: the GGUF file (its size, mtime, and a hash of
    its first and last MiB: the metadata and the last tensors), the llama.cpp build (the
    state format is its own) and `context` (what shapes the KV bytes: the K/V types and flash
    attention, which transposes V). 16 bytes."""
    import llama_cpp

    h = hashlib.blake2b(digest_size=16)
    stat = model_path.stat()
    h.update(f"{stat.st_size}|{stat.st_mtime_ns}|{llama_cpp.__version__}|{context}|".encode())
    mib = 1 << 20
    with model_path.open("rb") as f:
        h.update(f.read(mib))
        if stat.st_size > 2 * mib:
            f.seek(-mib, os.SEEK_END)
            h.update(f.read(mib))
    return h.digest()


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """The length of the longest common prefix of two tuples, compared at C speed (slices)
    rather than token by token: an index of 12,000-token states is searched on every prompt."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class BadFile(Exception):
    """A file in the cache directory that must not be loaded; the message says why."""


@dataclass
class Entry:
    path: Path
    tokens: tuple[int, ...]
    size: int  # bytes on disk
    last_used: float  # wall clock, as the file's mtime


@dataclass
class Header:
    identity: bytes
    tokens: tuple[int, ...]
    data_offset: int
    data_len: int
    size: int  # what the whole file must measure


def _header_bytes(identity: bytes, tokens: tuple[int, ...], data_len: int) -> bytes:
    head = _FIXED.pack(MAGIC, VERSION, identity, len(tokens), data_len) + struct.pack(f"<{len(tokens)}i", *tokens)
    return head + hashlib.blake2b(head, digest_size=_HEADER_DIGEST).digest()


def read_header(f: Any, file_size: int) -> Header:
    """Parses and checks a header from the start of open file `f` (of `file_size` bytes)."""
    fixed = f.read(_FIXED.size)
    if len(fixed) < _FIXED.size:
        raise BadFile("shorter than a header")
    magic, version, identity, n_tokens, data_len = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise BadFile("not a llamad KV file (bad magic)")
    if version != VERSION:
        raise BadFile(f"format version {version}, this llamad reads {VERSION}")
    if not 0 < n_tokens <= MAX_TOKENS:
        raise BadFile(f"implausible token count {n_tokens}")
    data_offset = _FIXED.size + 4 * n_tokens + _HEADER_DIGEST
    size = data_offset + data_len + _DIGEST
    if size != file_size:
        raise BadFile(f"{file_size} bytes where the header says {size} (truncated or appended to)")
    rest = f.read(4 * n_tokens + _HEADER_DIGEST)
    if len(rest) < 4 * n_tokens + _HEADER_DIGEST:
        raise BadFile("truncated header")
    body, digest = rest[: 4 * n_tokens], rest[4 * n_tokens :]
    if hashlib.blake2b(fixed + body, digest_size=_HEADER_DIGEST).digest() != digest:
        raise BadFile("header checksum mismatch")
    tokens = struct.unpack(f"<{n_tokens}i", body)
    return Header(identity=identity, tokens=tokens, data_offset=data_offset, data_len=data_len, size=size)


@dataclass
class DiskStats:
    hits: int = 0  # states read back from disk (verified) for a prompt
    writes: int = 0  # states written
    write_bytes: int = 0
    rejected: int = 0  # files that failed a check: removed, never loaded
    dropped: int = 0  # states not written: the writer was too far behind
    evicted: int = 0  # files removed for the size bound


class DiskStateCache:
    """The on-disk tier of the saved-state cache (llamad.engine.prompt_cache.PromptStateCache
    holds one). Thread-safe: the step loop reads the index, a request's worker thread reads
    states, one background thread writes them."""

    def __init__(self, directory: Path, max_bytes: int, identity: bytes, min_tokens: int = DISK_MIN_TOKENS):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.identity = identity
        self.min_tokens = min_tokens
        self.stats = DiskStats()
        self._lock = threading.RLock()
        self._scan_lock = threading.Lock()  # one directory scan at a time
        self._entries: dict[str, Entry] = {}  # file name -> our states
        self._foreign: dict[str, tuple[int, float]] = {}  # file name -> (size, last used)
        self._rejected_logged: set[str] = set()
        self._dir_mtime: int | None = None
        self._queue: collections.deque[tuple[tuple[int, ...], bytes]] = collections.deque()
        self._pending_bytes = 0
        self._wake = threading.Condition(self._lock)
        self._writing = False
        self._closed = False
        self.enabled = True
        try:
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise PermissionError(f"{self.directory} is not writable")
        except OSError as exc:
            log.warning("disk_cache_disabled", dir=str(self.directory), error=str(exc))
            self.enabled = False
            return
        self.refresh()
        self._evict(keep="")  # cache.max_bytes may have been lowered since the files were written
        log.info(
            "disk_cache_ready", dir=str(self.directory), states=len(self._entries), foreign=len(self._foreign),
            bytes=self.size_bytes, max_bytes=self.max_bytes,
        )
        self._thread = threading.Thread(target=self._run, name="llamad-disk-cache", daemon=True)
        self._thread.start()

    # -- the index ---------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values()) + sum(s for s, _ in self._foreign.values())

    def __len__(self) -> int:
        return len(self._entries)

    def refresh(self) -> None:
        """Reads the headers of files the index does not know yet and forgets files that are
        gone (another process sharing the directory, or an engine swapped in by a reload,
        may have written or removed some). Cheap when the directory has not changed."""
        if not self.enabled:
            return
        with self._scan_lock:
            self._scan()

    def _scan(self) -> None:
        try:
            mtime = self.directory.stat().st_mtime_ns
        except OSError:
            return
        if mtime == self._dir_mtime:
            return
        self._dir_mtime = mtime
        try:
            names = {entry.name: entry for entry in os.scandir(self.directory)}
        except OSError as exc:
            log.warning("disk_cache_unreadable", dir=str(self.directory), error=str(exc))
            return
        with self._lock:
            for gone in [n for n in self._entries if n not in names]:
                del self._entries[gone]
            for gone in [n for n in self._foreign if n not in names]:
                del self._foreign[gone]
            known = set(self._entries) | set(self._foreign)
        for name, dirent in names.items():
            if name in known:
                continue
            if name.startswith(".") and name.endswith(".tmp"):
                self._remove_stale_temp(Path(dirent.path))
                continue
            if not name.endswith(SUFFIX) or not dirent.is_file(follow_symlinks=False):
                continue  # not ours: left alone
            self._index_file(Path(dirent.path))

    def _index_file(self, path: Path) -> None:
        try:
            with path.open("rb") as f:
                stat = os.fstat(f.fileno())
                header = read_header(f, stat.st_size)
        except BadFile as exc:
            self._reject(path, str(exc))
            return
        except OSError:
            return  # removed meanwhile
        with self._lock:
            if header.identity != self.identity:
                self._foreign[path.name] = (stat.st_size, stat.st_mtime)
            else:
                self._entries[path.name] = Entry(path, header.tokens, stat.st_size, stat.st_mtime)

    def _remove_stale_temp(self, path: Path) -> None:
        try:
            if time.time() - path.stat().st_mtime > STALE_TEMP_S:
                path.unlink()
        except OSError:
            pass

    def _reject(self, path: Path, reason: str) -> None:
        """A file that failed a check: logged once, removed, never loaded."""
        with self._lock:
            self.stats.rejected += 1
            self._entries.pop(path.name, None)
            self._foreign.pop(path.name, None)
            first = path.name not in self._rejected_logged
            self._rejected_logged.add(path.name)
        if first:
            log.warning("disk_cache_file_rejected", path=str(path), reason=reason, action="removed, not loaded")
        try:
            path.unlink()
        except OSError:
            pass

    def best(self, tokens: list[int] | tuple[int, ...]) -> tuple[Entry | None, int]:
        """The indexed state sharing the longest prefix with `tokens`, and that length. Reads
        nothing from disk."""
        if not self.enabled:
            return None, 0
        key = tuple(tokens)
        best, best_len = None, 0
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            length = common_prefix(entry.tokens, key)
            if length > best_len:
                best, best_len = entry, length
        return best, best_len

    # -- reading -----------------------------------------------------------------------------
    def load(self, entry: Entry) -> bytes | None:
        """The state `entry` indexes, read and verified; None if the file is gone or fails a
        check (then it is removed)."""
        path = entry.path
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                header = read_header(f, size)
                if header.identity != self.identity:
                    raise BadFile("written for another model (identity changed since it was indexed)")
                if header.tokens != entry.tokens:
                    raise BadFile("its tokens changed since it was indexed")
                blob = bytearray(size)
                f.seek(0)
                view = memoryview(blob)
                read = 0
                while read < size:
                    n = f.readinto(view[read:])
                    if not n:
                        raise BadFile("shorter than when it was opened")
                    read += n
        except BadFile as exc:
            self._reject(path, str(exc))
            return None
        except OSError:
            with self._lock:
                self._entries.pop(path.name, None)
            return None
        body_end = size - _DIGEST
        if hashlib.blake2b(view[:body_end], digest_size=_DIGEST).digest() != bytes(view[body_end:]):
            self._reject(path, "checksum mismatch")
            return None
        data = bytes(view[header.data_offset : header.data_offset + header.data_len])
        now = time.time()
        with self._lock:
            self.stats.hits += 1
            entry.last_used = now
        try:
            os.utime(path, (now, now))  # the recency survives a restart
        except OSError:
            pass
        return data

    # -- writing -----------------------------------------------------------------------------
    def wants(self, tokens: list[int] | tuple[int, ...], data_len: int) -> bool:
        return self.enabled and len(tokens) >= self.min_tokens and 0 < data_len <= self.max_bytes

    def write(self, tokens: list[int] | tuple[int, ...], data: bytes) -> bool:
        """Queues a state for the writer thread and returns at once; False if it is not kept
        (too short, larger than the whole cache, or the writer too far behind)."""
        if not self.wants(tokens, len(data)):
            return False
        with self._lock:
            if self._closed:
                return False
            if self._pending_bytes + len(data) > MAX_PENDING_BYTES:
                self.stats.dropped += 1
                return False
            self._queue.append((tuple(tokens), data))
            self._pending_bytes += len(data)
            self._wake.notify()
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every queued state is written; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queue or self._writing:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(timeout=left if left is not None else 1.0)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Writes what is queued (for at most `timeout` seconds), then stops the writer."""
        if not self.enabled:
            return
        if not self.flush(timeout):
            with self._lock:
                left = len(self._queue)
            log.warning("disk_cache_close_timeout", unwritten=left, timeout_s=timeout)
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._pending_bytes = 0
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                tokens, data = self._queue.popleft()
                self._writing = True
            try:
                self._store(tokens, data)
            except Exception as exc:  # a full disk, a removed directory: the cache goes on without it
                log.warning("disk_cache_write_failed", dir=str(self.directory), error=str(exc))
            finally:
                with self._lock:
                    self._pending_bytes -= len(data)
                    self._writing = False
                    self._wake.notify_all()

    def _name(self, tokens: tuple[int, ...]) -> str:
        h = hashlib.blake2b(self.identity, digest_size=16)
        h.update(struct.pack(f"<{len(tokens)}i", *tokens))
        return h.hexdigest() + SUFFIX

    def _store(self, tokens: tuple[int, ...], data: bytes) -> None:
        now = time.time()
        with self._lock:
            for entry in self._entries.values():
                if len(entry.tokens) >= len(tokens) and entry.tokens[: len(tokens)] == tokens:
                    entry.last_used = now  # already on disk (or a longer state that holds it)
                    return
        name = self._name(tokens)
        path = self.directory / name
        temp = self.directory / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        header = _header_bytes(self.identity, tokens, len(data))
        digest = hashlib.blake2b(header, digest_size=_DIGEST)
        digest.update(data)
        try:
            with temp.open("wb") as f:
                f.write(header)
                f.write(data)
                f.write(digest.digest())
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        except BaseException:
            try:
                temp.unlink()
            except OSError:
                pass
            raise
        size = len(header) + len(data) + _DIGEST
        with self._lock:
            self._entries[name] = Entry(path, tokens, size, now)
            self.stats.writes += 1
            self.stats.write_bytes += size
            # A state that is a prefix of this one is superseded by it.
            superseded = [
                n for n, e in self._entries.items()
                if n != name and len(e.tokens) < len(tokens) and tokens[: len(e.tokens)] == e.tokens
            ]  # fmt: skip
            for n in superseded:
                self._entries.pop(n)
        for n in superseded:
            self._unlink(n)
        self._evict(keep=name)
        try:
            self._dir_mtime = self.directory.stat().st_mtime_ns
        except OSError:
            pass

    def _evict(self, keep: str) -> None:
        """Removes the least recently used files (ours or foreign) until the directory holds
        at most max_bytes."""
        while True:
            with self._lock:
                if self.size_bytes <= self.max_bytes:
                    return
                candidates = [(e.last_used, n) for n, e in self._entries.items() if n != keep]
                candidates += [(used, n) for n, (_, used) in self._foreign.items()]
                if not candidates:
                    return
                _, name = min(candidates)
                self._entries.pop(name, None)
                self._foreign.pop(name, None)
                self.stats.evicted += 1
            self._unlink(name)

    def _unlink(self, name: str) -> None:
        try:
            (self.directory / name).unlink()
        except OSError:
            pass


def open_disk_cache(config: Any, model_path: Path, flash_attn: str) -> DiskStateCache | None:
    """The disk cache `config`'s [cache] table asks for, for the model at `model_path` in a
    context with `flash_attn` ("on", "off", or "auto": llama.cpp's choice); None when it is
    off (cache.max_bytes = 0) or the model file cannot be read."""
    from llamad.config import kv_cache_dir

    if config.cache.max_bytes <= 0:
        return None
    import llama_cpp

    m = config.model
    # What shapes the state's bytes besides the model: the K/V element types, flash attention
    # in effect (which stores V transposed or not; "auto" resolves by backend, so the build counts).
    context = f"type_k={m.type_k},type_v={m.type_v},flash_attn={flash_attn}"
    if m.rope_scaling or m.rope_freq_base:  # positions are encoded otherwise: other K values
        context += f",rope={m.rope_scaling}x{m.rope_scale},base={m.rope_freq_base}"
    context += f",gpu_offload={bool(llama_cpp.llama_supports_gpu_offload())}"
    try:
        identity = fingerprint(model_path, context)
    except OSError as exc:
        log.warning("disk_cache_disabled", error=f"cannot read {model_path}: {exc}")
        return None
    cache = DiskStateCache(kv_cache_dir(config), config.cache.max_bytes, identity)
    return cache if cache.enabled else None
