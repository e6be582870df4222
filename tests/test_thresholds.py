"""The published MustDrop thresholds, written once, and the CLI the benchmark scripts read them through."""

from __future__ import annotations

import pytest

from llava.eval.thresholds import Thresholds, main, thresholds_for


@pytest.mark.parametrize("benchmark,tokens,printed", [
    ("textvqa", 192, "0.001 0.001"),
    ("textvqa", 128, "0.0012 0.001"),
    ("textvqa", 64, "0.011 0.01"),
    ("vizwiz", 64, "0.005 0.001"),
    ("vizwiz", 128, "0.0012 0.001"),  # not published for VizWiz: TextVQA's
    ("gqa", 64, "0.011 0.01"),
])
def test_cli_prints_the_pair_a_script_uses(capsys, benchmark, tokens, printed):
    main([benchmark, str(tokens)])
    assert capsys.readouterr().out == printed + "\n"


def test_pair_as_numbers():
    assert thresholds_for("TextVQA", 64) == Thresholds(global_thr=0.011, individual_thr=0.01)


def test_unpublished_setting_is_refused(capsys):
    with pytest.raises(ValueError, match="no published thresholds for 100 tokens"):
        thresholds_for("textvqa", 100)
    with pytest.raises(SystemExit) as exit_info:
        main(["textvqa", "100"])
    assert exit_info.value.code == 2 and "invalid choice: 100" in capsys.readouterr().err
