"""Model tests: parameter counts, CoLALinear formula, causality, init statistics, config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_cola.config import SIZES, ModelArgs
from megatron_cola.model import CoLALinear, CoLALlama, build_model

# The table of sizes in docs/model.md, in millions.
EXPECTED_PARAMS = {
    "60M": (58.1, 42.8),
    "130M": (134.1, 94.0),
    "350M": (368.0, 185.2),
    "1B": (1339.1, 609.3),
    "7B": (6738.4, 2820.9),
}


def tiny(**kw) -> ModelArgs:
    return ModelArgs.from_size("debug", vocab_size=256, num_layers=2, **kw)


@pytest.mark.parametrize("size", sorted(EXPECTED_PARAMS))
@pytest.mark.parametrize("full_rank", [True, False])
def test_param_counts_match_paper_table(size: str, full_rank: bool) -> None:
    args = ModelArgs.from_size(size, full_rank=full_rank)
    with torch.device("meta"):
        model = CoLALlama(args)
    counted = model.num_params()
    assert counted == args.num_params()
    expected = EXPECTED_PARAMS[size][0 if full_rank else 1]
    assert abs(counted / 1e6 - expected) < 0.1, (size, full_rank, counted)


def test_cola_linear_equals_formula() -> None:
    torch.manual_seed(0)
    layer = CoLALinear(48, 40, 8)
    x = torch.randn(3, 5, 48)
    expected = F.silu(x @ layer.weight_a.T) @ layer.weight_b.T
    torch.testing.assert_close(layer(x), expected)
    named = dict(layer.named_parameters())
    assert named["weight_a"].shape == (8, 48) and named["weight_b"].shape == (40, 8)


def test_cola_linear_other_activation_and_bias() -> None:
    layer = CoLALinear(16, 24, 4, activation="gelu", bias=True)
    with torch.no_grad():
        layer.bias.fill_(0.5)
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), F.gelu(x @ layer.weight_a.T) @ layer.weight_b.T + 0.5)


def test_cola_init_statistics() -> None:
    d_in, d_out, r = 512, 1376, 128
    layer = CoLALinear(d_in, d_out, r)
    product = layer.weight_b @ layer.weight_a  # (out, in)
    target = (d_in + d_out) ** -0.5
    assert abs(product.std().item() / target - 1) < 0.10


def test_model_init_statistics() -> None:
    args = ModelArgs.from_size("60M", num_layers=1)
    model = build_model(args, seed=0)
    q = model.layers[0].self_attn.q_proj
    assert abs((q.weight_b @ q.weight_a).std().item() * (2 * 512) ** 0.5 - 1) < 0.10
    assert abs(model.embed_tokens.weight.std().item() / 0.02 - 1) < 0.05
    assert abs(model.lm_head.weight.std().item() / 0.02 - 1) < 0.05
    assert torch.all(model.norm.weight == 1)


@pytest.mark.parametrize("full_rank", [True, False])
def test_forward_shapes_and_loss(full_rank: bool) -> None:
    args = tiny(full_rank=full_rank)
    model = CoLALlama(args)
    tokens = torch.randint(0, 256, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, 256)
    loss = model(tokens, tokens)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 256), tokens.reshape(-1)))
    # Fresh init predicts roughly uniformly.
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5


@pytest.mark.parametrize("full_rank", [True, False])
def test_causality(full_rank: bool) -> None:
    model = CoLALlama(tiny(full_rank=full_rank)).eval()
    tokens = torch.randint(0, 256, (1, 16))
    changed = tokens.clone()
    t = 9
    changed[0, t] = (tokens[0, t] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_same_seed_same_model_any_construction() -> None:
    args = tiny()
    a = CoLALlama(args, seed=7)
    b = build_model(args, seed=7)  # meta device, then materialised
    c = CoLALlama(args, seed=8)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name


def test_init_draws_on_cpu_under_a_foreign_default_device() -> None:
    """The CPU proxy of ``build_model(args, device="cuda")``: ``init_weights`` runs inside the caller's
    ``with torch.device(...)``; its draws must not follow that default device, and the weights must be
    the bits of a plain CPU init."""
    args = tiny()
    reference = build_model(args, seed=3)
    model = CoLALlama(args, seed=5)
    with torch.device("meta"):
        model.init_weights(3)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.device.type == "cpu", name
        assert torch.equal(p, q), name


def test_init_threads_change_no_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The draws run on a thread pool with a bounded look-ahead; one thread gives the same bits."""
    import megatron_cola.model.transformer as transformer

    args = tiny()
    monkeypatch.setattr(transformer, "_INIT_THREADS", 4)
    monkeypatch.setattr(transformer, "_INIT_THREADED_ELEMENTS", 0)  # threads even for a tiny model
    monkeypatch.setattr(transformer, "_INIT_AHEAD_ELEMENTS", 5000)  # a small window: waits on the pool
    threaded = build_model(args, seed=3)
    monkeypatch.setattr(transformer, "_INIT_THREADS", 1)
    serial = build_model(args, seed=3)
    for (name, p), (_, q) in zip(threaded.named_parameters(), serial.named_parameters()):
        assert torch.equal(p, q), name


def test_gate_activation_rule() -> None:
    assert ModelArgs.from_size("60M").gate_activation
    assert ModelArgs.from_size("130M").gate_activation
    for size in ("350M", "1B", "7B"):
        assert not ModelArgs.from_size(size).gate_activation
        assert ModelArgs.from_size(size, full_rank=True).gate_activation


def test_gate_activation_changes_mlp() -> None:
    args = tiny()
    model = CoLALlama(args, seed=1)
    mlp = model.layers[0].mlp
    x = torch.randn(2, 3, args.hidden_size)
    torch.testing.assert_close(mlp(x), mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    mlp.gate_activation = False
    torch.testing.assert_close(mlp(x), mlp.down_proj(mlp.gate_proj(x) * mlp.up_proj(x)))


def test_full_rank_uses_dense_linears() -> None:
    model = CoLALlama(tiny(full_rank=True))
    assert isinstance(model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert not any(isinstance(m, CoLALinear) for m in model.modules())


def test_7b_builds_on_meta_quickly() -> None:
    with torch.device("meta"):
        model = CoLALlama(ModelArgs.from_size("7B"))
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"cola_rank": 0}, "cola_rank"),
        ({"cola_rank": 256}, "cola_rank"),  # not < min(d_in, d_out) = 256
        ({"num_attention_heads": 3}, "num_attention_heads"),
        ({"cola_activation": "swish2"}, "cola_activation"),
        ({"recompute": "sometimes"}, "recompute"),
        ({"hidden_size": -4}, "hidden_size"),
    ],
)
def test_bad_config_names_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelArgs.from_size("debug", **overrides)


def test_unknown_size_lists_allowed() -> None:
    with pytest.raises(ValueError, match="allowed") as e:
        ModelArgs.from_size("13B")
    for size in SIZES:
        assert size in str(e.value)


def test_cola_m_rejected_for_full_rank() -> None:
    with pytest.raises(ValueError, match="cola-m"):
        ModelArgs.from_size("debug", full_rank=True, recompute="cola-m")


def test_unknown_override_field() -> None:
    with pytest.raises(ValueError, match="unknown ModelArgs field"):
        ModelArgs.from_size("debug", hiden_size=12)
