"""CheckpointManager: atomic folders, the `latest` pointer, crash leftovers, retention."""
from __future__ import annotations

import pytest

from rlhf.orchestrator.run.checkpoint import STATE_FILE, CheckpointManager


def _write(tmp):
    (tmp / "policy").mkdir()
    (tmp / "policy" / "weights.bin").write_bytes(b"w")


def test_save_is_atomic_and_latest_moves_last(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep=2)
    assert ckpts.latest() is None
    path = ckpts.save(2, {"step": 2}, _write)
    assert path.name == "step_000002" and (path / "policy" / "weights.bin").is_file()
    assert (tmp_path / "latest").read_text().strip() == "step_000002"
    assert ckpts.load_state(ckpts.latest()) == {"step": 2}
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_failed_write_leaves_nothing_and_keeps_the_previous_latest(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep=2)
    ckpts.save(2, {"step": 2}, _write)

    def crash(tmp):
        _write(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpts.save(4, {"step": 4}, crash)
    assert ckpts.latest().name == "step_000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000002"]


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep=3)
    ckpts.save(2, {"step": 2}, _write)
    # A driver killed mid-save: a temporary folder, and a renamed folder without its state file.
    (tmp_path / ".tmp-step_000004" / "policy").mkdir(parents=True)
    (tmp_path / "step_000006" / "policy").mkdir(parents=True)
    assert ckpts.latest().name == "step_000002"
    assert [p.name for p in ckpts.clean_partial()] == [".tmp-step_000004"]
    assert not (tmp_path / ".tmp-step_000004").exists()


def test_latest_falls_back_to_the_newest_complete_when_the_pointer_lags(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep=3)
    ckpts.save(2, {"step": 2}, _write)
    ckpts.save(4, {"step": 4}, _write)
    (tmp_path / "latest").write_text("step_000099\n")  # names nothing complete
    assert ckpts.latest().name == "step_000004"
    (tmp_path / "latest").unlink()
    assert ckpts.latest().name == "step_000004"


def test_retention_keeps_the_newest_k(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep=2)
    for step in (2, 4, 6, 8):
        ckpts.save(step, {"step": step}, _write)
    assert [p.name for p in ckpts.complete()] == ["step_000006", "step_000008"]
    assert all((p / STATE_FILE).is_file() for p in ckpts.complete())


def test_saving_the_same_step_again_replaces_it(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep=2)
    ckpts.save(2, {"step": 2, "v": 1}, _write)
    ckpts.save(2, {"step": 2, "v": 2}, _write)
    assert ckpts.load_state(ckpts.latest())["v"] == 2
