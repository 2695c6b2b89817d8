"""What a preemption costs on the CPU model: reading a prompt against generating tokens.

    .venv/bin/python bench/prompt_eval_cost.py

``local/smollm2-135m`` in-process (llama.cpp, one thread, as configs/models.yaml runs it), greedy,
median of 5: a short prompt for 1 and for 48 output tokens, and a longer prompt (as a resumed
request re-reads its prompt plus the tokens it had) for 1. Why the engine reads preemptible prompts in
steps and lingers after a higher class (serve_app/engines/slots.py; docs/PERFORMANCE.md, "Priority
under overload").
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from serve_app.engines.llama_cpp import LlamaCppEngine  # noqa: E402
from serve_app.registry.catalog import load_catalog  # noqa: E402
from serve_app.schemas import ChatCompletionRequest  # noqa: E402

STORY = "Write a short story about a robot."
CASES = [("short prompt, 1 token out", STORY, 1), ("short prompt, 48 tokens out", STORY, 48),
         ("prompt + 48 words, 1 token out", STORY + " once upon a time there was a robot" * 6, 1)]


async def main() -> None:
    spec = load_catalog(REPO / "configs" / "models.yaml").get("local/smollm2-135m")
    assert spec is not None
    engine = LlamaCppEngine.from_spec(spec)
    try:
        for label, content, max_tokens in CASES:
            request = ChatCompletionRequest(model=spec.id, messages=[{"role": "user", "content": content}],
                                            max_tokens=max_tokens, temperature=0)
            walls = []
            for _ in range(5):
                started = time.perf_counter()
                result = await engine.generate(request)
                walls.append(time.perf_counter() - started)
            used = result["usage"]
            print(f"{label:32s} prompt {used['prompt_tokens']:3d}  completion {used['completion_tokens']:3d}"
                  f"  median {1000 * statistics.median(walls):6.0f} ms")  # noqa: T201
    finally:
        await engine.aclose()


if __name__ == "__main__":
    asyncio.run(main())
