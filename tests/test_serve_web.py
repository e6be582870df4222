"""The web page (`python -m llava.serve.web`) on the tiny checkpoint, driven through Gradio's own client: each
column answers as model_vqa_loader does, errors come back as the CLIs' lines while the server stays up,
requests run one at a time, and bad flags stop the command before the model loads."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason='the web page needs the web extra: pip install -e ".[web]"')

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import llava.serve  # noqa: E402
from llava.eval.model_vqa_loader import main as answer_questions  # noqa: E402
from llava.serve.cli import main as chat_main  # noqa: E402
from llava.serve.page import API_NAME, build_page  # noqa: E402
from llava.serve.page_methods import PAGE_THRESHOLDS, UNPRUNED, choosable_methods  # noqa: E402
from llava.serve.side_by_side import Comparison  # noqa: E402
from llava.serve.stats_line import vision_stages  # noqa: E402
from llava.serve.web import DEFAULT_HOST, build_parser, main  # noqa: E402
from tests.conftest import DEMO_IMAGE_FOLDER, REPO_ROOT, cli_args, loader_answer  # noqa: E402

pytestmark = pytest.mark.xdist_group("web_server")  # one worker, so one server for the module (scripts/test.sh)

IMAGE_NAME = "175e99412607ad5f.png"
IMAGE = DEMO_IMAGE_FOLDER / IMAGE_NAME
QUESTION = "What is the word?"
NEW_TOKENS = 8
DECODER_LAYERS = 32  # the tiny checkpoint keeps LLaVA-1.5-7B's layer count
COLUMNS = [UNPRUNED, *choosable_methods()]  # the page's columns, in order
OUTPUTS_PER_COLUMN = 4  # title, answer, pictures, statistics (a column's visibility is not in the API's outputs)
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300
CONTEXT_ERROR = re.compile(r"error: the prompt is \d+ tokens \(576 of them vision tokens\) but the model's context "
                           r"holds 2048")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text()


def wait_until_serving(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the web page exited with {server.process.returncode}:\n{server.output()}")
        try:
            urllib.request.urlopen(server.url, timeout=5).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the web page did not answer within {START_TIMEOUT_S} s:\n{server.output()}")


@pytest.fixture(scope="module")
def server(tiny_original, tmp_path_factory):
    """`python -m llava.serve.web` on the tiny checkpoint, on a free port of the default host, for the module."""
    port = free_port()
    log = tmp_path_factory.mktemp("web") / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "llava.serve.web", "--model-path", str(tiny_original), "--port", str(port),
             "--device", "cpu", "--conv-mode", "vicuna_v1", "--max-new-tokens", str(NEW_TOKENS)],
            cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
    running = Server(f"http://{DEFAULT_HOST}:{port}/", port, process, log)
    try:
        wait_until_serving(running)
        yield running
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.url, verbose=False)


def compare(client: Client, image: Path, question: str, methods: list[str], budget: float | None = None,
            keep: float | None = None) -> dict:
    """The page's columns for one request: method -> (title, answer, pictures, statistics)."""
    outputs = client.predict(handle_file(str(image)), question, methods, budget, keep, PAGE_THRESHOLDS.global_thr,
                             PAGE_THRESHOLDS.individual_thr, api_name=f"/{API_NAME}")
    assert len(outputs) == OUTPUTS_PER_COLUMN * len(COLUMNS)
    return {name: tuple(outputs[OUTPUTS_PER_COLUMN * n:OUTPUTS_PER_COLUMN * (n + 1)]) for n, name in enumerate(COLUMNS)}


def layer_rows(stats: dict) -> list[str]:
    """The statistics table's rows that `stats` implies: each run of decoder layers with its vision tokens."""
    bounds = [(-1, stats["vision_tokens"])] + sorted((int(layer), count)
                                                     for layer, count in stats["vision_tokens_after_layer"].items())
    ends = [layer for layer, _ in bounds[1:]] + [DECODER_LAYERS - 1]
    return [f"| {start + 1}{'' if start + 1 == end else f'–{end}'} | {count} |"
            for (start, count), end in zip(bounds, ends)]


