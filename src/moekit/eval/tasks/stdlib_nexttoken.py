"""Items of the shipped ``moekit_stdlib_nexttoken`` task, cut from the evaluation split.

Each item is a few consecutive lines of Python from ``stdlib:eval`` (the context) and
four candidate next lines: the true one and three lines from *other* files. Distractors
share the true line's indentation where possible, so that the model must judge the
code, not just count spaces. A model that has learnt Python scores well above the 25%
of chance; a random model sits near it.

The items are a pure function of the shipped split and ``seed``: regenerate the data
file with ``python scripts/make_eval_tasks.py``; a test checks the shipped file matches.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from moekit.data.corpus import Document

TASK_NAME = "moekit_stdlib_nexttoken"
DATA_FILE = Path(__file__).parent / f"{TASK_NAME}.jsonl"

CONTEXT_LINES = 4
N_CHOICES = 4
# Lines short enough that a context plus every candidate fits small models' windows,
# long enough to carry meaning (a bare `)` or `else:` tells little).
MIN_CHARS, MAX_CHARS = 12, 80


def _candidate(line: str) -> bool:
    """A line worth predicting (or using as a distractor): real code of moderate length."""
    body = line.strip()
    return MIN_CHARS <= len(line) <= MAX_CHARS and not body.startswith("#") and body.isascii()


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def build_items(docs: list[Document], *, n_items: int = 300, seed: int = 0) -> list[dict]:
    """``n_items`` multiple-choice items spread evenly over ``docs`` (deterministic).

    Each item: ``path``, ``line`` (1-based number of the true line), ``context``
    (the preceding lines, trailing whitespace stripped), ``choices`` and ``label``
    (index of the true line in ``choices``).
    """
    rng = random.Random(seed)
    lines_of = [[line.rstrip() for line in doc.text.splitlines()] for doc in docs]
    # Pool of distractors by indentation, remembering which file each came from.
    pool: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for d, lines in enumerate(lines_of):
        for line in dict.fromkeys(lines):  # de-duplicated, in order
            if _candidate(line):
                pool[_indent(line)].append((d, line))
    everything = [entry for entries in pool.values() for entry in entries]

    per_doc = -(-n_items // len(docs))  # ceil
    items: list[dict] = []
    for d, (doc, lines) in enumerate(zip(docs, lines_of)):
        positions = [
            i for i in range(CONTEXT_LINES, len(lines))
            if _candidate(lines[i]) and lines[i - 1].strip()
            and all(len(lines[j]) <= MAX_CHARS and lines[j].isascii() for j in range(i - CONTEXT_LINES, i))
        ]
        for i in sorted(rng.sample(positions, min(per_doc, len(positions)))):
            answer = lines[i]
            same_indent = [line for src, line in pool[_indent(answer)] if src != d and line != answer]
            others = same_indent if len(set(same_indent)) >= N_CHOICES - 1 else [
                line for src, line in everything if src != d and line != answer
            ]
            distractors = rng.sample(sorted(set(others)), N_CHOICES - 1)
            choices = [answer, *distractors]
            rng.shuffle(choices)
            items.append({
                "path": doc.name,
                "line": i + 1,
                # Leading blank lines carry nothing; the line before the answer is never blank.
                "context": "\n".join(lines[i - CONTEXT_LINES : i]).lstrip("\n"),
                "choices": choices,
                "label": choices.index(answer),
            })
    # Trim to exactly n_items, dropping evenly rather than the last files' items.
    if len(items) > n_items:
        keep = sorted(rng.sample(range(len(items)), n_items))
        items = [items[k] for k in keep]
    return items


def write_items(items: list[dict], path: Path = DATA_FILE) -> Path:
    """JSON lines, keys sorted, so that the file is byte-for-byte reproducible."""
    path.write_text("".join(json.dumps(item, sort_keys=True, ensure_ascii=True) + "\n" for item in items))
    return path


def read_items(path: Path = DATA_FILE) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
