"""Saved KV states on disk (llamad.engine.disk_cache): a round trip, a restart finding them,
bad files (a corrupt byte, a truncated file, another model's, another format version, a
random file) ignored and never loaded, the size bound evicting the least recently used,
writes off the caller's thread, and the step loop restoring a state a previous process
wrote."""

from __future__ import annotations

import os
import queue
import struct
import threading
import time
from pathlib import Path

import pytest

from fake_backend import FakeBackend
from fake_engine import FakeEngine
from llamad.config import Config, ConfigError, kv_cache_dir, load_config
from llamad.engine import Generation, Prompt
from llamad.engine.disk_cache import MAGIC, SUFFIX, DiskStateCache, common_prefix, read_header
from llamad.engine.prompt_cache import PromptStateCache
from llamad.engine.slots import Sequence, StepLoop

pytestmark = pytest.mark.timeout(60)

MODEL = b"model-identity-A"  # 16 bytes, as llamad.engine.disk_cache.fingerprint gives
OTHER = b"model-identity-B"
TOKENS = tuple(range(1000, 1400))  # 400 tokens: worth keeping on disk (>= DISK_MIN_TOKENS)


def state(tokens, salt: int = 7) -> bytes:
    """Bytes standing for a KV state: distinct per token list."""
    return bytes((t * 31 + salt) % 251 for t in tokens) * 3


def disk(directory: Path, max_bytes: int = 1 << 30, identity: bytes = MODEL) -> DiskStateCache:
    return DiskStateCache(directory, max_bytes, identity)


def written(directory: Path, tokens=TOKENS, data: bytes | None = None, identity: bytes = MODEL) -> Path:
    """One state written by a cache that is then closed (as a process that stopped)."""
    cache = disk(directory, identity=identity)
    assert cache.write(tokens, data if data is not None else state(tokens))
    cache.close(timeout=10)
    (path,) = kv_files(directory)
    return path


def kv_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))


# -- round trip and restart ---------------------------------------------------------------------


def test_a_state_goes_to_disk_and_comes_back(tmp_path):
    cache = disk(tmp_path)
    data = state(TOKENS)
    assert cache.write(TOKENS, data)
    assert cache.flush(timeout=10)
    entry, shared = cache.best(TOKENS + (5, 6))
    assert entry is not None and entry.tokens == TOKENS and shared == len(TOKENS)
    assert cache.load(entry) == data
    assert (cache.stats.writes, cache.stats.hits) == (1, 1)
    assert cache.size_bytes == kv_files(tmp_path)[0].stat().st_size > len(data)
    cache.close()


def test_a_restart_finds_the_state_by_its_prefix(tmp_path):
    """A new cache object on the same directory (a new process) indexes the file from its
    header and serves a longer prompt that starts with its tokens."""
    written(tmp_path)
    again = PromptStateCache(1 << 20, disk=disk(tmp_path))
    assert len(again) == 0 and len(again.disk) == 1
    prompt = list(TOKENS) + [1, 2, 3]
    saved, shared = again.best(prompt)
    assert saved is not None and saved.tokens == TOKENS and saved.data == state(TOKENS) and shared == len(TOKENS)
    # A prompt sharing only part of it gets that part.
    saved, shared = again.best(list(TOKENS[:300]) + [9, 9])
    assert saved is not None and shared == 300
    assert again.best([5, 5, 5]) == (None, 0)


def test_a_prompt_announced_beforehand_is_read_before_the_loop_asks(tmp_path):
    """prefetch (a request's worker thread) reads the state; best (the step loop) then only
    takes it. When the slot already holds as much, nothing is read."""
    written(tmp_path)
    cache = PromptStateCache(1 << 20, disk=disk(tmp_path))
    prompt = list(TOKENS) + [1]
    cache.prefetch(prompt, held=len(TOKENS))
    assert cache.disk.stats.hits == 0
    assert cache.best(prompt) == (None, 0)  # the slot's own prefix will do
    cache.prefetch(prompt, held=0)
    assert cache.disk.stats.hits == 1
    (path,) = kv_files(tmp_path)
    path.unlink()  # the loop must not need the file any more
    saved, shared = cache.best(prompt)
    assert saved is not None and saved.data == state(TOKENS) and shared == len(TOKENS)


