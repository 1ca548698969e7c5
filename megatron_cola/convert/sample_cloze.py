"""Build the bundled lm-evaluation-harness task ``sample_cloze`` from the sample corpus's validation split.

The sample corpus (``tools/prepare_sample_corpus.py``: Shakespeare's plays, split into ``train.jsonl``
and ``valid.jsonl``) is what ``make quickstart`` trains on. Its validation documents, never trained on,
give two JSONL files under ``megatron_cola/convert/lm_eval_tasks/sample_cloze/``:

- ``sample_cloze_mc.jsonl``: multiple-choice cloze items. A line of spoken text (not a speaker name, stage
  direction or heading; 20-80 characters) is cut at the space nearest its middle; ``context`` is the
  scene's text before it (at most ``context_chars`` characters, cut at a line start) plus the line's first
  half; ``choices`` are the line's true second half and ``distractors`` second halves of lines from other
  documents, in a seeded random order; ``label`` is the index of the true one.
- ``sample_cloze_ppl.jsonl``: ``text`` passages (the first ``passage_chars`` of documents, cut at a line
  end) scored with ``loglikelihood_rolling`` (word and byte perplexity, bits per byte).

Everything is a deterministic function of the corpus and the seed. Regenerate with
``python -m megatron_cola.convert.sample_cloze data/sample/valid.jsonl`` (``--output-dir``: elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

from megatron_cola.atomic_io import atomic_write_text
from megatron_cola.errors import DataError

TASK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks", "sample_cloze")
MC_FILE = "sample_cloze_mc.jsonl"
PPL_FILE = "sample_cloze_ppl.jsonl"

# A speaker line ("ROMEO." / "First Citizen."), a stage direction ("[Exit.]"), a heading ("SCENE II. ...").
_NOT_SPOKEN = re.compile(r"^\s*(\[.*|[A-Z][A-Za-z' ]*\.|(SCENE|ACT|Scene|Act)\b.*|[IVXLC]+\.?)\s*$")


def _spoken(line: str) -> bool:
    return 20 <= len(line.strip()) <= 80 and not _NOT_SPOKEN.match(line) and line.strip() == line.rstrip()


def read_documents(corpus_jsonl: str) -> list[str]:
    """The ``text`` of every line of a JSONL corpus."""
    docs = []
    with open(corpus_jsonl, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{corpus_jsonl}:{n}: not a {{'text': ...}} JSON line ({e})") from e
    if not docs:
        raise DataError(f"{corpus_jsonl} holds no documents")
    return docs


def split_line(line: str) -> tuple[str, str]:
    """A line cut at the space nearest its middle: ``("But, by your leave, it", " never yet did hurt")``."""
    spaces = [i for i, c in enumerate(line) if c == " " and 0 < i < len(line) - 1]
    cut = min(spaces, key=lambda i: abs(i - len(line) / 2)) if spaces else len(line) // 2
    return line[:cut], line[cut:]


def cloze_items(
    docs: list[str], n_items: int, distractors: int = 3, context_chars: int = 300, seed: int = 1234
) -> list[dict]:
    """``n_items`` multiple-choice items, spread evenly over the documents (see the module docstring)."""
    rng = random.Random(seed)
    lines = [doc.split("\n") for doc in docs]
    candidates = [
        (d, i) for d, ls in enumerate(lines) for i, line in enumerate(ls) if i >= 4 and _spoken(line)
    ]
    pool = [(d, split_line(line)[1]) for d, ls in enumerate(lines) for line in ls if _spoken(line)]
    if len(candidates) < n_items or len({d for d, _ in pool}) < 2:
        raise DataError(
            f"the corpus has {len(candidates)} usable lines, fewer than the {n_items} items asked"
        )
    step = len(candidates) / n_items
    items = []
    for k in range(n_items):
        d, i = candidates[int(k * step)]
        head, answer = split_line(lines[d][i])
        context = head
        for line in reversed(lines[d][:i]):
            if len(line) + 1 + len(context) > context_chars:
                break
            context = line + "\n" + context
        wrong: list[str] = []
        while len(wrong) < distractors:
            other_doc, other = pool[rng.randrange(len(pool))]
            if other_doc != d and other not in wrong and other != answer:
                wrong.append(other)
        choices = [answer, *wrong]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return items


def passages(docs: list[str], n_passages: int, passage_chars: int = 1500) -> list[dict]:
    """The first ``passage_chars`` (cut at a line end) of ``n_passages`` documents spread over the corpus."""
    step = max(1, len(docs) // n_passages)
    out = []
    for doc in docs[::step][:n_passages]:
        text = doc[:passage_chars]
        if len(doc) > passage_chars and "\n" in text:
            text = text[: text.rindex("\n")]
        out.append({"text": text.strip("\n")})
    return out


def build(
    corpus_jsonl: str, output_dir: str = TASK_DIR, n_items: int = 150, n_passages: int = 16, seed: int = 1234
) -> list[str]:
    """Write both JSONL files of the task into ``output_dir``; returns their paths."""
    docs = read_documents(corpus_jsonl)
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for name, rows in (
        (MC_FILE, cloze_items(docs, n_items, seed=seed)),
        (PPL_FILE, passages(docs, n_passages)),
    ):
        path = os.path.join(output_dir, name)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", help="the sample corpus's valid.jsonl (tools/prepare_sample_corpus.py)")
    p.add_argument("--output-dir", default=TASK_DIR)
    p.add_argument("--items", type=int, default=150, help="multiple-choice items")
    p.add_argument("--passages", type=int, default=16, help="perplexity passages")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    for path in build(a.corpus, a.output_dir, a.items, a.passages, a.seed):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
