"""LLaVA's chat CLI: a scripted chat through stdin on the tiny checkpoint, its statistics line, how it ends,
and bad input refused before the model loads."""

from __future__ import annotations

import functools
import http.server
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llava.conversation import get_conv_template
from llava.drop.generate import SamplingConfig, generate
from llava.drop.methods import create_method
from llava.mm_utils import ImageLoadError, load_image, process_images, tokenizer_image_token
from llava.serve.cli import INTERRUPTED_EXIT_CODE, main
from llava.serve.image_source import open_image
from llava.serve.stats_line import stats_line
from tests.conftest import DEMO_IMAGE_FOLDER, REPO_ROOT, loader_answer

IMAGE_NAME = "175e99412607ad5f.png"
IMAGE = DEMO_IMAGE_FOLDER / IMAGE_NAME
QUESTIONS = ("What is the word?", "What colour is it?")
NEW_TOKENS = 8
MUSTDROP_FLAGS = ("--sparse", "--global_thr", "0.011", "--individual_thr", "0.01")
# one answer as the chat prints it: the streamed text, then its statistics line
TURN = re.compile(r"ASSISTANT: (.*?)\n(\[vision tokens .*?\])\n", re.DOTALL)
CHAT_TIMEOUT_S = 300


def chat_command(model: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "llava.serve.cli", "--model-path", str(model), "--image-file", str(IMAGE),
            "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", *flags]