def test_a_longer_state_supersedes_its_prefix_and_a_covered_one_is_not_written(tmp_path):
    cache = disk(tmp_path)
    longer = TOKENS + tuple(range(50))
    cache.write(TOKENS, state(TOKENS))
    cache.write(longer, state(longer))
    cache.write(TOKENS[:350], state(TOKENS[:350]))  # held by the longer one already
    assert cache.flush(timeout=10)
    assert len(kv_files(tmp_path)) == 1 and cache.stats.writes == 2
    entry, _ = cache.best(TOKENS)
    assert entry.tokens == longer
    cache.close()


def test_short_and_oversized_states_are_not_written(tmp_path):
    cache = disk(tmp_path, max_bytes=2000)
    assert not cache.write(TOKENS[:100], state(TOKENS[:100]))  # shorter than DISK_MIN_TOKENS
    assert not cache.write(TOKENS, b"x" * 2001)  # larger than the whole cache
    assert cache.flush(timeout=10) and kv_files(tmp_path) == []
    cache.close()


# -- bad files: detected, ignored, never loaded ------------------------------------------------


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def corrupt_data_byte(path: Path) -> None:
    flip(path, path.stat().st_size - 100)  # inside the state: only the full checksum sees it


def corrupt_token(path: Path) -> None:
    flip(path, 44)  # a token in the header: the header checksum sees it


def truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 10)


def wrong_version(path: Path) -> None:
    """A well-formed file of another format version (both checksums match): only the
    version tells it apart."""
    import hashlib

    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", 99)
    header_end = 40 + 4 * len(TOKENS)
    raw[header_end : header_end + 16] = hashlib.blake2b(bytes(raw[:header_end]), digest_size=16).digest()
    raw[-32:] = hashlib.blake2b(bytes(raw[:-32]), digest_size=32).digest()
    path.write_bytes(bytes(raw))


def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def bad_magic(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[:8] = b"GGUFxxxx"
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage", [corrupt_data_byte, corrupt_token, truncate, wrong_version, random_bytes, bad_magic]
)
def test_a_damaged_file_is_removed_and_never_loaded(tmp_path, damage):
    path = written(tmp_path)
    damage(path)
    cache = PromptStateCache(1 << 20, disk=disk(tmp_path))
    assert cache.best(list(TOKENS) + [1]) == (None, 0)
    assert cache.disk.stats.hits == 0 and cache.disk.stats.rejected == 1
    assert not path.exists() and len(cache.disk) == 0


def test_another_models_state_is_never_loaded_but_counts_toward_the_bound(tmp_path):
    foreign = written(tmp_path, identity=OTHER)
    cache = PromptStateCache(1 << 20, disk=disk(tmp_path))
    assert cache.best(list(TOKENS) + [1]) == (None, 0)
    assert cache.disk.stats.hits == 0 and len(cache.disk) == 0
    assert foreign.exists() and cache.disk.size_bytes == foreign.stat().st_size
    # It goes first when the bound needs room (a model change leaves nothing for ever).
    bounded = disk(tmp_path, max_bytes=foreign.stat().st_size + 10)
    other = tuple(range(5000, 5400))
    bounded.write(other, state(other))
    assert bounded.flush(timeout=10)
    assert not foreign.exists() and len(bounded) == 1 and bounded.stats.evicted == 1
    bounded.close()


def test_a_file_swapped_for_another_models_after_indexing_is_not_loaded(tmp_path):
    path = written(tmp_path)
    cache = PromptStateCache(1 << 20, disk=disk(tmp_path))
    assert len(cache.disk) == 1
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    os.replace(written(other_dir, identity=OTHER), path)
    assert cache.best(list(TOKENS) + [1]) == (None, 0)
    assert cache.disk.stats.hits == 0 and not path.exists()


def test_files_that_are_not_ours_are_left_alone(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"hello")
    (tmp_path / "sub.kv").mkdir()
    stale = tmp_path / ".abc.kv.1.2.tmp"
    stale.write_bytes(b"half a file")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / ".def.kv.1.2.tmp"
    fresh.write_bytes(b"being written by another process")
    cache = disk(tmp_path)
    assert len(cache) == 0 and cache.stats.rejected == 0
    assert notes.read_bytes() == b"hello" and (tmp_path / "sub.kv").is_dir()
    assert not stale.exists() and fresh.exists()  # a temp file left by a crash goes
    cache.close()


def test_header_reader_refuses_impossible_sizes(tmp_path):
    path = written(tmp_path)
    raw = path.read_bytes()
    huge = raw[:28] + struct.pack("<I", 1 << 30) + raw[32:]
    (tmp_path / "huge.kv").write_bytes(huge)
    with (tmp_path / "huge.kv").open("rb") as f, pytest.raises(Exception, match="implausible token count"):
        read_header(f, len(huge))
    assert raw[:8] == MAGIC


