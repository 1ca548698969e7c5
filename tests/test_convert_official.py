"""The CoLA authors' checkpoints import exactly: their CoLA-M layout (pre/post modules, layer i's
down-projection B stored in layer i+1) and their activation semantics (``hidden_act`` is σ and the gate
activation; ``lr_act_type`` is ignored).

The fixtures are written from the authors' documented tensor naming, not from their code: a tiny model
of ours is saved under their names (``official_state_dict``), imported, and its logits compared with
the source model's (fp32, exactly), then exported to our ``ColaForCausalLM`` and compared again.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_cola.checkpoint.model_files import load_full_state_dict
from megatron_cola.config import ModelArgs
from megatron_cola.convert import ConversionError, export_checkpoint, import_hf_folder, load_hf_folder
from megatron_cola.convert.export import build_hf_model
from megatron_cola.convert.modeling_cola import ColaForCausalLM
from megatron_cola.errors import CheckpointError
from megatron_cola.model import CoLALlama, build_model
from megatron_cola.model.layers import apply_rope, rope_cos_sin

VOCAB = 96
ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh, "identity": lambda t: t}
# (hidden_act, only_lr_act): the official activations we can represent.
CASES = [("silu", True), ("silu", False), ("gelu", True), ("gelu", False), ("relu", False)]


def source_model(hidden_act: str, only_lr_act: bool, num_layers: int = 3) -> CoLALlama:
    """A tiny CoLA model with the official semantics of ``hidden_act``/``only_lr_act``; every norm weight
    moved off one so that a misplaced tensor changes the logits."""
    args = ModelArgs(
        hidden_size=64,
        ffn_hidden_size=160,
        num_attention_heads=4,
        num_layers=num_layers,
        cola_rank=16,
        vocab_size=VOCAB,
        cola_activation=hidden_act,
        gate_activation=not only_lr_act,
        mlp_gate_act=hidden_act if not only_lr_act else "silu",
        max_seq_length=64,
    )
    model = build_model(args, seed=5)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def official_state_dict(model: CoLALlama, colam: bool) -> dict[str, torch.Tensor]:
    """Our model's tensors under the authors' names. ``cola_a`` is ``[in, rank]`` (our ``weight_a``
    transposed), ``cola_b`` ``[rank, out]``. CoLA (``ColaForCausalLM``): LLaMA module names. CoLA-M
    (``ColaMForCausalLM``): per layer ``pre_attn.pre_{q,k,v}_proj.cola_a``, ``self_attn.post_{q,k,v}_proj
    .cola_b``, ``self_attn.pre_o_proj.cola_a``, ``post_attn.post_o_proj.cola_b``, ``pre_mlp.pre_{gate,up}
    _proj.cola_a``, ``self_mlp.post_{gate,up}_proj.cola_b``, ``self_mlp.pre_down_proj.cola_a``; the down
    B of layer i in layer i+1's ``last_layer_post_mlp.post_down_proj.cola_b``, the last layer's in its
    ``post_mlp.post_down_proj.cola_b``."""
    n = model.args.num_layers
    out = {
        "model.embed_tokens.weight": model.embed_tokens.weight.detach().clone(),
        "model.norm.weight": model.norm.weight.detach().clone(),
        "lm_head.weight": model.lm_head.weight.detach().clone(),
    }
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight.detach().clone()
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.detach().clone()
        maps = {f"self_attn.{x}_proj": getattr(layer.self_attn, f"{x}_proj") for x in "qkvo"}
        maps.update({f"mlp.{x}_proj": getattr(layer.mlp, f"{x}_proj") for x in ("gate", "up", "down")})
        for module, lin in maps.items():
            a, b = lin.weight_a.detach().t().contiguous(), lin.weight_b.detach().t().contiguous()
            if not colam:
                out[p + module + ".cola_a"], out[p + module + ".cola_b"] = a, b
                continue
            proj = module.split(".")[1]
            pre = {"q_proj": "pre_attn", "k_proj": "pre_attn", "v_proj": "pre_attn", "o_proj": "self_attn"}
            post = {
                "q_proj": "self_attn",
                "k_proj": "self_attn",
                "v_proj": "self_attn",
                "o_proj": "post_attn",
            }
            pre.update(gate_proj="pre_mlp", up_proj="pre_mlp", down_proj="self_mlp")
            post.update(gate_proj="self_mlp", up_proj="self_mlp")
            out[f"{p}{pre[proj]}.pre_{proj}.cola_a"] = a
            if proj != "down_proj":
                out[f"{p}{post[proj]}.post_{proj}.cola_b"] = b
            elif i < n - 1:
                out[f"model.layers.{i + 1}.last_layer_post_mlp.post_down_proj.cola_b"] = b
            else:
                out[f"{p}post_mlp.post_down_proj.cola_b"] = b
    return out


def write_official(model: CoLALlama, folder: str, colam: bool, hidden_act: str, only_lr_act: bool) -> None:
    """An authors' checkpoint folder: their ``config.json`` fields and ``pytorch_model.bin``."""
    args = model.args
    config = {
        "model_type": "cola",
        "architectures": ["ColaMForCausalLM" if colam else "ColaForCausalLM"],
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_attention_heads,
        "hidden_act": hidden_act,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_length,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "pad_token_id": None,
        "rank": args.cola_rank,
        "lr_act_type": "silu",  # stored by their config, ignored by their models
        "only_lr_act": only_lr_act,
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    torch.save(official_state_dict(model, colam), os.path.join(folder, "pytorch_model.bin"))


def colam_reference_logits(
    sd: dict[str, torch.Tensor], args: ModelArgs, act: str, gated: bool, tokens: torch.Tensor
) -> torch.Tensor:
    """The CoLA-M forward as the authors' model runs it, read from their tensor names: the down B of
    layer i is applied at the start of layer i+1 (and by the last layer's ``post_mlp``)."""
    s = ACTS[act]
    hd, n = args.head_dim, args.num_layers

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, args.norm_eps)

    cos, sin = rope_cos_sin(tokens.shape[1], hd, args.rope_theta, tokens.device)
    h, residual = sd["model.embed_tokens.weight"][tokens], None
    for i in range(n):
        p = f"model.layers.{i}."
        if i > 0:
            h = h @ sd[p + "last_layer_post_mlp.post_down_proj.cola_b"] + residual
        residual = h
        x = norm(h, sd[p + "input_layernorm.weight"])
        q, k, v = (s(x @ sd[f"{p}pre_attn.pre_{c}_proj.cola_a"]) for c in "qkv")
        q, k, v = (
            (t @ sd[f"{p}self_attn.post_{c}_proj.cola_b"]).unflatten(-1, (-1, hd)).transpose(1, 2)
            for t, c in zip((q, k, v), "qkv")
        )
        y = F.scaled_dot_product_attention(
            apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True
        )
        y = s(y.transpose(1, 2).flatten(2) @ sd[p + "self_attn.pre_o_proj.cola_a"])
        h = y @ sd[p + "post_attn.post_o_proj.cola_b"] + residual
        residual = h
        x = norm(h, sd[p + "post_attention_layernorm.weight"])
        gate = s(x @ sd[p + "pre_mlp.pre_gate_proj.cola_a"]) @ sd[p + "self_mlp.post_gate_proj.cola_b"]
        up = s(x @ sd[p + "pre_mlp.pre_up_proj.cola_a"]) @ sd[p + "self_mlp.post_up_proj.cola_b"]
        h = s(((ACTS[act](gate) if gated else gate) * up) @ sd[p + "self_mlp.pre_down_proj.cola_a"])
    h = h @ sd[f"model.layers.{n - 1}.post_mlp.post_down_proj.cola_b"] + residual
    return norm(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].t()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def imported_model(ckpt: str) -> CoLALlama:
    state, meta = load_full_state_dict(ckpt)
    model = CoLALlama(ModelArgs.from_dict(meta["args"])).eval()
    model.load_state_dict(state)
    return model


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("colam", [True, False], ids=["colam", "cola"])
@pytest.mark.parametrize(("hidden_act", "only_lr_act"), CASES)
def test_official_checkpoint_imports_with_equal_logits(
    colam: bool, hidden_act: str, only_lr_act: bool, tmp_path
) -> None:
    source = source_model(hidden_act, only_lr_act)
    official = str(tmp_path / "official")
    write_official(source, official, colam, hidden_act, only_lr_act)
    state, args, layout = load_hf_folder(official)
    assert layout == ("official_colam" if colam else "official_cola")
    assert args == source.args
    for name, t in source.state_dict().items():
        assert torch.equal(state[name], t), name

    ckpt = str(tmp_path / "ckpt")
    import_hf_folder(official, ckpt)
    ours = imported_model(ckpt)
    with torch.no_grad():
        expected = source(tokens())
        assert torch.equal(ours(tokens()), expected)
        if colam:  # the fixture, run the way CoLA-M runs it, is the source model
            sd = torch.load(os.path.join(official, "pytorch_model.bin"))
            ref = colam_reference_logits(sd, args, hidden_act, not only_lr_act, tokens())
            torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)

    # Back out as our ColaForCausalLM export, which carries the activation fields and reads back the same.
    hf_dir = export_checkpoint(ckpt, str(tmp_path / "hf"), dtype="fp32", with_tokenizer=False)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    assert config["cola_activation"] == hidden_act and config["gate_activation"] == (not only_lr_act)
    hf = ColaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    source_hf = build_hf_model(source.state_dict(), source.args).float().eval()
    with torch.no_grad():
        logits = hf(tokens()).logits
        assert torch.equal(logits, source_hf(tokens()).logits)  # exactly the source model's export
        assert (logits - expected).abs().max().item() < 1e-4  # and the HF code agrees with ours
    state_again, args_again, _ = load_hf_folder(hf_dir)
    assert args_again == source.args
    for name, t in source.state_dict().items():
        assert torch.equal(state_again[name], t), name


