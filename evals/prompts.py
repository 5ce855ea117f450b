"""Prompt sets in the Spec-Bench format: one JSON object a line with ``question_id``, ``category``, ``turns``.

spruce ships a small set of its own (``data/spruce_prompts.jsonl``: six categories, three prompts each);
any Spec-Bench-format file can be given by path. Spec-Bench's MT-bench sub-categories (writing, roleplay,
reasoning, math, coding, extraction, stem, humanities) are reported together as ``mt_bench``, as in its
paper's tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

MT_BENCH_CATEGORIES = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
)


@dataclass(frozen=True)
class Prompt:
    question_id: int | str
    category: str
    turns: tuple[str, ...]


def load_prompts(path: str | Path | None = None, per_category: int | None = None) -> list[Prompt]:
    """Read prompts (``None``: the shipped set); keep the first ``per_category`` of each category."""
    if path is None:
        text = resources.files("spruce.evals").joinpath("data/spruce_prompts.jsonl").read_text()
        source = "spruce_prompts.jsonl"
    else:
        text = Path(path).read_text()
        source = str(path)
    prompts: list[Prompt] = []
    counts: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            category = "mt_bench" if row["category"] in MT_BENCH_CATEGORIES else row["category"]
            turns = tuple(row["turns"])
            qid = row["question_id"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{source}:{lineno}: not a Spec-Bench row ({exc})") from exc
        if not turns:
            raise ValueError(f"{source}:{lineno}: no turns")
        if per_category is not None and counts.get(category, 0) >= per_category:
            continue
        counts[category] = counts.get(category, 0) + 1
        prompts.append(Prompt(qid, category, turns))
    return prompts