# -- the size bound ------------------------------------------------------------------------------


def test_the_size_bound_evicts_the_least_recently_used(tmp_path):
    a, b, c = (tuple(range(base, base + 300)) for base in (10_000, 20_000, 30_000))
    probe = disk(tmp_path / "probe")
    probe.write(a, state(a))
    probe.flush(timeout=10)
    one = probe.size_bytes
    probe.close()
    cache = disk(tmp_path / "kv", max_bytes=2 * one + 10)
    cache.write(a, state(a))
    cache.flush(timeout=10)
    time.sleep(0.01)
    cache.write(b, state(b))
    cache.flush(timeout=10)
    time.sleep(0.01)
    entry, _ = cache.best(a)
    assert cache.load(entry) == state(a)  # a is used again: b is now the least recent
    time.sleep(0.01)
    cache.write(c, state(c))
    cache.flush(timeout=10)
    assert cache.best(b)[1] == 0 and cache.best(a)[1] == 300 and cache.best(c)[1] == 300
    assert len(kv_files(tmp_path / "kv")) == 2 and cache.size_bytes <= 2 * one + 10
    cache.close()
    # The order survives a restart (the files' mtimes): a is older than c, so a goes next.
    time.sleep(0.01)
    again = disk(tmp_path / "kv", max_bytes=2 * one + 10)
    d = tuple(range(40_000, 40_300))
    again.write(d, state(d))
    again.flush(timeout=10)
    assert again.best(a)[1] == 0 and again.best(c)[1] == 300 and again.best(d)[1] == 300
    again.close()


def test_a_lowered_bound_applies_at_start(tmp_path):
    a, b = tuple(range(10_000, 10_300)), tuple(range(20_000, 20_300))
    cache = disk(tmp_path)
    cache.write(a, state(a))
    cache.flush(timeout=10)
    time.sleep(0.01)
    cache.write(b, state(b))
    cache.close(timeout=10)
    one = kv_files(tmp_path)[0].stat().st_size
    again = disk(tmp_path, max_bytes=one + 10)
    assert again.best(a)[1] == 0 and again.best(b)[1] == 300 and len(kv_files(tmp_path)) == 1
    again.close()


def test_zero_max_bytes_turns_the_disk_cache_off(tmp_path):
    config = load_config(write_toml(tmp_path, "[cache]\nmax_bytes = 0\n"), env={}).config
    from llamad.engine.disk_cache import open_disk_cache

    assert open_disk_cache(config, tmp_path / "model.gguf", "on") is None


# -- off the caller's thread ---------------------------------------------------------------------


def test_writes_happen_off_the_callers_thread(tmp_path, monkeypatch):
    cache = disk(tmp_path)
    release = threading.Event()
    threads: list[str] = []
    store = DiskStateCache._store

    def slow_store(self, tokens, data):
        threads.append(threading.current_thread().name)
        release.wait(timeout=10)
        store(self, tokens, data)

    monkeypatch.setattr(DiskStateCache, "_store", slow_store)
    started = time.monotonic()
    assert cache.write(TOKENS, state(TOKENS))
    assert time.monotonic() - started < 0.5  # returned while the write is held up
    deadline = time.monotonic() + 5
    while not threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads and threads[0] != threading.current_thread().name
    assert kv_files(tmp_path) == [] and not cache.flush(timeout=0.05)
    release.set()
    assert cache.flush(timeout=10) and len(kv_files(tmp_path)) == 1
    cache.close()


def test_a_writer_too_far_behind_drops_states_instead_of_holding_memory(tmp_path, monkeypatch):
    import llamad.engine.disk_cache as disk_cache

    monkeypatch.setattr(disk_cache, "MAX_PENDING_BYTES", 4000)
    cache = disk(tmp_path)
    release = threading.Event()
    store = DiskStateCache._store
    monkeypatch.setattr(DiskStateCache, "_store", lambda self, t, d: (release.wait(timeout=10), store(self, t, d)))
    states = [tuple(range(base, base + 300)) for base in (0, 10_000, 20_000, 30_000, 40_000)]
    accepted = [cache.write(t, state(t)) for t in states]
    assert not all(accepted) and cache.stats.dropped >= 1
    release.set()
    cache.close(timeout=10)


# -- the step loop across a restart ---------------------------------------------------------------