def test_lr_act_type_is_ignored_like_the_official_model(tmp_path) -> None:
    """hidden_act=gelu with lr_act_type=silu: the official model applies GELU everywhere, so do we."""
    source = source_model("gelu", False)
    write_official(source, str(tmp_path / "official"), True, "gelu", False)
    _, args, _ = load_hf_folder(str(tmp_path / "official"))
    assert (args.cola_activation, args.gate_activation, args.mlp_gate_act) == ("gelu", True, "gelu")


@pytest.mark.parametrize("hidden_act", ["gelu_new", "gelu_pytorch_tanh", "quick_gelu"])
def test_unrepresentable_activation_names_the_field(hidden_act: str, tmp_path) -> None:
    source = source_model("silu", True, num_layers=1)
    write_official(source, str(tmp_path / "official"), True, hidden_act, True)
    with pytest.raises(ConversionError, match=rf"hidden_act={hidden_act!r} is not supported"):
        import_hf_folder(str(tmp_path / "official"), str(tmp_path / "ckpt"))


def test_colam_tensor_errors_name_their_tensors(tmp_path) -> None:
    source = source_model("silu", True, num_layers=2)
    folder = str(tmp_path / "official")
    write_official(source, folder, True, "silu", True)
    path = os.path.join(folder, "pytorch_model.bin")
    sd = torch.load(path)
    # The last layer's B missing: reported under the name it maps to.
    last = sd.pop("model.layers.1.post_mlp.post_down_proj.cola_b")
    torch.save(sd, path)
    with pytest.raises(ConversionError, match=r"CoLA-M.*missing tensor model.layers.1.mlp.down_proj.cola_b"):
        load_hf_folder(folder)
    # A shifted B in layer 0 (which has no previous layer) is an error that names it.
    sd["model.layers.1.post_mlp.post_down_proj.cola_b"] = last
    sd["model.layers.0.last_layer_post_mlp.post_down_proj.cola_b"] = last.clone()
    torch.save(sd, path)
    with pytest.raises(ConversionError, match=r"model.layers.0.last_layer_post_mlp.post_down_proj.cola_b"):
        load_hf_folder(folder)