def chat(model: Path, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    """The chat CLI in its own process, `stdin` typed into it."""
    return subprocess.run(chat_command(model, *flags), input=stdin, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=CHAT_TIMEOUT_S)


def conversation_answer(loaded, turns: list[tuple[str, str | None]], drop) -> str:
    """`generate()`'s greedy answer to the vicuna_v1 conversation `turns` (the image in the first user turn)."""
    tokenizer, model, image_processor, _ = loaded
    conversation = get_conv_template("vicuna_v1")
    for number, (role, message) in enumerate(turns):
        conversation.append_message(conversation.roles[role == "assistant"],
                                    "<image>\n" + message if number == 0 else message)
    input_ids = tokenizer_image_token(conversation.get_prompt(), tokenizer, return_tensors="pt")
    pixel_values = process_images([load_image(IMAGE)], image_processor)
    output = generate(model, input_ids, pixel_values, SamplingConfig(max_new_tokens=NEW_TOKENS),
                      {tokenizer.eos_token_id}, drop=drop)
    return tokenizer.decode(output.token_ids, skip_special_tokens=True).strip()


def test_two_turns_stream_the_answers_to_the_whole_conversation(tiny_original, loaded_original, tmp_path):
    finished = chat(tiny_original, "".join(question + "\n" for question in QUESTIONS), *MUSTDROP_FLAGS)
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    turns = TURN.findall(finished.stdout)
    assert len(turns) == 2, finished.stdout
    (first, first_stats), (second, second_stats) = turns
    assert finished.stdout.endswith("USER: \n")  # the end of input ended the chat at its next prompt

    # turn 1 is model_vqa_loader's answer to the same question with the same method, statistics included
    expected = loader_answer(tiny_original, IMAGE_NAME, QUESTIONS[0], tmp_path, *MUSTDROP_FLAGS,
                             max_new_tokens=NEW_TOKENS)
    assert first.strip() == expected["text"] and first.strip()
    stats = expected["metadata"]
    assert first_stats.startswith(f"[vision tokens 576 -> {stats['vision_tokens']} (vision stage) -> ")
    assert stats["vision_tokens"] < 576
    for layer, count in stats["vision_tokens_after_layer"].items():
        assert f"-> {count} (layer {layer})" in first_stats
    assert f"{stats['avg_vision_tokens']:.1f} per layer on average" in first_stats
    assert f"KV cache {stats['kv_cache_bytes'] / 2**20:.2f} MiB" in first_stats

    # turn 2 is prompted with the whole conversation: question 1, the answer as printed, question 2
    mustdrop = create_method("mustdrop", {"global_thr": "0.011", "individual_thr": "0.01"})
    turns_so_far = [("user", QUESTIONS[0]), ("assistant", first.strip()), ("user", QUESTIONS[1]), ("assistant", None)]
    assert second.strip() == conversation_answer(loaded_original, turns_so_far, mustdrop)
    assert second.strip() != conversation_answer(loaded_original, turns_so_far[2:], mustdrop)  # the history counts
    for line in (first_stats, second_stats):
        assert re.search(r"\| KV cache \d+\.\d\d MiB \| prefill \d+\.\d ms \| \d+\.\d tokens/s\]$", line), line


def test_an_empty_line_ends_the_chat(tiny_original):
    finished = chat(tiny_original, f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\n")
    assert finished.returncode == 0 and "Traceback" not in finished.stderr, finished.stderr
    turns = TURN.findall(finished.stdout)
    assert len(turns) == 1, finished.stdout  # the question after the empty line is never asked
    assert turns[0][1].startswith("[vision tokens 576 -> 576 (vision stage), 576.0 per layer on average | KV cache")


def test_a_conversation_longer_than_the_context_ends_with_one_line(tiny_original):
    finished = chat(tiny_original, f"{QUESTIONS[0]}\n{' '.join(['word'] * 1600)}\n")
    assert finished.returncode == 1
    assert len(TURN.findall(finished.stdout)) == 1  # the first turn was answered
    error = finished.stderr.strip().splitlines()
    assert len(error) == 1 and re.fullmatch(r"error: the prompt is \d+ tokens \(576 of them vision tokens\) but the "
                                            r"model's context holds 2048: the conversation no longer fits; start a new "
                                            r"chat", error[0]), finished.stderr


def read_until(stream, marker: bytes, timeout_s: float) -> bytes:
    """What `stream` says up to and including `marker` (or all of it, should it end or fall silent first)."""
    seen, deadline = b"", time.monotonic() + timeout_s
    while not seen.endswith(marker) and select.select([stream], [], [], max(0.0, deadline - time.monotonic()))[0]:
        byte = os.read(stream.fileno(), 1)
        if not byte:
            break
        seen += byte
    return seen


def test_ctrl_c_ends_the_chat_with_one_line_and_code_130(tiny_original):
    process = subprocess.Popen(chat_command(tiny_original), cwd=REPO_ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               # a launcher may start us ignoring SIGINT, which the child would inherit
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert read_until(process.stdout, b"USER: ", CHAT_TIMEOUT_S).endswith(b"USER: ")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=CHAT_TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == INTERRUPTED_EXIT_CODE == 130
    assert stderr.decode().strip().splitlines() == ["chat ended (Ctrl-C)"]


def test_a_missing_image_is_one_line_and_a_failed_exit(tmp_path):
    finished = subprocess.run([sys.executable, "-m", "llava.serve.cli", "--model-path", str(tmp_path / "no-model"),
                               "--image-file", str(tmp_path / "nope.png")], input="Hi\n", cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=CHAT_TIMEOUT_S)
    assert finished.returncode == 1
    assert finished.stderr.splitlines() == [f"error: image not found: {tmp_path / 'nope.png'}"]
    assert finished.stdout == ""


@pytest.mark.parametrize("flags,message", [
    (["--image-file", "README.md"], r"^error: cannot read image README\.md: "),
    (["--image-file", str(IMAGE), "--sparse", "--method", "fastv"], r"^error: --sparse switches on MustDrop"),
    (["--image-file", str(IMAGE), "--method", "fastv", "--method-args", "nope=1"], r"^error: unknown option\(s\) nope"),
    (["--image-file", str(IMAGE), "--budget", "64"], r"^error: --budget needs a dropping method"),
    (["--image-file", str(IMAGE), "--conv-mode", "vicuna_v9"], r"^error: unknown conversation mode 'vicuna_v9'"),
    (["--image-file", str(IMAGE), "--max-new-tokens", "0"], r"^error: max_new_tokens must be >= 1, got 0$"),
])
def test_bad_input_is_refused_before_the_model_loads(tmp_path, flags, message):
    """The model path does not exist, so each message shows its check ran before any loading."""
    with pytest.raises(SystemExit) as stopped:
        main(["--model-path", str(tmp_path / "no-model"), *flags])
    assert re.search(message, str(stopped.value.code))


def test_the_streamed_tokens_are_the_answers_tokens(loaded_original):
    """The decode loop's listener hears every token, the prefill's first and the last before the limit."""
    from llava.eval.answering.answerer import Answerer
    from llava.model.inputs import encode_question

    tokenizer, model, image_processor, _ = loaded_original
    answerer = Answerer(tokenizer, model, image_processor, "vicuna_v1", SamplingConfig(max_new_tokens=5),
                        create_method("fastv", {"budget": "64"}))
    inputs = encode_question(QUESTIONS[0], load_image(IMAGE), model, tokenizer, image_processor, "vicuna_v1")
    heard = []
    answer = answerer.answer_inputs(inputs, heard.append)
    assert len(heard) == answer.stats["new_tokens"] == 5
    assert answer.text == tokenizer.decode(heard, skip_special_tokens=True).strip()
    assert answer.text == answerer.answer(QUESTIONS[0], load_image(IMAGE)).text


def test_a_failed_turn_leaves_the_conversation_as_it_was(loaded_original):
    from llava.drop.generate import ContextLengthError
    from llava.eval.answering.answerer import Answerer
    from llava.serve.chat import Chat

    tokenizer, model, image_processor, _ = loaded_original
    chat = Chat(Answerer(tokenizer, model, image_processor, "vicuna_v1", SamplingConfig(max_new_tokens=2)), load_image(IMAGE))
    with pytest.raises(ContextLengthError):
        chat.ask(" ".join(["word"] * 1600))
    assert chat.conversation.messages == []
    chat.ask(QUESTIONS[0])
    assert [role for role, _ in chat.conversation.messages] == ["USER", "ASSISTANT"]
    assert chat.conversation.messages[0][1] == "<image>\n" + QUESTIONS[0]  # the image goes in the first turn that is kept


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_an_image_url_is_downloaded_and_a_bad_one_named():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=DEMO_IMAGE_FOLDER))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert open_image(f"{base}/{IMAGE_NAME}").tobytes() == load_image(IMAGE).tobytes()
        with pytest.raises(ImageLoadError, match=rf"^cannot download image {base}/missing\.png: HTTP Error 404: .+$"):
            open_image(f"{base}/missing.png")
    finally:
        server.shutdown()
        server.server_close()


def test_stats_line_without_decoded_tokens():
    stats = {"vision_tokens_in": 576, "vision_tokens": 576, "vision_tokens_after_layer": {"10": 32, "2": 288},
             "avg_vision_tokens": 100.0, "kv_cache_bytes": 3 * 2**20, "prefill_seconds": 0.0125,
             "new_tokens": 1, "decode_seconds": 0.0}
    assert stats_line(stats) == ("[vision tokens 576 -> 576 (vision stage) -> 288 (layer 2) -> 32 (layer 10), 100.0 per "
                                 "layer on average | KV cache 3.00 MiB | prefill 12.5 ms | - tokens/s]")