def test_each_column_answers_as_model_vqa_loader(client, tiny_original, tmp_path):
    columns = compare(client, IMAGE, QUESTION, ["fastv", "mustdrop"])
    flags = {UNPRUNED: (), "mustdrop": ("--sparse", "--global_thr", f"{PAGE_THRESHOLDS.global_thr}",
                                        "--individual_thr", f"{PAGE_THRESHOLDS.individual_thr}"),
             "fastv": ("--method", "fastv")}
    for name, method_flags in flags.items():
        title, answer, pictures, card = columns[name]
        expected = loader_answer(tiny_original, IMAGE_NAME, QUESTION, tmp_path, *method_flags,
                                 max_new_tokens=NEW_TOKENS)
        stats = expected["metadata"]
        assert answer == expected["text"] and answer, name
        assert title.startswith(f"### {name}\n")
        assert f"**Prefill FLOPs** {stats['prefill_flops_ratio']:.3f} of the unpruned model's" in card
        assert f"**Vision tokens** {vision_stages(stats)}" in card
        for row in layer_rows(stats):
            assert row in card, (row, card)
        assert re.search(rf"\*\*Time\*\* vision \d+\.\d ms · prefill \d+\.\d ms · decode \d+\.\d ms \({NEW_TOKENS} "
                         r"tokens, \d+\.\d tokens/s\)", card), card
        # one picture per stage: the vision stage's, then one after each dropping layer
        after_layers = sorted(int(layer) for layer in stats["vision_tokens_after_layer"])
        assert [picture["caption"] for picture in pictures] == ["vision stage", *(f"after layer {layer}"
                                                                                  for layer in after_layers)]
        assert all(Path(picture["image"]).read_bytes().startswith(b"\x89PNG") for picture in pictures)
    assert "| 0–31 | 576 |" in columns[UNPRUNED][3] and "1.000 of the unpruned" in columns[UNPRUNED][3]
    assert len(columns["mustdrop"][2]) > 2  # MustDrop's dual filter dropped at more than one layer
    assert columns["mustdrop"][0].endswith("thresholds: global 0.011, individual 0.01")
    for name in set(COLUMNS) - set(flags):  # the methods not chosen stay empty
        assert columns[name] == (f"### {name}", "", [], ""), name


def test_a_budget_applies_to_every_method_that_takes_one(client, tiny_original, tmp_path):
    columns = compare(client, IMAGE, QUESTION, ["prumerge_plus", "fastv"], budget=64)
    expected = loader_answer(tiny_original, IMAGE_NAME, QUESTION, tmp_path, "--method", "fastv", "--budget", "64",
                             max_new_tokens=NEW_TOKENS)
    title, answer, _, card = columns["fastv"]
    assert answer == expected["text"]
    assert title.endswith("budget 64 vision tokens per layer")
    assert f"{expected['metadata']['avg_vision_tokens']:.1f} per layer on average" in card
    assert columns["prumerge_plus"][0].endswith("its own token count (it takes no budget)")
    assert columns["prumerge_plus"][1]  # it answered, with its own count


