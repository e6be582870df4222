"""One vocabulary for the options of FastV, PyramidDrop, SparseVLM and MustDrop (docs/method_options.md):
`drop_after` (the 0-based layers after which a method drops), `kept_share` and the other `*_share`s; the
papers' names are aliases that convert their values, handled once in the registry for every caller."""

from __future__ import annotations

import json
import re

import pytest

import llava.eval.model_vqa_loader as vqa
from llava.drop.methods import DropConfig, DropMethod, create_method, register
from llava.drop.methods.fastv import FastV, FastVOptions
from llava.drop.methods.mustdrop import MustDrop
from llava.drop.methods.pdrop import PDrop, PDropOptions
from llava.drop.methods.registry import (
    METHODS,
    OptionAlias,
    discover_methods,
    init_fields,
    option_aliases,
    option_names,
    same,
)
from llava.drop.methods.sparsevlm import SparseVLM, SparseVLMOptions
from llava.eval.answering.answers_file import AnswersFileError, resume_position
from llava.eval.answering.loop import method_from_args, recorded_options, run_identity
from llava.eval.scoring.results import ScoringError, read_results
from llava.model.geometry import ModelGeometry
from tests.conftest import REPO_ROOT

LLAVA_15 = ModelGeometry(decoder_layers=32, vision_tokens=576, patch_tokens=576, context_length=2048)

# (method, the papers' names, the same setting in canonical names, the options both must give)
ALIASES = [
    ("fastv", {"k": "3"}, {"drop_after": "2"}, FastVOptions(drop_after=(2,))),
    ("fastv", {"k": "1"}, {"drop_after": "0"}, FastVOptions(drop_after=(0,))),
    ("fastv", {"ratio": "0.75"}, {"kept_share": "0.25"}, FastVOptions(kept_share=0.25)),
    ("fastv", {"ratio": "0"}, {"kept_share": "1"}, FastVOptions(kept_share=1.0)),
    ("fastv", {"k": "2", "ratio": "0.5", "budget": "64"}, {"drop_after": "1", "kept_share": "0.5", "budget": "64"},
     FastVOptions(drop_after=(1,), kept_share=0.5, budget=64.0)),
    ("pdrop", {"layers": "8;16;24"}, {"drop_after": "7;15;23"}, PDropOptions(drop_after=(7, 15, 23))),
    ("pdrop", {"layers": "1"}, {"drop_after": "0"}, PDropOptions(drop_after=(0,))),
    ("pdrop", {"layers": "none"}, {"drop_after": "none"}, PDropOptions()),
    ("pdrop", {"layers": "2;6;12", "ratio": "0.4"}, {"drop_after": "1;5;11", "kept_share": "0.4"},
     PDropOptions(drop_after=(1, 5, 11), kept_share=0.4)),
    ("sparsevlm", {"layers": "0;6;15"}, {"drop_after": "0;6;15"}, SparseVLMOptions(drop_after=(0, 6, 15))),
    ("sparsevlm", {"layers": "2;6", "keep": "66;30", "recycle_ratio": "0.5"},
     {"drop_after": "2;6", "keep": "66;30", "recycled_share": "0.5"},
     SparseVLMOptions(drop_after=(2, 6), keep=(66, 30), recycled_share=0.5)),
    ("mustdrop", {"drop_layers": "2;6"}, {"drop_after": "2;6"}, DropConfig(drop_after=(2, 6))),
    ("mustdrop", {"key_token_rate": "0.1"}, {"key_share": "0.1"}, DropConfig(key_share=0.1)),
]


@pytest.mark.parametrize("name, aliases, canonical, expected", ALIASES,
                         ids=[f"{name}-{','.join(aliases)}" for name, aliases, _, _ in ALIASES])
def test_an_alias_gives_the_options_of_its_canonical_form(name, aliases, canonical, expected):
    assert create_method(name, aliases).options == create_method(name, canonical).options == expected


# The same drop, "after layer 2", in every method's canonical name and in the papers' names.
AFTER_LAYER_2 = [("mustdrop", {"drop_layers": "2"}), ("sparsevlm", {"layers": "2", "keep": "66"}),
                 ("fastv", {"k": "3"}), ("pdrop", {"layers": "3"})]