def test_colam_zero_biases_are_dropped_and_nonzero_rejected(tmp_path) -> None:
    source = source_model("silu", False, num_layers=2)
    folder = str(tmp_path / "official")
    write_official(source, folder, True, "silu", False)
    path = os.path.join(folder, "pytorch_model.bin")
    sd = torch.load(path)
    sd["model.layers.1.last_layer_post_mlp.post_down_proj.bias"] = torch.zeros(64)
    sd["model.layers.0.self_attn.post_q_proj.bias"] = torch.zeros(64)
    torch.save(sd, path)
    state, _, _ = load_hf_folder(folder)
    assert torch.equal(state["layers.0.mlp.down_proj.weight_b"], source.layers[0].mlp.down_proj.weight_b)
    sd["model.layers.1.last_layer_post_mlp.post_down_proj.bias"] = torch.full((64,), 0.5)
    torch.save(sd, path)
    with pytest.raises(ConversionError, match=r"model.layers.0.mlp.down_proj.bias is a nonzero bias"):
        load_hf_folder(folder)


# ---------------------------------------------------------------------------------------------- gate field
def test_gate_activation_field_is_applied_to_the_gate() -> None:
    model = source_model("gelu", False, num_layers=1)
    mlp = model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = mlp.down_proj(F.gelu(mlp.gate_proj(x)) * mlp.up_proj(x))
        assert torch.equal(mlp(x), expected)


