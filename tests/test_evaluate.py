"""tools/evaluate.py: lm-evaluation-harness (the real ``lm_eval``) on the bundled ``sample_cloze`` task,
for an HF export and for a checkpoint directory, with a tiny model trained here for a few seconds."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_cola.config import ModelArgs
from megatron_cola.convert.sample_cloze import MC_FILE, PPL_FILE, TASK_DIR, cloze_items, passages

pytest.importorskip("lm_eval")

SEQ = 128


def _texts() -> list[str]:
    mc = [json.loads(line) for line in open(f"{TASK_DIR}/{MC_FILE}")]
    ppl = [json.loads(line) for line in open(f"{TASK_DIR}/{PPL_FILE}")]
    return [r["text"] for r in ppl] + [r["context"] + r["choices"][r["label"]] for r in mc]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """HF folders of one tiny CoLA model, untrained and trained (100 AdamW steps on the task's own text),
    with a 512-piece SentencePiece tokenizer trained on the same text."""
    from megatron_cola.convert.export import write_hf_folder
    from megatron_cola.convert.tokenizer import TokenizerSpec
    from megatron_cola.data.tokenizer_training import train_tokenizer
    from megatron_cola.model import build_model

    d = tmp_path_factory.mktemp("eval")
    corpus = d / "corpus.jsonl"
    texts = _texts()
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok_path = train_tokenizer([str(corpus)], str(d / "tok"), vocab_size=512)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok_path)
    ids = [i for t in texts for i in [*sp.encode(t), sp.eos_id()]]
    n = len(ids) // (SEQ + 1)
    data = torch.tensor(ids[: n * (SEQ + 1)]).view(n, SEQ + 1)
    args = ModelArgs(
        hidden_size=64,
        ffn_hidden_size=176,
        num_attention_heads=4,
        num_layers=2,
        vocab_size=sp.get_piece_size(),
        cola_rank=16,
        max_seq_length=SEQ,
    )
    torch.manual_seed(0)
    model = build_model(args, seed=0)
    spec = TokenizerSpec("sentencepiece", tok_path)
    out = {}
    out["untrained"] = write_hf_folder(
        model.state_dict(), args, str(d / "untrained"), tokenizer=spec, eod=sp.eos_id(), dtype="fp32"
    )
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        batch = data[torch.randint(0, n, (8,), generator=gen)]
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 4.5
    out["trained"] = write_hf_folder(
        model.state_dict(), args, str(d / "trained"), tokenizer=spec, eod=sp.eos_id(), dtype="fp32"
    )
    return out


def _metrics(record: dict) -> dict[str, float]:
    return {
        f"{task}/{key}": value
        for task, values in record["results"].items()
        for key, value in values.items()
        if isinstance(value, float)
    }


def test_sample_cloze_on_hf_folders_and_checkpoint(models: dict[str, str], tmp_path) -> None:
    from megatron_cola.cli.evaluate import main
    from megatron_cola.convert import import_hf_folder

    scores = {}
    for name, hf_dir in models.items():
        out = tmp_path / f"{name}.json"
        assert main(["--load", hf_dir, "--tasks", "sample_cloze", "--output", str(out)]) == 0
        scores[name] = json.loads(out.read_text())
    untrained, trained = (_metrics(scores[k]) for k in ("untrained", "trained"))
    assert set(trained) >= {"sample_cloze_mc/acc,none", "sample_cloze_ppl/word_perplexity,none"}
    assert scores["trained"]["n-samples"]["sample_cloze_mc"]["effective"] == 150
    assert scores["trained"]["n-samples"]["sample_cloze_ppl"]["effective"] == 16
    # An untrained model's perplexity is about its vocabulary (512 pieces, ~3 bytes each).
    assert untrained["sample_cloze_ppl/bits_per_byte,none"] > 2.5
    assert (
        trained["sample_cloze_ppl/bits_per_byte,none"]
        < untrained["sample_cloze_ppl/bits_per_byte,none"] - 0.5
    )
    assert trained["sample_cloze_mc/acc,none"] > untrained["sample_cloze_mc/acc,none"]

    # The same weights as a checkpoint directory: exported to a temporary folder, the same numbers (fp32,
    # CPU: deterministic), written next to the checkpoint by default.
    ckpt = tmp_path / "ckpt"
    import_hf_folder(models["trained"], str(ckpt))
    assert main(["--load", str(ckpt), "--tasks", "sample_cloze_ppl"]) == 0  # the cheaper subtask
    again = json.loads((ckpt / "lm_eval_iter_0000000.json").read_text())
    assert again["source"]["kind"] == "checkpoint" and again["source"]["checkpoint"] == "iter_0000000"
    assert _metrics(again) == {k: v for k, v in trained.items() if k.startswith("sample_cloze_ppl/")}
    assert all(math.isfinite(v) for v in trained.values())


def test_unknown_task_and_missing_load(tmp_path, capsys) -> None:
    from megatron_cola.cli.evaluate import main
    from megatron_cola.convert.evaluate import task_manager
    from megatron_cola.errors import ConfigError

    # (lm-eval's own registry takes tens of seconds to index; the bundled and included tasks are searched
    # the same way without it)
    with pytest.raises(
        ConfigError, match=r"unknown lm-eval task\(s\): 'sample_clozee' \(did you mean sample_cloze"
    ):
        task_manager(["sample_cloze_mc", "sample_clozee"], [str(tmp_path)], include_defaults=False)
    with pytest.raises(ConfigError, match="--include-path .* is not a directory"):
        task_manager(["sample_cloze"], [str(tmp_path / "nope")])
    assert main(["--load", str(tmp_path / "nope"), "--tasks", "sample_cloze"]) == 1
    assert f"--load {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_cloze_builder_is_deterministic() -> None:
    docs = [
        "\n".join(f"play{d} line {k}, spoken by a player here, play{d}" for k in range(12)) for d in range(6)
    ]
    items = cloze_items(docs, 10, context_chars=120, seed=3)
    assert items == cloze_items(docs, 10, context_chars=120, seed=3)
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        answer = item["choices"][item["label"]]
        # the context ends inside a line whose rest is the answer; the distractors end lines of other plays
        play = answer.rsplit("play", 1)[1]
        assert (item["context"] + answer + "\n") in docs[int(play)] + "\n"
        assert item["context"].rsplit("\n", 1)[-1].startswith(f"play{play} line ")
        assert all(not c.endswith(f"play{play}") for i, c in enumerate(item["choices"]) if i != item["label"])
    assert [p["text"] for p in passages(docs, 3, passage_chars=100)] == [
        docs[i][: docs[i][:100].rindex("\n")] for i in (0, 2, 4)
    ]