def test_an_unreadable_upload_is_the_clis_error_and_the_server_stays_up(server, client, tmp_path, monkeypatch):
    unreadable = tmp_path / "notes.png"
    unreadable.write_text("not an image")
    with pytest.raises(AppError) as refused:
        compare(client, unreadable, QUESTION, ["mustdrop"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as chat_refused:  # the chat CLI, given the same file
        chat_main(["--model-path", str(tmp_path / "no-model"), "--image-file", "notes.png"])
    assert str(refused.value) == chat_refused.value.code == ("error: cannot read image notes.png: cannot identify "
                                                             "image file 'notes.png'")
    assert server.output().count(chat_refused.value.code) == 1  # and in the server's log, once
    assert server.process.poll() is None
    assert compare(client, IMAGE, QUESTION, ["mustdrop"])["mustdrop"][1]  # the next request is answered


def test_a_kept_share_applies_to_every_method_that_takes_one(client, tiny_original, tmp_path):
    """The page's kept share is the CLIs' --keep: the same answer as model_vqa_loader's, said in the column."""
    columns = compare(client, IMAGE, QUESTION, ["fastv"], keep=0.111)
    expected = loader_answer(tiny_original, IMAGE_NAME, QUESTION, tmp_path, "--method", "fastv", "--keep", "0.111",
                             max_new_tokens=NEW_TOKENS)
    title, answer, _, _ = columns["fastv"]
    assert title.endswith("keep 0.111 of the image's vision tokens") and answer == expected["text"]
    with pytest.raises(AppError, match="a budget and a kept share both set how many vision tokens to keep"):
        compare(client, IMAGE, QUESTION, ["fastv"], budget=64, keep=0.111)


def test_an_unreachable_budget_and_an_overlong_question_are_the_clis_errors(server, client, tiny_original, tmp_path):
    with pytest.raises(AppError) as refused:
        compare(client, IMAGE, QUESTION, ["fastv", "mustdrop"], budget=1)
    with pytest.raises(SystemExit) as loader_refused:
        questions = tmp_path / "question.jsonl"
        questions.write_text(f'{{"question_id": "q", "image": "{IMAGE_NAME}", "text": "{QUESTION}"}}\n')
        answer_questions(cli_args(tiny_original, questions, tmp_path / "answers.jsonl", "--method", "fastv",
                                  "--budget", "1"))
    assert str(refused.value) == loader_refused.value.code
    assert str(refused.value).startswith("error: --method fastv: ") and "\n" not in str(refused.value)

    with pytest.raises(AppError) as too_long:
        compare(client, IMAGE, " ".join(["word"] * 1600), ["mustdrop"])
    assert CONTEXT_ERROR.fullmatch(str(too_long.value)), too_long.value
    assert server.process.poll() is None


def test_a_request_without_an_image_or_a_question_is_refused(client):
    for image, question, message in [(None, QUESTION, "error: upload an image or pick a demo image first"),
                                      (handle_file(str(IMAGE)), " ", "error: type a question about the image")]:
        with pytest.raises(AppError, match=f"^{message}$"):
            client.predict(image, question, ["mustdrop"], None, None, 0.011, 0.01, api_name=f"/{API_NAME}")


def test_it_listens_on_localhost_by_default(server):
    assert build_parser().parse_args(["--model-path", "M"]).host == "127.0.0.1"
    assert f"Running on local URL:  http://127.0.0.1:{server.port}" in server.output()


class OverlapRecorder:
    """Stands in for the shared model: records how many requests it was answering at once."""

    num_layers = DECODER_LAYERS
    ANSWER_SECONDS = 0.3

    def __init__(self):
        self.lock = threading.Lock()
        self.running = self.most_at_once = self.answered = 0

    def compare(self, image, question, methods) -> Comparison:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.ANSWER_SECONDS)
        with self.lock:
            self.running -= 1
            self.answered += 1
        return Comparison(None, [])


def test_requests_wait_in_a_queue_rather_than_run_the_model_together():
    recorder = OverlapRecorder()
    page = build_page(recorder)
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        jobs = [client.submit(handle_file(str(IMAGE)), QUESTION, [], None, 0.0, 0.0, api_name=f"/{API_NAME}")
                for _ in range(3)]
        for job in jobs:
            job.result(timeout=REQUEST_TIMEOUT_S)
    finally:
        page.close()
    assert recorder.answered == 3
    assert recorder.most_at_once == 1


@pytest.mark.parametrize("flags,message", [
    (["--port", "70000"], r"^error: --port must be between 1 and 65535, got 70000$"),
    (["--host", "no-such-host.invalid"], r"^error: cannot listen on no-such-host\.invalid:\d+: "),
    (["--conv-mode", "vicuna_v9"], r"^error: unknown conversation mode 'vicuna_v9'"),
    (["--max-new-tokens", "0"], r"^error: max_new_tokens must be >= 1, got 0$"),
    (["--cuda-graph", "--device", "cpu"], r"^error: --cuda-graph needs a CUDA device"),
    ([], r"^error: model '.*no-model' is neither a local directory nor in the Hugging Face cache"),
])
def test_bad_flags_are_one_line_before_the_model_loads(tmp_path, flags, message):
    """The model path does not exist, so each message shows its check ran before any loading."""
    with pytest.raises(SystemExit) as stopped:
        main(["--model-path", str(tmp_path / "no-model"), "--port", str(free_port()), *flags])
    assert re.search(message, str(stopped.value.code)) and "\n" not in str(stopped.value.code)


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as stopped:
            main(["--model-path", str(tmp_path / "no-model"), "--port", str(port)])
    assert stopped.value.code == f"error: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use"


def test_without_gradio_it_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "llava.serve.page", raising=False)
    monkeypatch.delattr(llava.serve, "page", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["--model-path", str(tmp_path / "no-model"), "--port", str(free_port())])
    assert stopped.value.code == 'error: the web page needs gradio: pip install -e ".[web]"'
