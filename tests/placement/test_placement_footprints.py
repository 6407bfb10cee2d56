"""The footprint store on a real SQLite file, and the estimate used before anything is known."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from modelyard.placement.estimate import estimate_bytes, weights_bytes
from modelyard.placement.footprints import (
    FILE_NAME,
    GIB,
    Footprint,
    FootprintStore,
    FootprintStoreError,
    engine_fingerprint,
)

ARGV = ["vllm", "serve", "/models/qwen", "--host", "127.0.0.1", "--port", "8123"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> FootprintStore:
    return FootprintStore(tmp_path, clock=Clock())


# ----- fingerprints -----


def test_fingerprint_ignores_the_port_and_the_gateways_budget() -> None:
    base = engine_fingerprint(ARGV, {}, "/models/qwen", port=8123)
    other_port = [*ARGV[:-1], "9000"]
    assert engine_fingerprint(other_port, {}, "/models/qwen", port=9000) == base
    budget = [*ARGV, "--gpu-memory-utilization", "0.412"]
    assert engine_fingerprint(budget, {}, "/models/qwen", port=8123) == base
    assert engine_fingerprint([*ARGV, "--gpu-memory-utilization=0.5"], {}, "/models/qwen") == (
        engine_fingerprint(ARGV, {}, "/models/qwen")
    )
    pinned_gpu = {"CUDA_VISIBLE_DEVICES": "1"}
    assert engine_fingerprint(ARGV, pinned_gpu, "/models/qwen", port=8123) == base


def test_fingerprint_changes_with_args_env_and_model() -> None:
    base = engine_fingerprint(ARGV, {}, "/models/qwen", port=8123)
    assert engine_fingerprint([*ARGV, "--max-model-len", "8192"], {}, "/models/qwen") != base
    assert engine_fingerprint(ARGV, {"VLLM_USE_V1": "0"}, "/models/qwen", port=8123) != base
    assert engine_fingerprint(ARGV, {}, "/models/other", port=8123) != base


def test_fingerprint_templates_the_port_inside_command_arguments() -> None:
    one = engine_fingerprint(
        ["server", "--listen=127.0.0.1:8001", "-c", "8001"], {}, None, port=8001
    )
    two = engine_fingerprint(
        ["server", "--listen=127.0.0.1:8002", "-c", "8002"], {}, None, port=8002
    )
    assert one == two
    # A number that only looks like the port elsewhere is kept: it may be a context length.
    assert engine_fingerprint(["s", "--ctx", "80010"], {}, None, port=8001) != engine_fingerprint(
        ["s", "--ctx", "80020"], {}, None, port=8002
    )


# ----- the store -----


def test_unknown_model_has_no_footprint(store: FootprintStore) -> None:
    assert store.get("m", "f") is None
    assert store.all() == []


def test_record_and_read_back(store: FootprintStore) -> None:
    found = store.record("m", "f", awake_bytes_per_gpu=10 * GIB, start_seconds=30.0)
    assert found.awake_bytes_per_gpu == 10 * GIB
    assert found.start_seconds == 30.0
    assert found.asleep_bytes_per_gpu is None
    assert found.wake_seconds is None
    assert store.get("m", "f") == found


def test_footprints_are_per_model_and_per_configuration(store: FootprintStore) -> None:
    store.record("m", "args-1", awake_bytes_per_gpu=10 * GIB)
    store.record("m", "args-2", awake_bytes_per_gpu=14 * GIB)
    store.record("n", "args-1", awake_bytes_per_gpu=3 * GIB)
    sizes = {(f.model, f.fingerprint): f.awake_bytes_per_gpu for f in store.all()}
    assert sizes == {("m", "args-1"): 10 * GIB, ("m", "args-2"): 14 * GIB, ("n", "args-1"): 3 * GIB}


def test_bytes_are_the_recent_peak_and_seconds_a_moving_average(tmp_path: Path) -> None:
    store = FootprintStore(tmp_path, window=3, smoothing=0.5, clock=Clock())
    for size, seconds in [(20, 40.0), (10, 30.0), (11, 20.0), (12, 10.0)]:
        store.record("m", "f", awake_bytes_per_gpu=size * GIB, start_seconds=seconds)
    found = store.get("m", "f")
    assert found is not None
    # The 20 GiB sample fell out of the window of 3; the peak of 10, 11, 12 remains.
    assert found.awake_bytes_per_gpu == 12 * GIB
    # EMA over 30, 20, 10 with alpha 0.5: 30 -> 25 -> 17.5
    assert found.start_seconds == pytest.approx(17.5)


def test_persisted_across_reopen_in_wal_mode(tmp_path: Path) -> None:
    FootprintStore(tmp_path).record("m", "f", awake_bytes_per_gpu=GIB, wake_seconds=1.5)
    reopened = FootprintStore(tmp_path)
    found = reopened.get("m", "f")
    assert found is not None
    assert found.wake_seconds == 1.5
    with sqlite3.connect(tmp_path / FILE_NAME) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failed_write_leaves_nothing_behind(store: FootprintStore) -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        store.record("m", "f", awake_bytes_per_gpu=GIB, start_seconds=-1.0)
    assert store.get("m", "f") is None


def test_a_write_is_atomic_all_metrics_or_none(store: FootprintStore) -> None:
    class Boom(Exception):
        pass

    calls = 0
    real_execute = sqlite3.Connection.execute

    def failing_execute(conn: sqlite3.Connection, sql: str, *args: object) -> sqlite3.Cursor:
        nonlocal calls
        if sql.startswith("INSERT"):
            calls += 1
            if calls == 2:
                raise Boom
        return real_execute(conn, sql, *args)

    class Proxy:
        """Delegates to the real connection but fails on the second insert."""

        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            return failing_execute(self.conn, sql, *args)

    store._db._connection = Proxy(store._db._connection)  # type: ignore[assignment]
    with pytest.raises(Boom):
        store.record("m", "f", awake_bytes_per_gpu=GIB, start_seconds=5.0)
    store._db._connection = store._db._connection.conn  # type: ignore[attr-defined]
    assert store.get("m", "f") is None


def test_forget(store: FootprintStore) -> None:
    store.record("m", "a", awake_bytes_per_gpu=GIB)
    store.record("m", "b", awake_bytes_per_gpu=GIB)
    assert store.forget("m", "a") == 1
    assert [f.fingerprint for f in store.all()] == ["b"]
    assert store.forget("m") == 1
    assert store.all() == []


def test_concurrent_writers_from_threads(store: FootprintStore) -> None:
    def write(n: int) -> None:
        for i in range(20):
            store.record(f"m{n}", "f", awake_bytes_per_gpu=(i + 1) * GIB, start_seconds=float(i))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(f.model for f in store.all()) == ["m0", "m1", "m2", "m3"]
    assert all(f.samples == 16 for f in store.all())  # window 8, two metrics


def test_two_stores_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    one, two = FootprintStore(tmp_path), FootprintStore(tmp_path)
    one.record("m", "f", awake_bytes_per_gpu=GIB)
    assert two.get("m", "f") is not None


# ----- a bad file -----


def test_corrupt_file_is_moved_aside_and_reported(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"this is not a database, it is a text file" * 100)
    reports: list[tuple[Path, str]] = []
    store = FootprintStore(tmp_path, on_corrupt=lambda path, why: reports.append((path, why)))
    assert len(reports) == 1
    moved, why = reports[0]
    assert moved.name.startswith(f"{FILE_NAME}.corrupt-")
    assert moved.read_bytes().startswith(b"this is not a database")
    assert "not a database" in why
    assert store.recovered == [moved]
    # The store works, on a fresh file.
    store.record("m", "f", awake_bytes_per_gpu=GIB)
    assert store.get("m", "f") is not None


def test_damaged_pages_are_found_by_the_check_and_moved_aside(tmp_path: Path) -> None:
    store = FootprintStore(tmp_path)
    for i in range(300):
        store.record(f"model-{i}", "f", awake_bytes_per_gpu=GIB, start_seconds=1.0)
    store.close()
    path = tmp_path / FILE_NAME
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = bytearray(path.read_bytes())
    page = 4096
    raw[page * 2 : page * 2 + 512] = b"\xff" * 512  # scribble over a b-tree page
    path.write_bytes(bytes(raw))
    reopened = FootprintStore(tmp_path)
    assert len(reopened.recovered) == 1
    assert reopened.all() == []


def test_a_second_corruption_gets_its_own_name(tmp_path: Path) -> None:
    clock = Clock()
    for _ in range(2):
        (tmp_path / FILE_NAME).write_bytes(b"garbage" * 1000)
        clock.now = 1_800_000_000.0  # the same second both times
        FootprintStore(tmp_path, clock=clock).close()
    moved = sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name)
    assert len(moved) == 2


def test_unreadable_path_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).mkdir()  # SQLite cannot open a folder: "unable to open"
    store = FootprintStore(tmp_path)
    assert len(store.recovered) == 1
    assert store.recovered[0].is_dir()


def test_newer_schema_is_set_aside_like_every_state_file(tmp_path: Path) -> None:
    # The shared state helper's rule (modelyard.state): kept for a human, reported, and a
    # fresh file is used (footprints can be measured again).
    with sqlite3.connect(tmp_path / FILE_NAME) as conn:
        conn.execute("PRAGMA user_version = 99")
    reports: list[tuple[Path, str]] = []
    store = FootprintStore(tmp_path, on_corrupt=lambda path, why: reports.append((path, why)))
    assert len(reports) == 1
    assert "newer" in reports[0][1]
    assert reports[0][0].exists()
    store.record("m", "f", awake_bytes_per_gpu=GIB)
    assert store.get("m", "f") is not None


def test_a_store_that_cannot_be_created_says_why(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises((FootprintStoreError, OSError)):
        FootprintStore(blocker)


# ----- estimates -----


def footprint(awake: int | None) -> Footprint:
    return Footprint("m", "f", awake, None, None, None, 1, 0.0)


def test_estimate_prefers_the_measured_footprint(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    found = estimate_bytes(footprint=footprint(7 * GIB), hint_bytes=9 * GIB, model=str(tmp_path))
    assert (found.bytes_per_gpu, found.source) == (7 * GIB, "measured")


def test_estimate_then_the_hint(tmp_path: Path) -> None:
    found = estimate_bytes(footprint=footprint(None), hint_bytes=9 * GIB, model=str(tmp_path))
    assert (found.bytes_per_gpu, found.source) == (9 * GIB, "hint")


def test_estimate_then_the_disk_size_with_margin(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "b.safetensors").write_bytes(b"x" * 1000)
    found = estimate_bytes(
        footprint=None,
        hint_bytes=None,
        model=str(tmp_path),
        tensor_parallel=2,
        safety_factor=1.5,
        overhead_bytes=100,
    )
    assert found.source == "disk"
    assert found.bytes_per_gpu == 2000 // 2 * 1.5 + 100


def test_estimate_last_the_whole_gpu() -> None:
    found = estimate_bytes(footprint=None, hint_bytes=None, model="/nowhere/at/all")
    assert (found.bytes_per_gpu, found.source) == (None, "whole_gpu")
    assert estimate_bytes(footprint=None, hint_bytes=None, model=None).source == "whole_gpu"


def test_weights_count_one_format_and_each_file_once(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 300)
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "consolidated.00.pth").write_bytes(b"x" * 300)  # the same weights
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "model.safetensors")
    assert weights_bytes(str(tmp_path)) == 300


def test_weights_of_a_gguf_file_and_a_folder_of_quantizations(tmp_path: Path) -> None:
    (tmp_path / "m.Q4.gguf").write_bytes(b"x" * 400)
    (tmp_path / "m.Q8.gguf").write_bytes(b"x" * 800)
    assert weights_bytes(str(tmp_path / "m.Q4.gguf")) == 400
    assert weights_bytes(str(tmp_path)) == 800


def test_weights_found_in_the_hugging_face_cache(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--name"
    blob = repo / "blobs" / "abc"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"x" * 500)
    snapshot = repo / "snapshots" / "deadbeef"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("deadbeef\n")
    assert weights_bytes("org/name", {"HF_HUB_CACHE": str(tmp_path / "hub")}) == 500
    assert weights_bytes("org/name", {"HF_HOME": str(tmp_path)}) == 500
    assert weights_bytes("org/missing", {"HF_HOME": str(tmp_path)}) is None
