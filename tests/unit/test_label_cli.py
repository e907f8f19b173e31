"""`rlhf label` commands: tokens shown once, list/revoke/stats/export, and bad input as one line."""
from __future__ import annotations

import json

import pytest

from rlhf.orchestrator.cli import main
from rlhf.orchestrator.label.db import LabelDB
from rlhf.orchestrator.recipe.comparisons import ComparisonStore


@pytest.fixture()
def run(tmp_path):
    with ComparisonStore(tmp_path / "comparisons.sqlite") as store:
        store.add(1, "p", "pol", [{"role": "user", "content": "q"}], ["a", "b"], [[1], [2]])
    return tmp_path


def test_add_list_revoke_stats_export(run, capsys, tmp_path):
    assert main(["label", "add-labeler", str(run), "ann"]) == 0
    token = capsys.readouterr().out.split("keep it secret): ")[1].split()[0]
    db = LabelDB(run / "comparisons.sqlite")
    assert db.authenticate(token) == "ann"
    db.submit("ann", 1, [1, 0])
    assert main(["label", "stats", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ann" in out and "1 ranked, 0 pending, 1 rankings by people" in out
    target = tmp_path / "prefs.jsonl"
    assert main(["label", "export", str(run), "--format", "preference", "--out", str(target)]) == 0
    assert [json.loads(line) for line in target.read_text().splitlines()] == [
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "b", "rejected": "a"}]
    assert main(["label", "revoke", str(run), "ann"]) == 0
    assert main(["label", "list", str(run)]) == 0
    assert "revoked" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["label", "serve", "{run}/missing"], "RUN_DIR: no such folder"),
    (["label", "serve", "{run}", "--host", "0.0.0.0"], "not a loopback address"),
    (["label", "serve", "{run}", "--port", "70000"], "port number"),
    (["label", "revoke", "{run}", "nobody"], "no active labeler 'nobody'"),
    (["label", "add-labeler", "{run}", "bad name"], "labeler name"),
    (["label", "export", "{run}", "--format", "csv"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(run, capsys, argv, message):
    assert main([a.format(run=run) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