class StatefulBackend(FakeBackend):
    """A fake backend whose saved states carry the positions held, checked on load."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.loaded: list[int] = []

    def save_state(self, slot: int) -> bytes | None:
        held = self.kv[slot]
        return struct.pack(f"<{len(held)}i", *held) if held else None

    def load_state(self, slot: int, data: bytes) -> bool:
        positions = list(struct.unpack(f"<{len(data) // 4}i", data))
        assert positions == list(range(len(positions)))
        self.kv[slot] = positions
        self.loaded.append(len(positions))
        return True


def run(loop: StepLoop, tokens: list[int]) -> Sequence:
    seq = Sequence(generation=Generation(prompt=Prompt(text="", tokens=tokens), max_tokens=3))
    loop.submit(seq)
    for _ in range(2000):
        if seq.ended:
            return seq
        loop.step()
    raise AssertionError("the step loop did not finish the sequence")


def first_int(seq: Sequence) -> int:
    while True:
        item = seq.out.get_nowait()
        if isinstance(item, int):
            return item


def test_the_step_loop_reuses_a_state_a_previous_process_left_on_disk(tmp_path):
    prompt = list(range(2000, 2600))
    backend = StatefulBackend(n_slots=1, n_ctx=2048, n_batch=256, prompt_step=256)
    loop = StepLoop(backend, PromptStateCache(1 << 20, disk=disk(tmp_path)))
    first = run(loop, prompt)
    assert first_int(first) == 0
    # Stopping: what the slot holds is kept (llamad.engine.llama.LlamaEngine.close does this).
    loop._save(loop.slots[0])
    loop.prompt_cache.close(timeout=10)
    assert len(kv_files(tmp_path)) == 1

    backend = StatefulBackend(n_slots=1, n_ctx=2048, n_batch=256, prompt_step=256)
    loop = StepLoop(backend, PromptStateCache(1 << 20, disk=disk(tmp_path)))
    second = run(loop, prompt + [7, 8])
    assert backend.loaded == [len(prompt)]
    assert first_int(second) == len(prompt)
    evaluated = sum(len(b["tokens"]) for b in backend.batches)
    assert evaluated < 10  # two new prompt tokens and the answer, not 600 again
    assert loop.prompt_cache.disk.stats.hits == 1


def test_the_step_loop_reads_a_damaged_file_as_a_cold_prompt(tmp_path):
    prompt = list(range(2000, 2600))
    backend = StatefulBackend(n_slots=1, n_ctx=2048, n_batch=256, prompt_step=256)
    loop = StepLoop(backend, PromptStateCache(1 << 20, disk=disk(tmp_path)))
    run(loop, prompt)
    loop._save(loop.slots[0])
    loop.prompt_cache.close(timeout=10)
    corrupt_data_byte(kv_files(tmp_path)[0])

    backend = StatefulBackend(n_slots=1, n_ctx=2048, n_batch=256, prompt_step=256)
    loop = StepLoop(backend, PromptStateCache(1 << 20, disk=disk(tmp_path)))
    again = run(loop, prompt)
    assert backend.loaded == [] and first_int(again) == 0
    assert kv_files(tmp_path) == [] and loop.prompt_cache.disk.stats.rejected == 1


# -- configuration -------------------------------------------------------------------------------


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llamad.toml"
    path.write_text(text)
    return path


def test_the_cache_table_comes_from_the_file_and_the_environment(tmp_path):
    path = write_toml(tmp_path, '[cache]\ndir = "/srv/kv"\nmax_bytes = 1000\n')
    cache = load_config(path, env={}).config.cache
    assert (cache.dir, cache.max_bytes) == ("/srv/kv", 1000)
    cache = load_config(path, env={"LLAMAD_CACHE_DIR": "/x", "LLAMAD_CACHE_MAX_BYTES": "0"}).config.cache
    assert (cache.dir, cache.max_bytes) == ("/x", 0)
    assert load_config(write_toml(tmp_path, ""), env={}).config.cache.max_bytes == 2 * 1024**3
    with pytest.raises(ConfigError, match="cache.max_bytes"):
        load_config(write_toml(tmp_path, "[cache]\nmax_bytes = -1\n"), env={})
    with pytest.raises(ConfigError, match="cache.size"):
        load_config(write_toml(tmp_path, "[cache]\nsize = 1\n"), env={})


def test_the_default_directory_is_systemds_cache_directory_else_the_users(tmp_path):
    config = Config()
    assert kv_cache_dir(config, {"CACHE_DIRECTORY": "/var/cache/llamad"}) == Path("/var/cache/llamad/kv")
    assert kv_cache_dir(config, {"CACHE_DIRECTORY": "/var/cache/a:/var/cache/b"}) == Path("/var/cache/a/kv")
    assert kv_cache_dir(config, {"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == Path("/c/llamad/kv")
    assert kv_cache_dir(config, {"HOME": "/h"}) == Path("/h/.cache/llamad/kv")
    assert kv_cache_dir(load_config(write_toml(tmp_path, '[cache]\ndir = "~/kv"\n'), env={}).config, {}) == Path("~/kv").expanduser()
    # The unit gives the service that directory, writable under ProtectSystem=strict.
    unit = (Path(__file__).resolve().parent.parent / "etc" / "llamad.service").read_text()
    assert "\nCacheDirectory=llamad\n" in unit


def test_an_unwritable_directory_turns_the_disk_cache_off_and_nothing_fails(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    cache = DiskStateCache(blocker / "kv", 1 << 20, MODEL)
    assert not cache.enabled and not cache.write(TOKENS, state(TOKENS)) and cache.best(TOKENS) == (None, 0)
    cache.close()


def test_common_prefix_matches_the_token_by_token_count():
    import random

    rng = random.Random(5)
    for _ in range(300):
        a = tuple(rng.randrange(3) for _ in range(rng.randrange(0, 40)))
        b = a[: rng.randrange(0, len(a) + 1)] + tuple(rng.randrange(3) for _ in range(rng.randrange(0, 5)))
        expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == expected


@pytest.mark.asyncio
async def test_metrics_count_disk_hits_writes_and_bytes(make_client, tmp_path):
    cache = disk(tmp_path / "kv")
    cache.write(TOKENS, state(TOKENS))
    cache.flush(timeout=10)
    cache.load(cache.best(TOKENS)[0])
    engine = FakeEngine()
    engine.disk_cache = cache
    async with make_client(engine) as client:
        text = (await client.get("/metrics")).text
    size = kv_files(tmp_path / "kv")[0].stat().st_size
    for line in (
        "llamad_prompt_cache_disk_hits_total 1",
        "llamad_prompt_cache_disk_writes_total 1",
        f"llamad_prompt_cache_disk_written_bytes_total {size}",
        "llamad_prompt_cache_disk_rejected_total 0",
        f"llamad_prompt_cache_disk_bytes {size}",
    ):
        assert f"\n{line}\n" in text, line
    cache.close()


class RefusingBackend(StatefulBackend):
    """llama.cpp refusing a state (another KV layout than the identity could tell apart):
    the slot is left empty, as llama_state_seq_set_data leaves it."""

    def load_state(self, slot: int, data: bytes) -> bool:
        self.kv[slot] = []
        self.loaded.append(-1)
        return False


def test_a_state_the_backend_refuses_leaves_a_cold_prompt_not_a_broken_one(tmp_path):
    prompt = list(range(2000, 2600))
    backend = StatefulBackend(n_slots=1, n_ctx=2048, n_batch=256, prompt_step=256)
    loop = StepLoop(backend, PromptStateCache(1 << 20, disk=disk(tmp_path)))
    run(loop, prompt)
    loop._save(loop.slots[0])
    loop.prompt_cache.close(timeout=10)

    backend = RefusingBackend(n_slots=1, n_ctx=2048, n_batch=256, prompt_step=256)
    loop = StepLoop(backend, PromptStateCache(1 << 20, disk=disk(tmp_path)))
    other = run(loop, prompt[:300] + [9] * 5)  # the slot now holds 300 tokens of the prompt
    assert backend.loaded == [-1] and first_int(other) == 0
    # The saved state (600 tokens) beats the slot's 300: the slot is cleared for it, and
    # refused. What the slot held is gone, so nothing of it may be reused.
    again = run(loop, prompt + [7])  # FakeBackend checks every position follows the last
    assert backend.loaded == [-1, -1] and first_int(again) == 0
    assert backend.kv[0][:601] == list(range(601))


def test_a_state_saved_with_flash_attention_on_is_foreign_with_it_off(tmp_path):
    # Flash attention stores V transposed or not: the identity follows the setting in effect
    # (model.flash_attn = "auto" resolves to on or off at load), not the configured word.
    from llamad.engine.disk_cache import open_disk_cache

    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(4096))
    config = load_config(write_toml(tmp_path, f'[cache]\ndir = "{tmp_path / "kv"}"\n'), env={}).config
    identities = {setting: open_disk_cache(config, model, setting).identity for setting in ("on", "off", "auto")}
    assert len(set(identities.values())) == 3
    assert open_disk_cache(config, model, "on").identity == identities["on"]
