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


# ---------------------------------------------------------------- manifests and verification

from rlhf.orchestrator.errors import StageFailed  # noqa: E402
from rlhf.orchestrator.run.checkpoint import MANIFEST_FILE, verify_checkpoint  # noqa: E402


def _write_states(tmp):
    (tmp / "policy" / "deepspeed").mkdir(parents=True)
    (tmp / "policy" / "deepspeed" / "optim_states.pt").write_bytes(b"adam" * 100)
    (tmp / "policy" / "weights.bin").write_bytes(b"w" * 10)


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib
    import json

    path = CheckpointManager(tmp_path).save(2, {"step": 2}, _write_states)
    files = {e["path"]: e for e in json.loads((path / MANIFEST_FILE).read_text())["files"]}
    assert sorted(files) == ["policy/deepspeed/optim_states.pt", "policy/weights.bin", STATE_FILE]
    assert files["policy/deepspeed/optim_states.pt"]["size"] == 400
    assert files["policy/weights.bin"]["sha256"] == hashlib.sha256(b"w" * 10).hexdigest()
    for mode in ("full", "size", "off"):
        assert verify_checkpoint(path, mode) is None


def test_verify_names_the_first_bad_file(tmp_path):
    path = CheckpointManager(tmp_path).save(2, {"step": 2}, _write_states)
    optim = path / "policy" / "deepspeed" / "optim_states.pt"
    optim.write_bytes(b"adaM" * 100)  # same size, other bytes: only `full` sees it
    assert verify_checkpoint(path, "size") is None
    assert verify_checkpoint(path, "full") == "policy/deepspeed/optim_states.pt: sha256 differs"
    optim.write_bytes(b"adam" * 10)  # truncated, as a full disk leaves it
    assert verify_checkpoint(path, "size") == "policy/deepspeed/optim_states.pt: size 40 != 400"
    optim.unlink()
    assert verify_checkpoint(path, "size") == "policy/deepspeed/optim_states.pt: missing"
    assert verify_checkpoint(path, "off") is None


def test_select_falls_back_to_the_newest_that_verifies_saying_why(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep=3)
    for step in (2, 4, 6):
        ckpts.save(step, {"step": step}, _write_states)
    assert ckpts.select("size") == (tmp_path / "step_000006", None)
    (tmp_path / "step_000006" / "policy" / "deepspeed" / "optim_states.pt").write_bytes(b"x" * 123)
    path, note = ckpts.select("size")
    assert path.name == "step_000004"
    assert note == ("checkpoint step_000006 fails verification (policy/deepspeed/optim_states.pt: size 123 "
                    "!= 400); resuming from step_000004")
    (tmp_path / "step_000004" / "policy" / "weights.bin").unlink()
    path, note = ckpts.select("full")
    assert path.name == "step_000002" and note.startswith("checkpoints step_000006 (") and "step_000004 (" in note
    assert ckpts.select("off") == (tmp_path / "step_000006", None)  # off: the newest, unchecked


def test_select_with_nothing_intact_is_a_one_line_runtime_failure(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep=2)
    ckpts.save(2, {"step": 2}, _write_states)
    (tmp_path / "step_000002" / "policy" / "weights.bin").write_bytes(b"")
    with pytest.raises(StageFailed, match=r"resume: no checkpoint in .* passes verification .*step_000002: "
                                          r"policy/weights.bin: size 0 != 10"):
        ckpts.select("size")
    assert CheckpointManager(tmp_path / "none").select("size") == (None, None)


def test_a_checkpoint_without_manifest_is_used_with_a_warning(tmp_path):
    """Checkpoints written before manifests existed cannot be checked: used, and said so."""
    ckpts = CheckpointManager(tmp_path, keep=2)
    ckpts.save(2, {"step": 2}, _write_states)
    (tmp_path / "step_000002" / MANIFEST_FILE).unlink()
    path, note = ckpts.select("full")
    assert path.name == "step_000002" and "has no manifest.json" in note and "unverified" in note
