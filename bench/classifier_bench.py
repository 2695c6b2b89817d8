"""The prompt classifier: quality on the held-out data, latency in-process and through the graph, and
what ``model: "auto"`` adds to a request over naming the model.

1. **Quality** of the committed head (``configs/classifier/head.json``) on the validation split and on
   the boundary cases (``data/classifier/hard_cases.jsonl``): accuracy, macro-F1, per category, and
   the confusion matrix. **Robustness**: the validation prompts with seeded typos and lower-cased
   without punctuation (``classifier_train.perturb``): accuracy, macro-F1, predictions that flip; and
   accuracy on requests not in English, translation requests apart.
2. **In-process latency**, batch 1: ``classify_many([conversation])`` on every validation prompt
   (embedding + n-grams + head), p50/p99.
3. **Through the graph** (local Ray, the ``Classifier`` deployment with ``@serve.batch``):
   ``POST /v1/classify`` on the ingress replica's own port at concurrency 1, 8, 32: p50/p99, req/s.
4. **auto vs named**: ``/v1/chat/completions`` to a fake upstream (constant model time) naming the
   model, then with ``model: "auto"`` routed to the same model: the difference of the p50s.

    .venv/bin/python bench/classifier_bench.py [--requests 300] [--quality-only]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import httpx  # noqa: E402

from bench.auth_bench import RAY_ENV, deploy, local_ray, write_config_files  # noqa: E402
from bench.loadgen import percentile  # noqa: E402
from tests.support.fake_upstream import FakeUpstream  # noqa: E402
from tests.support.net import free_port  # noqa: E402

CODE = "Write a Python function that checks whether a string is a palindrome"


def quality() -> list[str]:
    from serve_app.routing.classifier import CATEGORIES, ClassifierHead, EmbeddingClassifier
    from serve_app.routing.embedder import OnnxEmbedder
    from serve_app.routing.training import DATA_DIR, OUT_DIR, evaluate, load_dataset, robustness
    from serve_app.settings import Settings

    embedder = OnnxEmbedder(cache_dir=Settings().cache_dir)
    head = ClassifierHead.load(OUT_DIR / "head.json")
    _, validation, hard = load_dataset(DATA_DIR)
    for name, examples in (("validation", validation), ("hard cases", hard)):
        m = evaluate(embedder, head, examples)
        print(f"\n{name}: n={m['n']} accuracy {m['accuracy']:.3f} macro-F1 {m['macro_f1']:.3f} "
              f"complexity MAE {m['complexity_mae']:.3f}")
        print(f"{'':10s} {'prec':>6s} {'recall':>6s} {'F1':>6s} {'n':>4s}   "
              "confusion (rows true, cols predicted)")
        rows = m["confusion"]["rows_true_cols_predicted"]
        for cat, row in zip(CATEGORIES, rows, strict=True):
            c = m["per_category"][cat]
            print(f"{cat:10s} {c['precision']:6.3f} {c['recall']:6.3f} {c['f1']:6.3f} {c['support']:4d}   "
                  + " ".join(f"{v:3d}" for v in row))
        kept = [f"{t}: {a['coverage']:.2f}/{a['accuracy_when_kept']:.3f}" for t, a in m["abstain"].items()]
        print("abstain below confidence → coverage / accuracy of the rest:", ", ".join(kept))
    r = robustness(embedder, head, validation)
    print(f"\nvalidation, perturbed ({r['perturbation']}):")
    for variant in ("typos", "lowercase_no_punct"):
        v = r[variant]
        print(f"  {variant:18s} accuracy {v['accuracy']:.3f} macro-F1 {v['macro_f1']:.3f} "
              f"flips {v['flips']}/{len(validation)} ({v['flips'] / len(validation):.1%})")
    print("validation by language of the last user turn (classifier_train.non_english):")
    for group, v in r["by_language"].items():
        accuracy = "-" if v["accuracy"] is None else f"{v['accuracy']:.3f}"
        print(f"  {group:26s} n={v['n']:3d} accuracy {accuracy} "
              f"predicted translate {v['predicted_translate']}")
    classifier = EmbeddingClassifier(embedder, head)
    samples = []
    for example in validation:
        start = time.perf_counter()
        classifier.classify_many([example.conversation])
        samples.append((time.perf_counter() - start) * 1000)
    print(f"\nin-process, batch 1, {len(samples)} validation prompts: p50 {percentile(samples, 0.5):.2f} ms, "
          f"p99 {percentile(samples, 0.99):.2f} ms")
    return [e.conversation[-1][1] for e in validation]


async def load(url: str, headers: dict[str, str], bodies: list[dict[str, Any]], concurrency: int,
               path: str) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = list(bodies)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def worker() -> None:
            while queue:
                body = queue.pop()
                start = time.perf_counter()
                async with session.post(f"{url}{path}", json=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, await r.text()
                latencies.append((time.perf_counter() - start) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, len(latencies) / elapsed


def write_configs(folder: Path, upstream: FakeUpstream) -> dict[str, str]:
    models = {"default_model": "fake/echo-chat", "models": [
        {"id": "fake/echo-chat", "engine": "openai", "task": "chat", "source": "echo-1"},
        {"id": "fake/echo-code", "engine": "openai", "task": "chat", "source": "echo-code"}]}
    providers = {"providers": [{"name": "fake", "base_url": upstream.base_url}]}
    routing = {"default": "fake/echo-chat", "min_confidence": 0.4,
               "categories": {"code": ["fake/echo-code"]}}
    return write_config_files(folder, models, providers, routing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--quality-only", action="store_true", help="skip the Ray parts (3 and 4)")
    args = parser.parse_args()
    texts = quality()
    if args.quality_only:
        return
    os.environ.update(RAY_ENV)
    with tempfile.TemporaryDirectory() as tmp, FakeUpstream() as upstream:
        env = {f"IIR_{k.upper()}": v for k, v in write_configs(Path(tmp), upstream).items()}
        env["IIR_DATABASE_URL"] = f"sqlite:///{Path(tmp) / 'iir.db'}"
        port = free_port()
        proxy = f"http://127.0.0.1:{port}"
        with local_ray(port):
            [url], _ = deploy({}, env, proxy, replicas=1)
            key = httpx.post(f"{proxy}/api/v1/apikeys", json={"description": "bench"}, timeout=30).json()
            headers = {"Authorization": f"Bearer {key['api_key']}"}
            bodies = [{"input": texts[i % len(texts)]} for i in range(args.requests)]
            asyncio.run(load(url, headers, bodies[:50], 4, "/v1/classify"))  # warm-up
            print("\nPOST /v1/classify on the ingress replica's port (validation prompts):")
            for concurrency in (1, 8, 32):
                lat, rps = asyncio.run(load(url, headers, bodies, concurrency, "/v1/classify"))
                print(f"  c={concurrency:<3d} p50 {percentile(lat, 0.5):6.2f} ms  "
                      f"p99 {percentile(lat, 0.99):6.2f} ms  {rps:6.1f} req/s")
            named = [{"model": "fake/echo-code", "max_tokens": 8,
                      "messages": [{"role": "user", "content": CODE}]}] * args.requests
            auto = [{**b, "model": "auto"} for b in named]
            print("\n/v1/chat/completions to the same upstream model, c=1:")
            results = {}
            for label, batch in (("named", named), ("auto", auto), ("named again", named)):
                lat, _ = asyncio.run(load(url, headers, batch, 1, "/v1/chat/completions"))
                results[label] = percentile(lat, 0.5)
                print(f"  {label:12s} p50 {results[label]:.2f} ms  p99 {percentile(lat, 0.99):.2f} ms")
            base = (results["named"] + results["named again"]) / 2
            print(f"  auto adds {results['auto'] - base:.2f} ms at p50")


if __name__ == "__main__":
    main()