@pytest.mark.parametrize("name, aliases", AFTER_LAYER_2, ids=[name for name, _ in AFTER_LAYER_2])
def test_drop_after_means_the_same_layer_in_every_method(name, aliases):
    canonical = {"drop_after": "2", **({"keep": "66"} if name == "sparsevlm" else {})}
    assert create_method(name, canonical).prefill_layers(LLAVA_15) == (2,)
    assert create_method(name, aliases).prefill_layers(LLAVA_15) == (2,)


def test_kept_share_keeps_the_same_count_in_fastv_and_pdrop():
    """kept_share 0.25 keeps 144 of 576 in both; the papers' names say it as R = 0.75 and lambda = 0.25."""
    fastv, pdrop = create_method("fastv", {"kept_share": "0.25"}), create_method("pdrop", {"kept_share": "0.25"})
    assert fastv.keep_count(576, LLAVA_15) == 144 == pdrop.plan(576, LLAVA_15)[0]
    assert create_method("fastv", {"ratio": "0.75"}).keep_count(576, LLAVA_15) == 144
    assert create_method("pdrop", {"ratio": "0.25"}).plan(576, LLAVA_15)[0] == 144


def test_an_alias_reaches_mustdrop_over_its_cli_flags():
    """`--sparse --global_thr ... --method-args drop_layers=3` keeps the flags' settings and sets drop_after."""
    base = DropConfig(global_thr=0.011, individual_thr=0.01)
    options = create_method("mustdrop", {"drop_layers": "3;9"}, base_options=base).options
    assert options == DropConfig(global_thr=0.011, individual_thr=0.01, drop_after=(3, 9))


@pytest.mark.parametrize("argv, expected", [
    (["--method", "fastv", "--method-args", "k=3,ratio=0.75"], FastVOptions(drop_after=(2,), kept_share=0.25)),
    (["--method", "pdrop", "--method-args", "layers=2;6;12", "--budget", "64"],
     PDropOptions(drop_after=(1, 5, 11), budget=64.0)),
    (["--sparse", "--drop_layers", "2,6", "--key_rate", "0.1"], DropConfig(drop_after=(2, 6), key_share=0.1)),
    (["--sparse"], DropConfig()),
])
def test_the_clis_take_either_name(argv, expected):
    args = vqa.build_parser().parse_args(["--model-path", "m", "--question-file", "q", *argv])
    assert method_from_args(args).options == expected


@pytest.mark.parametrize("name, args, message", [
    ("fastv", {"k": "3", "drop_after": "2"}, "drop_after and its alias k are both given (drop_after = k - 1, the "
                                             "paper's K); give one of them"),
    ("fastv", {"kept_share": "0.5", "ratio": "0.5"}, "kept_share and its alias ratio are both given (kept_share = "
                                                     "1 - ratio, the paper's R (a pruned share)); give one of them"),
    ("pdrop", {"drop_after": "7", "layers": "8"}, "drop_after and its alias layers are both given (drop_after = "
                                                  "each layer - 1, the first layer of each new stage); give one of them"),
    ("pdrop", {"ratio": "0.5", "kept_share": "0.5"}, "kept_share and its alias ratio are both given"),
    ("sparsevlm", {"layers": "2", "drop_after": "2"}, "drop_after and its alias layers are both given"),
    ("sparsevlm", {"recycle_ratio": "0.3", "recycled_share": "0.3"}, "recycled_share and its alias recycle_ratio"),
    ("mustdrop", {"drop_layers": "2", "drop_after": "2"}, "drop_after and its alias drop_layers are both given"),
    ("mustdrop", {"key_share": "0.1", "key_token_rate": "0.1"}, "key_share and its alias key_token_rate are both"),
])
def test_an_alias_beside_its_canonical_name_is_refused_in_one_line(name, args, message):
    with pytest.raises(ValueError) as error:
        create_method(name, args)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


FASTV_ONE_LAYER = ("fastv drops once, after one layer: drop_after takes one layer, got (1, 5) (pdrop and sparsevlm "
                   "drop after several)")


