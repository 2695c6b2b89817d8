"""The JavaScript example under examples/ runs unmodified against the graph (Node 20 fetch)."""

from __future__ import annotations

import json
import os
import subprocess

from tests.e2e.conftest import REPO, Graph


def test_node_fetch_example(graph: Graph) -> None:
    env = {**os.environ, "IIR_BASE_URL": graph.base_url}
    done = subprocess.run(["node", str(REPO / "examples" / "node_fetch.mjs")], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["priority"] == 3
    assert "local/smollm2-135m" in result["models"]
    assert result["chat"].strip() and result["streamed"].strip() and result["sawDone"] is True
    assert result["embeddingLength"] == 384