def test_old_files_without_the_field_mean_silu(tmp_path) -> None:
    from megatron_cola.training.checkpointing import check_compatible

    args = ModelArgs.from_size("debug", vocab_size=VOCAB, num_layers=1)
    old = {k: v for k, v in args.to_dict().items() if k != "mlp_gate_act"}
    assert ModelArgs.from_dict(old).mlp_gate_act == "silu"
    flags = argparse.Namespace(zero_stage=0, no_load_optim=False, world_size=1)
    check_compatible({"model_args": old, "args": {}}, flags, args)  # a resume is not refused
    with pytest.raises(CheckpointError, match="mlp_gate_act: checkpoint 'silu', this run 'gelu'"):
        check_compatible({"model_args": old, "args": {}}, flags, args.replace(mlp_gate_act="gelu"))


def test_full_rank_gate_activation_exports_as_hidden_act(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    args = ModelArgs(
        hidden_size=64,
        ffn_hidden_size=160,
        num_attention_heads=4,
        num_layers=2,
        vocab_size=VOCAB,
        full_rank=True,
        mlp_gate_act="gelu",
    )
    model = build_model(args, seed=2).eval()
    hf = build_hf_model(model.state_dict(), args)
    assert isinstance(hf, LlamaForCausalLM) and hf.config.hidden_act == "gelu"
    with torch.no_grad():
        assert (hf.float()(tokens()).logits - model(tokens())).abs().max().item() < 1e-4


def test_official_defaults_and_tied_embeddings(tmp_path) -> None:
    """A config without ``rank`` means ``hidden_size // 4`` (their default); with tied embeddings and no
    ``lm_head.weight`` the head is the embedding, untied by copying."""
    source = source_model("silu", True, num_layers=2)
    with torch.no_grad():
        source.lm_head.weight.copy_(source.embed_tokens.weight)
    folder = str(tmp_path / "official")
    write_official(source, folder, True, "silu", True)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config.pop("rank") == source.args.hidden_size // 4
    config["tie_word_embeddings"] = True
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    path = os.path.join(folder, "pytorch_model.bin")
    sd = torch.load(path)
    del sd["lm_head.weight"]
    torch.save(sd, path)
    state, args, _ = load_hf_folder(folder)
    assert args == source.args
    assert torch.equal(state["lm_head.weight"], source.lm_head.weight)