def test_fastv_drops_after_one_layer():
    for make in (lambda: FastVOptions(drop_after=(1, 5)), lambda: create_method("fastv", {"drop_after": "1;5"})):
        with pytest.raises(ValueError) as error:
            make()
        assert str(error.value) == FASTV_ONE_LAYER
    assert create_method("fastv", {"drop_after": "5"}).prefill_layers(LLAVA_15) == (5,)


def test_a_bad_alias_value_names_the_alias_and_what_it_became():
    with pytest.raises(ValueError, match=r"drop_after must be distinct decoder layers >= 0 in ascending order, got "
                                         r"\(-1,\) \(k=0 is drop_after=\(-1,\)\)"):
        create_method("fastv", {"k": "0"})
    with pytest.raises(ValueError, match=r"option k='1;2' is not a valid int"):
        create_method("fastv", {"k": "1;2"})


def test_unknown_options_list_canonical_names_and_aliases():
    with pytest.raises(ValueError) as error:
        create_method("fastv", {"depth": "3"})
    assert str(error.value) == (
        "unknown option(s) depth for this method; valid: budget, drop_after, keep_fraction, kept_share; aliases: "
        "k (drop_after = k - 1, the paper's K), ratio (kept_share = 1 - ratio, the paper's R (a pruned share))")
    assert option_names("pdrop") == {"drop_after", "kept_share", "budget", "keep_fraction", "layers", "ratio"}
    assert {"drop_after", "key_share", "drop_layers", "key_token_rate"} <= option_names("mustdrop")
    assert {"drop_after", "recycled_share", "layers", "recycle_ratio"} <= option_names("sparsevlm")


def test_defaults_keep_their_meaning():
    """The defaults as the papers set them, in concrete numbers: FastV drops after layer 1 (K = 2) keeping half
    of 576; PyramidDrop after layers 7, 15, 23 (stages from 8, 16, 24) halving each time, or after 1, 5, 11
    for a budget its default stages cannot reach; SparseVLM after 2, 6, 15 keeping 66, 30, 17 and recycling
    0.3 of the dropped; MustDrop after 2, 6, 10, 14 with a key set of 0.08 of the patches."""
    fastv = FastV()
    assert fastv.options == FastVOptions(drop_after=(1,), kept_share=0.5)
    assert fastv.prefill_layers(LLAVA_15) == (1,) and fastv.keep_count(576, LLAVA_15) == 288
    pdrop = PDrop()
    assert pdrop.options == PDropOptions(drop_after=None, kept_share=0.5)
    assert pdrop.prefill_layers(LLAVA_15) == (7, 15, 23) and pdrop.plan(576, LLAVA_15) == [288, 144, 72]
    assert PDrop(PDropOptions(budget=64)).prefill_layers(LLAVA_15) == (1, 5, 11)
    sparsevlm = SparseVLM()
    assert sparsevlm.prefill_layers(LLAVA_15) == (2, 6, 15)
    assert (sparsevlm.options.keep, sparsevlm.options.recycled_share) == ((66, 30, 17), 0.3)
    mustdrop = MustDrop()
    assert mustdrop.prefill_layers(LLAVA_15) == (2, 6, 10, 14) and mustdrop.options.key_share == 0.08


def test_answers_record_the_canonical_names():
    assert set(recorded_options(FastVOptions())) == {"drop_after", "kept_share", "budget"}
    assert set(recorded_options(PDropOptions())) == {"drop_after", "kept_share", "budget"}
    assert {"drop_after", "recycled_share"} <= set(recorded_options(SparseVLMOptions()))
    assert {"drop_after", "key_share"} <= set(recorded_options(DropConfig()))
    assert not {"k", "ratio", "layers", "recycle_ratio", "drop_layers", "key_token_rate"} & {
        key for options in (FastVOptions(), PDropOptions(), SparseVLMOptions(), DropConfig())
        for key in recorded_options(options)}


def write_answer(path, *runs: dict) -> None:
    path.write_text("".join(json.dumps({"question_id": f"q{n}", "text": "a", "metadata": {"run": run}}) + "\n"
                            for n, run in enumerate(runs, start=1)))


