"""Model resolution and loading: chunk joining with sha256 checks, local directories, clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import save_model_dir

from spruce import Engine, SamplingParams
from spruce.errors import IncompatibleModelsError, ModelLoadError
from spruce.models import EmbeddedModel, _chunk_files, join_chunks, resolve_model_dir


def _chunks(tmp_path: Path, sizes: list[int]) -> list[Path]:
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(bytes(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).tolist()))
        paths.append(p)
    return paths


def test_join_chunks_verifies_sha(tmp_path):
    chunks = _chunks(tmp_path, [1000, 37, 4096])
    data = b"".join(p.read_bytes() for p in chunks)
    out = join_chunks(chunks, tmp_path / "model.gguf", hashlib.sha256(data).hexdigest(), len(data))
    assert out.read_bytes() == data


def test_join_chunks_sha_mismatch_is_an_error_and_leaves_nothing(tmp_path):
    chunks = _chunks(tmp_path, [100, 200])
    out = tmp_path / "model.gguf"
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        join_chunks(chunks, out, "0" * 64, 300)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_join_chunks_size_mismatch(tmp_path):
    with pytest.raises(ModelLoadError, match="bytes"):
        join_chunks(_chunks(tmp_path, [10]), tmp_path / "m.gguf", "0" * 64, 11)


def test_missing_weight_packages_say_how_to_install():
    fake = EmbeddedModel(
        name="nothing",
        upstream="-",
        packages=("spruce-no-such-part1",),
        version="1.0",
        size_bytes=1,
        sha256="0" * 64,
        chunk_path=lambda i: ("spruce_no_such_part1", "data/part01.bin"),
    )
    with pytest.raises(ModelLoadError, match=r"pip install .*models"):
        _chunk_files(fake)


def test_unknown_model_path_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_dir(tmp_path / "nope", "target")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_dir(tmp_path / "empty", "draft")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="neither"):
        resolve_model_dir(tmp_path / "weights.bin", "target")


def test_engine_from_local_dirs(tiny_dirs):
    target_dir, draft_dir = tiny_dirs
    engine = Engine.from_pretrained(target=target_dir, draft=draft_dir)
    assert engine.drafter is not None
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    plain = engine.generate("hello there", params, speculation=None)[0]
    spec = engine.generate("hello there", params)[0]
    assert spec.token_ids == plain.token_ids and len(plain.token_ids) == 10
    # a target alone loads no draft and decodes plainly by default
    alone = Engine.from_pretrained(target=target_dir)
    assert alone.drafter is None and alone.default_speculation is None
    assert alone.generate("hello there", params)[0].token_ids == plain.token_ids


def test_draft_with_another_vocabulary_is_rejected(tmp_path, tiny_dirs):
    from transformers import AutoTokenizer

    target_dir, draft_dir = tiny_dirs
    other = tmp_path / "other_draft"
    other.mkdir()
    for f in draft_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    with pytest.raises(IncompatibleModelsError, match="vocabulary"):
        Engine.from_pretrained(target=target_dir, draft=other)


def test_save_helper_roundtrip(tmp_path, tiny_target):
    path = save_model_dir(tiny_target, tmp_path / "m")
    assert resolve_model_dir(path, "target") == path
