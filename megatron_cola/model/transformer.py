"""The LLaMA decoder with CoLA (or dense) linear maps: ``CoLALlama``.

Plain PyTorch, one class for both variants: ``ModelArgs.full_rank`` picks ``nn.Linear`` instead of
``CoLALinear`` for q, k, v, o, gate, up and down. Module and parameter names follow Hugging Face's
LLaMA (``model.layers.N.self_attn.q_proj``, ...) so checkpoints map onto it one to one. Tensor
parallelism is applied from outside (``megatron_cola.parallel.apply_tensor_parallel``); the modules
here therefore read the number of local heads from the tensors they see.
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from megatron_cola.config import ModelArgs
from megatron_cola.model.cola_linear import CoLALinear, get_activation, project_shared_input
from megatron_cola.model.layers import LMHead, RMSNorm, apply_rope, rope_cos_sin
from megatron_cola.model.recompute import run_with_recompute
from megatron_cola.model.sharding import ShardingPlan, load_full_


def make_linear(args: ModelArgs, in_features: int, out_features: int) -> nn.Module:
    """The linear map of a block: ``CoLALinear`` for CoLA models, bias-free ``nn.Linear`` for full rank."""
    if args.full_rank:
        return nn.Linear(in_features, out_features, bias=False)
    return CoLALinear(
        in_features,
        out_features,
        args.cola_rank,
        activation=args.cola_activation,
        keep_a_output=args.recompute == "cola-m",
    )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        d = args.hidden_size
        self.head_dim = args.head_dim
        self.grouped = args.grouped_projections
        self.q_proj = make_linear(args, d, d)
        self.k_proj = make_linear(args, d, d)
        self.v_proj = make_linear(args, d, d)
        self.o_proj = make_linear(args, d, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        if self.grouped:  # one GEMM over [A_q; A_k; A_v] (full rank: fused qkv)
            q, k, v = project_shared_input((self.q_proj, self.k_proj, self.v_proj), x)
        else:
            q = self.q_proj(x)  # (B, T, nh_local * hs)
            k = self.k_proj(x)
            v = self.v_proj(x)
        q, k, v = (t.view(bsz, seq, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(bsz, seq, -1)  # (B, T, nh * hs)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU ``down(act(gate(x)) * up(x))``; ``act`` is ``mlp_gate_act`` (SiLU by default), or identity
    when ``gate_activation`` is off."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        d, f = args.hidden_size, args.ffn_hidden_size
        self.gate_activation = args.gate_activation
        self.gate_act_fn = get_activation(args.mlp_gate_act)
        self.grouped = args.grouped_projections
        self.gate_proj = make_linear(args, d, f)
        self.up_proj = make_linear(args, d, f)
        self.down_proj = make_linear(args, f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grouped:  # one GEMM over [A_gate; A_up] (full rank: fused gate-up)
            gate, up = project_shared_input((self.gate_proj, self.up_proj), x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.gate_activation:  # the one place the SwiGLU gate activation is applied
            gate = self.gate_act_fn(gate)
        return self.down_proj(gate * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.recompute = args.recompute
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlp = MLP(args)

    def _attention_half(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), cos, sin)

    def _mlp_half(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.post_attention_layernorm(h))

    def _block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._mlp_half(self._attention_half(x, cos, sin))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.recompute == "full":
            return run_with_recompute("full", self._block, x, cos, sin)
        # CoLA-M checkpoints each half separately, so the residual entering each half (2 d-sized
        # tensors) plus the seven A outputs (rank-r, served from the checkpoint cache) are all it keeps.
        h = run_with_recompute(self.recompute, self._attention_half, x, cos, sin)
        return run_with_recompute(self.recompute, self._mlp_half, h)


class CoLALlama(nn.Module):
    """A LLaMA decoder whose linear maps are CoLA bottlenecks (or dense, when ``args.full_rank``).

    ``model(tokens)`` returns logits ``(B, T, vocab)``; ``model(tokens, labels)`` returns the mean
    next-token loss (fp32), which the head computes (``LMHead.loss``; tensor parallelism swaps the head
    and its loss for a vocab-parallel twin). The modules are always built on the meta device and the
    weights drawn once, by ``init_weights(seed)``, on the device the constructor is called for (the
    current default device; none under ``with torch.device("meta")``, for inspection: then
    ``to_empty`` and ``init_weights``).

    ``sharding`` is the model's ``ShardingPlan``: empty for a plain model, filled by
    ``apply_tensor_parallel`` with how each parameter is cut from its full tensor.
    """

    def __init__(self, args: ModelArgs, seed: int = 1234) -> None:
        super().__init__()
        args.validate()
        self.args = args
        self.sharding = ShardingPlan()
        device = torch.empty(0).device  # honours an enclosing ``with torch.device(...)``
        with torch.device("meta"):  # no weights drawn here: init_weights draws each once
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
            self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
            self.norm = RMSNorm(args.hidden_size, args.norm_eps)
            self.lm_head = LMHead(args.hidden_size, args.vocab_size, chunked=args.chunked_loss)
        self._rope_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        # load_state_dict(assign=True) replaces Parameter objects: re-mark DeepSpeed's TP flags on them.
        self.register_load_state_dict_post_hook(_remark_after_load)
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights(seed)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(
        self,
        seed: int = 1234,
        *,
        materialize_on: torch.device | None = None,
        after_module: Callable[[nn.Module], None] | None = None,
    ) -> None:
        """(Re)initialise every parameter from ``seed``, independently of device and parallel layout.

        Each parameter draws from its own CPU generator seeded by ``(seed, parameter name)``, on the CPU
        whatever the default or target device, so the weights are the same bits on every device (then
        copied to the parameter's device). For a sharded parameter (tensor parallelism,
        ``self.sharding``) the full tensor is drawn and the shard cut from it (``load_full_``), so any
        layout starts from the same model.

        Module by module: with ``materialize_on``, each module's own (meta) parameters are first
        allocated there; ``after_module(module)`` runs once the module's parameters are drawn (ZeRO-3
        start-up partitions them there, so only one module is ever whole on a rank).
        """
        modules = [
            (mn, m) for mn, m in self.named_modules() if next(m.parameters(recurse=False), None) is not None
        ]
        draws = []  # (elements, draw) of every parameter, in the order they are loaded below
        for module_name, module in modules:
            for pname, param in module.named_parameters(recurse=False):
                name = f"{module_name}.{pname}" if module_name else pname
                shape = self.sharding.full_shape(name, param)
                std = getattr(module, "init_std", self.args.init_std)
                ones = getattr(module, "init_ones", False)  # RMSNorm scales (and their sharded twins)
                kind = "ones" if ones else "zeros" if pname == "bias" else "normal"
                draws.append((math.prod(shape), functools.partial(_draw_full, kind, shape, std, seed, name)))
        fulls = _drawn_in_order(draws)
        for module_name, module in modules:
            if materialize_on is not None:
                module.to_empty(device=materialize_on, recurse=False)
            for pname, _ in module.named_parameters(recurse=False):
                name = f"{module_name}.{pname}" if module_name else pname
                load_full_(self, name, next(fulls))
            if after_module is not None:
                after_module(module)
        self.sharding.mark_parameters(self)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def _rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, device)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_cos_sin(seq_len, self.args.head_dim, self.args.rope_theta, device)
        return self._rope_cache[key]

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states ``(B, T, d)`` (under the bottleneck TP scheme, this rank's
        ``(B, T, d/t)`` slice)."""
        x = self.embed_tokens(tokens)  # (B, T, d)
        cos, sin = self._rope(tokens.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.hidden_states(tokens)  # (B, T, d)
        if labels is None:
            return self.lm_head(hidden)  # (B, T, V)
        return self.lm_head.loss(hidden, labels, loss_mask)


def _remark_after_load(module: CoLALlama, incompatible_keys: object) -> None:
    module.sharding.mark_parameters(module)


def _draw_full(kind: str, shape: tuple[int, ...], std: float, seed: int, name: str) -> torch.Tensor:
    """The full initial tensor of parameter ``name``, on the CPU whatever the default device (a caller's
    ``with torch.device``), from its own CPU generator: the same bits on every device."""
    if kind == "ones":
        return torch.ones(shape, device="cpu")
    if kind == "zeros":
        return torch.zeros(shape, device="cpu")
    gen = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
    return torch.empty(shape, device="cpu").normal_(0.0, std, generator=gen)


#: A model of at least ``_INIT_THREADED_ELEMENTS`` parameters draws on ``_INIT_THREADS`` threads, at most
#: ``_INIT_AHEAD_ELEMENTS`` (fp32: 256 MiB) ahead of the parameter being loaded; a smaller one draws
#: serially (threads would not pay, and dispatch modes, e.g. op counters, are per thread). Each
#: parameter has its own generator, so threads change no bit.
_INIT_THREADS = min(8, os.cpu_count() or 1)
_INIT_AHEAD_ELEMENTS = 2**26
_INIT_THREADED_ELEMENTS = 2**26


def _drawn_in_order(draws: list[tuple[int, Callable[[], torch.Tensor]]]) -> Iterator[torch.Tensor]:
    """The results of ``draws`` (``(elements, draw)``), in order, drawn on a thread pool (CPU RNG is
    one thread per tensor: a 1B model takes ~15 s serially) with a bounded look-ahead."""
    if _INIT_THREADS <= 1 or sum(elements for elements, _ in draws) < _INIT_THREADED_ELEMENTS:
        for _, draw in draws:
            yield draw()
        return
    with ThreadPoolExecutor(_INIT_THREADS, thread_name_prefix="init") as pool:
        pending: deque[Future[torch.Tensor]] = deque()
        ahead, submitted = 0, 0
        for elements, _ in draws:
            while submitted < len(draws) and (
                not pending or ahead + draws[submitted][0] <= _INIT_AHEAD_ELEMENTS
            ):
                pending.append(pool.submit(draws[submitted][1]))
                ahead += draws[submitted][0]
                submitted += 1
            ahead -= elements
            yield pending.popleft().result()


def param_seed(seed: int, name: str) -> int:
    """The generator seed of parameter ``name`` under model seed ``seed``."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def build_model(args: ModelArgs, seed: int = 1234, device: torch.device | str = "cpu") -> CoLALlama:
    """Build ``CoLALlama(args)`` on ``device``, its weights drawn once from ``seed``."""
    with torch.device(device):
        return CoLALlama(args, seed=seed)
