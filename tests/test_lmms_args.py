"""lmms-eval's model_args for `mustdrop`, and the `until` stop strings, without lmms-eval installed."""

from __future__ import annotations

import pytest

from llava.drop.generate import SamplingConfig
from llava.eval.answering.answerer import Answerer
from llava.eval.lmms_args import cli_flags, load_run, parse_model_args, sampling_from
from llava.mm_utils import load_image


def test_model_args_become_the_clis_flags_and_the_rest_method_options():
    argv = cli_flags({"pretrained": "ckpt", "method": "pdrop", "budget": 64, "drop_after": "1;5;11", "sparse": False,
                      "conv_mode": "vicuna_v1", "device": "cpu", "kept_share": 0.5})
    assert argv == ["--conv-mode", "auto", "--model-path", "ckpt", "--method", "pdrop", "--budget", "64",
                    "--conv-mode", "vicuna_v1", "--device", "cpu", "--method-args", "drop_after=1;5;11,kept_share=0.5"]
    args = parse_model_args({"pretrained": "ckpt", "sparse": True, "global_thr": 0.011, "individual_thr": 0.01})
    assert (args.model_path, args.sparse, args.global_thr, args.conv_mode) == ("ckpt", True, 0.011, "auto")


@pytest.mark.parametrize("model_args, message", [
    ({"method": "fastv"}, "model_args needs pretrained=<checkpoint path>"),
    ({"pretrained": "c", "sparse": "yes"}, "model_args sparse='yes': expected true or false"),
    ({"pretrained": "c", "budget": "lots"}, "model_args: argument --budget: invalid float value: 'lots'"),
    ({"pretrained": "c", "next_layout": "round"}, "model_args: argument --next_layout: invalid choice: 'round'"),
])
def test_bad_model_args_are_one_line(model_args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_model_args(model_args)


def test_load_run_validates_before_loading_and_loads(tiny_original):
    with pytest.raises(ValueError, match="unknown method 'nosuch'; valid methods: "):
        load_run({"pretrained": str(tiny_original), "method": "nosuch"}, 1)
    with pytest.raises(ValueError, match="budget 600 exceeds the 576 vision tokens"):
        load_run({"pretrained": str(tiny_original), "method": "fastv", "budget": 600, "device": "cpu"}, 1)
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device; this run uses cpu"):
        load_run({"pretrained": str(tiny_original), "method": "fastv", "cuda_graph": True, "device": "cpu"}, 1)
    with pytest.raises(ValueError, match="unknown option\\(s\\) depth for this method"):
        load_run({"pretrained": str(tiny_original), "method": "fastv", "depth": 3, "device": "cpu"}, 1)
    run = load_run({"pretrained": str(tiny_original), "method": "tome", "budget": 64, "device": "cpu"}, 2)
    assert (run.drop.name, run.drop.options.budget, run.args.conv_mode, run.args.batch_size) == ("tome", 64, "vicuna_v1", 2)


def test_generation_kwargs_become_sampling_and_stop_strings():
    assert sampling_from({"until": "ASSISTANT:", "max_new_tokens": 16, "temperature": 0, "top_p": 1.0,
                          "num_beams": 1, "do_sample": False}, 128, None) == \
        (SamplingConfig(16, 0.0, 1.0, None), ("ASSISTANT:",))
    assert sampling_from({}, 128, 3) == (SamplingConfig(128, 0.0, None, 3), ())
    assert sampling_from({"temperature": 0.7, "until": ["\n\n", "Q:"]}, 8, 3) == (SamplingConfig(8, 0.7, None, 3),
                                                                                  ("\n\n", "Q:"))
    with pytest.raises(ValueError, match="num_beams=4: beam search is not supported"):
        sampling_from({"num_beams": 4}, 8, None)


def test_an_until_string_cuts_the_answer_where_it_first_appears(loaded_original, demo_images):
    tokenizer, model, image_processor, _ = loaded_original
    image, question, sampling = load_image(demo_images[0]), "What is the word?", SamplingConfig(max_new_tokens=8)
    full = Answerer(tokenizer, model, image_processor, "vicuna_v1", sampling).answer(question, image)
    stop = full.text.strip()[2:4]  # two characters from inside the answer
    cut = Answerer(tokenizer, model, image_processor, "vicuna_v1", sampling, stop_strings=(stop,)).answer(question, image)
    assert len(stop) == 2 and len(cut.text) < len(full.text)
    assert cut.text == full.text.split(stop, 1)[0].strip()
    assert cut.stats["new_tokens"] <= full.stats["new_tokens"]
