"""Hugging Face export/import: logits and greedy decoding equal ours, round trips are exact, bad folders
give errors that name the tensor, the CoLA authors' layout imports, the export loads without our package.

Checkpoints are written the way the training loop writes them (``save_model_file`` per TP rank, a
``latest`` file), from debug models trained a few AdamW steps, TP=1 and TP=2 (shards cut along each
parameter's split dim), with the vocab padded from the tokenizer's size to 320.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_cola.atomic_io import atomic_write_text
from megatron_cola.checkpoint import iteration_tag, load_full_state_dict, model_file_name, save_model_file
from megatron_cola.config import ModelArgs
from megatron_cola.convert import ConversionError, export_checkpoint, import_hf_folder, load_hf_folder
from megatron_cola.convert.modeling_cola import ColaForCausalLM
from megatron_cola.model import CoLALlama, build_model

PADDED_VOCAB = 320
WORDS = (
    "the quick brown fox jumps over a lazy dog while low rank activations keep training cheap and "
    "models learn to predict every next token of long documents written in plain english text"
).split()

VARIANTS = {
    # name: (ModelArgs overrides, tensor-parallel degree of the written checkpoint)
    "cola": (dict(full_rank=False, gate_activation=True), 2),
    "cola_no_gate_act": (dict(full_rank=False, gate_activation=False), 1),
    "full_rank": (dict(full_rank=True), 2),
}


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    import random

    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    with open(d / "corpus.txt", "w") as f:
        for _ in range(3000):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + ".\n")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"),
        model_prefix=str(d / "sp"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return str(d / "sp.model")


def tokenizer_vocab(sp_model: str) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=sp_model).vocab_size()


def progressions(vocab: int, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Arithmetic progressions mod ``vocab`` (steps 1-3): a pattern a tiny model learns in a few steps,
    so that greedy continuations are not one repeated token."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    step = torch.randint(1, 4, (batch, 1), generator=gen)
    return (start + step * torch.arange(length)) % vocab


def trained_model(overrides: dict, vocab: int, seed: int = 3) -> CoLALlama:
    """A debug model after 30 AdamW steps on ``progressions`` (norm weights move off one)."""
    args = ModelArgs.from_size("debug", vocab_size=PADDED_VOCAB, num_layers=2, **overrides)
    model = build_model(args, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(30):
        tokens = progressions(vocab, 8, 33, gen)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def split_dims(model: CoLALlama) -> dict[str, int]:
    """The tensor-parallel split dim of every sharded parameter (docs/tensor_parallel.md's CoLA scheme)."""
    dims = {"embed_tokens.weight": 0, "lm_head.weight": 0}
    for name, _ in model.named_parameters():
        if ".self_attn.o_proj." in name or ".mlp.down_proj." in name:  # row-parallel
            dims[name] = 1
        elif name.endswith(("weight_a", "weight_b")) or (".self_attn." in name or ".mlp." in name):
            dims[name] = 0  # column-parallel (A over the rank, B over heads / ffn)
    return dims


def write_checkpoint(
    model: CoLALlama, save: str, tp: int, vocab: int, tokenizer: dict | None, it: int = 10
) -> None:
    dims = split_dims(model) if tp > 1 else {}
    os.makedirs(os.path.join(save, iteration_tag(it)), exist_ok=True)
    for rank in range(tp):
        shard = {
            k: (v.chunk(tp, dim=dims[k])[rank].clone() if k in dims else v.clone())
            for k, v in model.state_dict().items()
        }
        save_model_file(
            os.path.join(save, iteration_tag(it), model_file_name(rank)),
            shard,
            model.args.to_dict(),
            dims,
            tp_rank=rank,
            tp_size=tp,
            vocab_size=vocab,
            iteration=it,
            tokenizer=tokenizer,
        )
    atomic_write_text(os.path.join(save, "latest"), iteration_tag(it))


def our_greedy(model: CoLALlama, tokens: torch.Tensor, steps: int, vocab: int) -> torch.Tensor:
    """Plain greedy decoding with our model: full forward every step, argmax over the real vocab."""
    out = tokens
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(out)[:, -1, :vocab].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out[:, tokens.shape[1] :]


def until_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def load_hf(folder: str):
    from transformers import AutoModelForCausalLM

    with open(os.path.join(folder, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    if model_type == "llama":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ColaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def exported(sp_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Per variant: (our trained model, checkpoint dir, fp32 HF export dir)."""
    vocab = tokenizer_vocab(sp_model)
    out = {}
    for name, (overrides, tp) in VARIANTS.items():
        d = tmp_path_factory.mktemp(name)
        model = trained_model(overrides, vocab)
        ckpt = str(d / "ckpt")
        write_checkpoint(model, ckpt, tp, vocab, {"type": "SentencePieceTokenizer", "model": sp_model})
        hf_dir = export_checkpoint(ckpt, str(d / "hf"), dtype="fp32")
        out[name] = (model, ckpt, hf_dir)
    return out


def sample_tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_logits_and_greedy_generate_match_ours(variant: str, exported: dict, sp_model: str) -> None:
    model, _, hf_dir = exported[variant]
    vocab = tokenizer_vocab(sp_model)
    hf = load_hf(hf_dir)
    expected_cls = "LlamaForCausalLM" if model.args.full_rank else "ColaForCausalLM"
    assert type(hf).__name__ == expected_cls
    tokens = sample_tokens(vocab)
    with torch.no_grad():
        ours = model(tokens)[..., :vocab]
        theirs = hf(tokens).logits
    assert theirs.shape == (2, 12, vocab)
    assert (ours - theirs).abs().max().item() < 1e-4

    eos = hf.generation_config.eos_token_id
    prompt = progressions(vocab, 3, 8, torch.Generator().manual_seed(1))
    generated = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False
    )
    reference = our_greedy(model, prompt, 12, vocab)
    assert until_eos(generated[:, 8:].tolist(), eos) == until_eos(reference.tolist(), eos)
    assert len({t for row in reference.tolist() for t in row}) > 3  # real continuations, not one token


def test_kv_cache_decoding_matches_full_forward(exported: dict, sp_model: str) -> None:
    _, _, hf_dir = exported["cola"]
    hf = load_hf(hf_dir)
    tokens = sample_tokens(tokenizer_vocab(sp_model), seed=1)
    with torch.no_grad():
        full = hf(tokens).logits
        first = hf(tokens[:, :5], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        rest = hf(tokens[:, 5:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 5:], atol=1e-5, rtol=1e-5)
    # Left padding: a padded batch row decodes like the same prompt alone.
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    padded = hf.generate(tokens, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone = hf.generate(tokens[1:, 4:], attention_mask=mask[1:, 4:], max_new_tokens=6, do_sample=False)
    assert padded[1, 12:].tolist() == alone[0, 8:].tolist()


@pytest.mark.parametrize("variant", ["cola", "full_rank"])
def test_export_folder_contents(variant: str, exported: dict, sp_model: str) -> None:
    model, _, hf_dir = exported[variant]
    files = set(os.listdir(hf_dir))
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(hf_dir, "generation_config.json")) as f:
        gen = json.load(f)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert config["rms_norm_eps"] == model.args.norm_eps
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    assert theta == model.args.rope_theta
    assert config["max_position_embeddings"] == model.args.max_seq_length
    assert config["tie_word_embeddings"] is False
    assert config["vocab_size"] == tokenizer_vocab(sp_model)
    import sentencepiece as spm

    assert gen["eos_token_id"] == spm.SentencePieceProcessor(model_file=sp_model).eos_id()
    if model.args.full_rank:
        assert config["architectures"] == ["LlamaForCausalLM"] and not any(f.endswith(".py") for f in files)
        assert "auto_map" not in config
    else:
        assert {"configuration_cola.py", "modeling_cola.py"} <= files
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cola.ColaForCausalLM"
        assert config["cola_rank"] == model.args.cola_rank
    assert not any(".tmp-" in f for f in os.listdir(os.path.dirname(hf_dir)))


def test_exported_tokenizer_encodes_like_sentencepiece(exported: dict, sp_model: str) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = AutoTokenizer.from_pretrained(exported["cola"][2])
    texts = ["the quick brown fox", "  two  spaces\nand a newline ", "Zürich 42 ünïcode ﬁ", "", "token."]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
    assert tok.eos_token_id == sp.eos_id()


def test_sharded_export_loads_and_missing_shard_names_tensors(exported: dict, tmp_path) -> None:
    model, ckpt, _ = exported["full_rank"]
    out = export_checkpoint(ckpt, str(tmp_path / "hf"), dtype="fp32", max_shard_size="300KB")
    index_path = os.path.join(out, "model.safetensors.index.json")
    with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 2 and not os.path.exists(os.path.join(out, "model.safetensors"))
    state, _, _ = load_hf_folder(out)
    reference, _ = load_full_state_dict(ckpt, drop_vocab_padding=True)
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    hf = load_hf(out)
    tokens = sample_tokens(hf.config.vocab_size)
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens)[..., : hf.config.vocab_size]).abs().max().item()
    assert diff < 1e-4

    gone = shards[1]
    os.remove(os.path.join(out, gone))
    some_tensor = next(k for k, v in weight_map.items() if v == gone)
    with pytest.raises(ConversionError, match=f"{gone}.*missing.*{some_tensor}"):
        import_hf_folder(out, str(tmp_path / "back"))


def test_bf16_export(exported: dict, tmp_path) -> None:
    from safetensors.torch import load_file

    _, ckpt, _ = exported["cola"]
    out = export_checkpoint(ckpt, str(tmp_path / "bf16"), dtype="bf16", with_tokenizer=False)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert not os.path.exists(os.path.join(out, "tokenizer.json"))
    with pytest.raises(ConversionError, match="overwrite"):
        export_checkpoint(ckpt, out, dtype="bf16", with_tokenizer=False)
    export_checkpoint(ckpt, out, dtype="fp32", with_tokenizer=False, overwrite=True)
    assert load_file(os.path.join(out, "model.safetensors"))["lm_head.weight"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trips_are_exact(variant: str, exported: dict, tmp_path) -> None:
    from safetensors.torch import load_file

    _, ckpt, hf_dir = exported[variant]
    # ours -> HF -> ours: the imported checkpoint holds exactly the unpadded weights.
    back = str(tmp_path / "ckpt")
    import_hf_folder(hf_dir, back)
    original, meta = load_full_state_dict(ckpt, drop_vocab_padding=True)
    imported, meta_back = load_full_state_dict(back)
    assert meta_back["tp_size"] == 1 and meta_back["iteration"] == 0
    assert meta_back["args"] == meta["args"]
    assert meta_back["vocab_size"] == meta["vocab_size"]
    assert meta_back["tokenizer"]["type"] == "SentencePieceTokenizer"
    assert os.path.exists(meta_back["tokenizer"]["model"])
    assert imported.keys() == original.keys()
    for name in original:
        assert torch.equal(imported[name], original[name]), name
    # HF -> ours -> HF: the same tensors and config.
    again = export_checkpoint(back, str(tmp_path / "hf"), dtype="fp32")
    first, second = (
        load_file(os.path.join(hf_dir, "model.safetensors")),
        load_file(os.path.join(again, "model.safetensors")),
    )
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    with open(os.path.join(hf_dir, "config.json")) as f, open(os.path.join(again, "config.json")) as g:
        assert json.load(f) == json.load(g)


def test_import_errors_name_the_tensor(exported: dict, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    _, _, hf_dir = exported["cola"]
    bad = str(tmp_path / "bad")
    shutil.copytree(hf_dir, bad)
    weights = os.path.join(bad, "model.safetensors")
    tensors = load_file(weights)
    name = "model.layers.1.self_attn.k_proj.weight_a"
    tensors[name] = torch.zeros(63, 256)
    save_file(tensors, weights)
    with pytest.raises(ConversionError, match=rf"{name} has shape \(63, 256\), expected \(64, 256\)"):
        import_hf_folder(bad, str(tmp_path / "out"))
    del tensors[name]
    save_file(tensors, weights)
    with pytest.raises(ConversionError, match=rf"missing tensor {name} \(expected shape \(64, 256\)\)"):
        import_hf_folder(bad, str(tmp_path / "out"))
    assert not os.path.exists(str(tmp_path / "out" / "latest"))


def test_export_rejects_mismatched_checkpoint(exported: dict, sp_model: str, tmp_path) -> None:
    model, _, _ = exported["full_rank"]
    state = model.state_dict()
    state["layers.0.mlp.up_proj.weight"] = torch.zeros(690, 256)
    ckpt = str(tmp_path / "ckpt")
    os.makedirs(os.path.join(ckpt, iteration_tag(1)))
    save_model_file(os.path.join(ckpt, iteration_tag(1), model_file_name(0)), state, model.args.to_dict(), {})
    atomic_write_text(os.path.join(ckpt, "latest"), iteration_tag(1))
    with pytest.raises(
        ConversionError, match=r"layers.0.mlp.up_proj.weight has shape \(690, 256\), expected"
    ):
        export_checkpoint(ckpt, str(tmp_path / "hf"), with_tokenizer=False)
    assert not os.path.exists(tmp_path / "hf")


def test_llama_with_tied_embeddings_imports(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "llama")
    import_hf_folder(str(tmp_path / "llama"), str(tmp_path / "ckpt"))
    state, meta = load_full_state_dict(str(tmp_path / "ckpt"))
    args = ModelArgs.from_dict(meta["args"])
    assert (
        args.full_rank
        and args.norm_eps == 1e-5
        and args.rope_theta == 500000.0
        and args.max_seq_length == 128
    )
    ours = CoLALlama(args).eval()
    ours.load_state_dict(state)
    tokens = sample_tokens(96)
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------- authors' CoLA
def official_cola_folder(model: CoLALlama, folder: str, bias: float = 0.0) -> None:
    """The CoLA authors' layout: ``cola_a`` [in, rank], ``cola_b`` [rank, out], config ``rank``,
    ``only_lr_act``; every CoLA map gets a ``bias`` filled with ``bias``."""
    args = model.args
    tensors = {}
    for name, t in model.state_dict().items():
        hf = name if name.startswith("lm_head") else f"model.{name}"
        if name.endswith("weight_a"):
            tensors[hf.replace("weight_a", "cola_a")] = t.t().contiguous()
        elif name.endswith("weight_b"):
            tensors[hf.replace("weight_b", "cola_b")] = t.t().contiguous()
            tensors[hf.replace("weight_b", "bias")] = torch.full((t.shape[0],), bias)
        else:
            tensors[hf] = t.clone()
    config = {
        "model_type": "cola",
        "architectures": ["ColaForCausalLM"],
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_attention_heads,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_length,
        "tie_word_embeddings": False,
        "rank": args.cola_rank,
        "lr_act_type": "silu",
        "only_lr_act": not args.gate_activation,
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))


@pytest.mark.parametrize("variant", ["cola", "cola_no_gate_act"])
def test_official_cola_state_dict_imports(variant: str, exported: dict, tmp_path) -> None:
    model, _, _ = exported[variant]
    official_cola_folder(model, str(tmp_path / "official"))
    import_hf_folder(str(tmp_path / "official"), str(tmp_path / "ckpt"))
    state, meta = load_full_state_dict(str(tmp_path / "ckpt"))
    assert ModelArgs.from_dict(meta["args"]) == model.args
    for name, t in model.state_dict().items():
        assert torch.equal(state[name], t), name
    # The authors' ColaLayer computes σ(x @ cola_a) @ cola_b: the same map as our imported CoLALinear.
    official = torch.load(str(tmp_path / "official" / "pytorch_model.bin"))
    x = torch.randn(3, model.args.hidden_size)
    a, b = (
        official["model.layers.0.self_attn.v_proj.cola_a"],
        official["model.layers.0.self_attn.v_proj.cola_b"],
    )
    torch.testing.assert_close(model.layers[0].self_attn.v_proj(x), torch.nn.functional.silu(x @ a) @ b)


def test_official_cola_nonzero_bias_is_rejected(exported: dict, tmp_path) -> None:
    model, _, _ = exported["cola"]
    official_cola_folder(model, str(tmp_path / "official"), bias=0.5)
    with pytest.raises(ConversionError, match=r"model.layers.0.self_attn.q_proj.bias is a nonzero bias"):
        import_hf_folder(str(tmp_path / "official"), str(tmp_path / "ckpt"))


# ---------------------------------------------------------------------------------------------- remote code
REMOTE_SCRIPT = """
import json, sys
sys.path.append({site!r})
try:
    import megatron_cola  # noqa: F401
    print(json.dumps({{"error": "megatron_cola is importable"}}))
    sys.exit(0)
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained({folder!r}, trust_remote_code=True)
tokens = torch.tensor({tokens!r})
with torch.no_grad():
    logits = model(tokens).logits
out = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8, do_sample=False)
print(json.dumps({{
    "class": type(model).__name__,
    "module": type(model).__module__,
    "logits": logits[:, -1].tolist(),
    "generated": out[:, tokens.shape[1]:].tolist(),
    "eos": model.generation_config.eos_token_id,
    "encoded": tok.encode("the lazy dog", add_special_tokens=False),
}}))
"""


def test_export_loads_with_transformers_alone(exported: dict, sp_model: str, tmp_path) -> None:
    import sentencepiece as spm
    import transformers

    model, _, hf_dir = exported["cola"]
    vocab = tokenizer_vocab(sp_model)
    tokens = sample_tokens(vocab, seed=2)
    site = os.path.dirname(os.path.dirname(transformers.__file__))
    script = REMOTE_SCRIPT.format(site=site, folder=hf_dir, tokens=tokens.tolist())
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
        "OMP_NUM_THREADS": "1",
    }
    # -I: no PYTHONPATH, no user site, no script dir; -S: no site-packages .pth files (so not our editable
    # install either). Only the standard library and the directory holding transformers are importable.
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in result, result
    assert result["class"] == "ColaForCausalLM" and result["module"].startswith("transformers_modules")
    with torch.no_grad():
        ours = model(tokens)[:, -1, :vocab]
    assert (torch.tensor(result["logits"]) - ours).abs().max().item() < 1e-4
    reference = our_greedy(model, tokens, 8, vocab)
    assert until_eos(result["generated"], result["eos"]) == until_eos(reference.tolist(), result["eos"])
    assert result["encoded"] == spm.SentencePieceProcessor(model_file=sp_model).encode("the lazy dog")


def test_hf_tokenizer_checkpoint_exports(exported: dict, sp_model: str, tmp_path) -> None:
    from transformers import AutoTokenizer

    model, _, hf_dir = exported["full_rank"]
    tok_dir = str(tmp_path / "hf_tok")
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(tok_dir)
    ckpt = str(tmp_path / "ckpt")
    write_checkpoint(
        model, ckpt, 1, tokenizer_vocab(sp_model), {"type": "HuggingFaceTokenizer", "model": tok_dir}, it=5
    )
    out = export_checkpoint(ckpt, str(tmp_path / "hf"), dtype="fp32")
    tok = AutoTokenizer.from_pretrained(out)
    source = AutoTokenizer.from_pretrained(tok_dir)
    text = "the lazy dog"
    assert tok.encode(text, add_special_tokens=False) == source.encode(text, add_special_tokens=False)
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == tok.eos_token_id


# ---------------------------------------------------------------------------------------------- tools
def test_command_line_tools(exported: dict, tmp_path, capsys: pytest.CaptureFixture) -> None:
    _, ckpt, _ = exported["cola"]
    from megatron_cola.cli import convert_from_hf as from_hf
    from megatron_cola.cli import convert_to_hf as to_hf
    from megatron_cola.cli import generate

    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    assert to_hf.main(["--load", ckpt, "--save", hf_dir, "--dtype", "fp32", "--iteration", "10"]) == 0
    assert to_hf.main(["--load", ckpt, "--save", hf_dir]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert from_hf.main(["--load", hf_dir, "--save", back]) == 0
    assert os.path.exists(os.path.join(back, "iter_0000000", "model_tp00.pt"))
    capsys.readouterr()
    texts = []
    for source in (ckpt, hf_dir, back):
        assert (
            generate.main(["--load", source, "--prompt", "the lazy", "--greedy", "--max-new-tokens", "6"])
            == 0
        )
        out = capsys.readouterr().out.splitlines()
        texts.append(out[out.index("---") + 1])
    assert texts[0].startswith("the lazy") and texts[0] == texts[1] == texts[2]
    sampled = []
    for _ in range(2):
        args = [
            "--load",
            hf_dir,
            "--prompt",
            "the",
            "--max-new-tokens",
            "8",
            "--temperature",
            "1.5",
            "--seed",
            "7",
        ]
        assert generate.main([*args, "--top-p", "0.9"]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1]  # same seed, same sample


def test_bench_inference_worker_runs() -> None:
    from megatron_cola.convert.inference_bench import run_variant

    opts = dict(model_size="debug", batch_size=2, prompt_length=5, new_tokens=3, dtype="fp32", device="cpu")
    results = {}
    for variant in ("cola", "full"):
        results[variant] = run_variant(variant, **opts, repeats=1)
    assert results["cola"]["params"] == ModelArgs.from_size("debug").num_params()
    assert results["full"]["params"] == ModelArgs.from_size("debug", full_rank=True).num_params()
    assert all(r["generate_tok_s"] > 0 and r["weights_mib"] > 0 for r in results.values())
