"""Local model files found in a models directory (``IIR_MODELS_DIR``), as ``ModelSpec``s.

Only names and directory entries are looked at; no model file is opened or loaded here.

- ``<name>.gguf`` (at the top level or in a sub-folder that is not a Hugging Face folder) → engine
  ``llama_cpp`` on one CPU. Of a split GGUF (``-00001-of-00003.gguf``) only the first part is a
  model: llama.cpp finds the others from it.
- a folder with ``config.json`` and ``*.safetensors``/``*.bin`` weights → engine ``vllm`` on one GPU.
- the task is ``embedding`` when the name says ``embed`` (``embed``, ``embedding``, ``nomic-embed``),
  else ``chat``; the id is ``local/<slug of the file stem or folder name>``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from serve_app.registry.catalog import Autoscaling, ModelSpec, Resources, Task, slug

logger = logging.getLogger(__name__)

_SPLIT_PART = re.compile(r"-(\d{5})-of-\d{5}$")
_WEIGHTS = ("*.safetensors", "*.bin")


def scan_models_dir(folder: Path) -> list[ModelSpec]:
    """Specs for the models in ``folder``, sorted by id; a missing folder has none."""
    if not folder.is_dir():
        return []
    specs: dict[str, ModelSpec] = {}
    for spec in _scan(folder):
        if spec.id in specs:
            logger.warning("%s: model id %s is taken by %s; skipped", spec.source, spec.id,
                           specs[spec.id].source)
            continue
        specs[spec.id] = spec
    return [specs[k] for k in sorted(specs)]


def _scan(folder: Path) -> list[ModelSpec]:
    found: list[ModelSpec] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix.lower() == ".gguf":
            found.extend(_gguf(entry))
        elif entry.is_dir() and is_hf_folder(entry):
            found.append(hf_spec(entry))
        elif entry.is_dir():
            for path in sorted(entry.rglob("*.gguf")):
                found.extend(_gguf(path))
    return found


def is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(any(folder.glob(p)) for p in _WEIGHTS)


def _gguf(path: Path) -> list[ModelSpec]:
    part = _SPLIT_PART.search(path.stem)
    if part and int(part.group(1)) != 1:
        return []
    return [gguf_spec(path)]


def gguf_spec(path: Path) -> ModelSpec:
    stem = _SPLIT_PART.sub("", path.stem)
    return ModelSpec(
        id=f"local/{slug(stem)}", engine="llama_cpp", task=task_from_name(stem),
        source=str(path.resolve()), description=f"{path.name} found in the models directory",
        # One llama.cpp thread per reserved CPU (docs/ARCHITECTURE.md, "Logical CPUs").
        engine_options={"n_threads": 1}, resources=Resources(num_cpus=1), autoscaling=Autoscaling(),
    )


def hf_spec(folder: Path) -> ModelSpec:
    return ModelSpec(
        id=f"local/{slug(folder.name)}", engine="vllm", task=task_from_name(folder.name),
        source=str(folder.resolve()),
        description=f"{folder.name} (Hugging Face folder) found in the models directory",
        resources=Resources(num_cpus=1, num_gpus=1), autoscaling=Autoscaling(),
    )


def task_from_name(name: str) -> Task:
    return "embedding" if "embed" in name.lower() else "chat"