def identity_of(*argv: str) -> dict:
    args = vqa.build_parser().parse_args(["--model-path", "m", "--question-file", "q", "--device", "cpu", *argv])
    return run_identity(args, method_from_args(args))


@pytest.mark.parametrize("argv, old_options", [
    (["--method", "fastv", "--method-args", "ratio=0.75"], {"k": 2, "ratio": 0.75, "budget": None}),
    (["--method", "fastv", "--method-args", "kept_share=0.25"], {"k": 2, "ratio": 0.75, "budget": None}),
    (["--method", "pdrop"], {"layers": None, "ratio": 0.5, "budget": None}),
    (["--method", "pdrop", "--method-args", "drop_after=1;5;11"], {"layers": [2, 6, 12], "ratio": 0.5, "budget": None}),
    (["--sparse"], {**recorded_options(DropConfig()), "drop_layers": [2, 6, 10, 14], "key_token_rate": 0.08}),
])
def test_an_answers_file_recorded_under_the_papers_names_resumes(tmp_path, argv, old_options):
    """Files answered before the rename recorded the options under the papers' names; the same settings
    resume them, whichever names they are given by now, and other settings are still refused."""
    identity = identity_of(*argv)
    old = {**identity, "method_options": {key: value for key, value in old_options.items()
                                          if key not in ("drop_after", "key_share")}}
    path = tmp_path / "answers.jsonl"
    write_answer(path, old)
    assert resume_position(path, ["q1", "q2"], identity) == 1
    write_answer(path, old, identity)  # resumed: one run's answers, scored as one
    assert len(read_results(path).answers) == 2
    write_answer(path, {**old, "method_options": {**old["method_options"], "budget": 32.0}})
    with pytest.raises(AnswersFileError, match="was answered with method_options.budget=32.0"):
        resume_position(path, ["q1", "q2"], identity)


def test_an_old_file_with_other_settings_names_the_one_that_differs(tmp_path):
    identity = identity_of("--method", "fastv")
    path = tmp_path / "answers.jsonl"
    write_answer(path, {**identity, "method_options": {"k": 3, "ratio": 0.5, "budget": None}})
    with pytest.raises(AnswersFileError, match=r"method_options.drop_after=\[2\] but this run has "
                                               r"method_options.drop_after=\[1\]"):
        resume_position(path, ["q1"], identity)
    write_answer(path, {**identity, "method_options": {"k": 3, "ratio": 0.5, "budget": None}}, identity)
    with pytest.raises(ScoringError, match=r"mixes the answers of different runs \(method_options.drop_after=\[2\] "
                                           r"on line 1, method_options.drop_after=\[1\] on line 2\)"):
        read_results(path)


def test_register_refuses_an_alias_that_is_an_option_or_sets_none():
    class Options(FastVOptions):
        option_aliases = {"budget": OptionAlias("kept_share", float, same, "kept_share = budget")}

    class Confused(DropMethod):
        name = "confused"
        options_class = Options

    with pytest.raises(ValueError, match="option alias 'budget' must not be an option"):
        register(Confused)
    assert "confused" not in METHODS


def documented_options() -> dict[str, tuple[set[str], set[str]]]:
    """docs/method_options.md's "Every option" table: method -> (options, aliases) as its rows name them."""
    text = (REPO_ROOT / "docs" / "method_options.md").read_text()
    table = text.split("## Every option, in one table")[1].split("\n\n")[1]
    documented: dict[str, tuple[set[str], set[str]]] = {}
    for row in table.splitlines()[2:]:
        methods, options, _, _, alias = (cell.strip() for cell in row.strip("|").split("|"))
        for method in methods.split(", "):
            names, aliases = documented.setdefault(method, (set(), set()))
            names.update(re.findall(r"`(\w+)`", options))
            aliases.update(re.findall(r"`(\w+)`", alias))
    return documented


def test_the_docs_table_lists_every_option_and_alias():
    discover_methods()
    expected = {name: (init_fields(method.options_class), set(option_aliases(method.options_class)))
                for name, method in METHODS.items() if getattr(method, "options_class", None) is not None}
    assert documented_options() == expected
