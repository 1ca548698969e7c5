"""``ColaForCausalLM``: Megatron-CoLA's CoLA LLaMA decoder as a Hugging Face ``transformers`` model.

The one implementation of the exported model. Megatron-CoLA's tests import it from
``megatron_cola.convert.modeling_cola``; ``tools/convert_to_hf.py`` copies this file (with
``configuration_cola.py``) into every exported CoLA folder, where ``transformers`` loads it as remote
code. It therefore imports only ``torch`` and ``transformers``, and its one local import is relative.

Parameter names follow ``LlamaForCausalLM`` (``model.layers.N.self_attn.q_proj``, ...); a CoLA map
``B σ(A x)`` holds ``weight_a`` ``(rank, in)`` and ``weight_b`` ``(out, rank)``, exactly the tensors of
Megatron-CoLA's ``CoLALinear``. Generation uses the ``transformers`` cache API: keys and values go
through ``Cache.update`` (a ``DynamicCache`` unless the caller passes another), RoPE and the causal
mask are offset by the number of tokens already cached.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_cola import ColaConfig

try:  # transformers >= 5: these initialisers leave weights that from_pretrained already loaded alone
    from transformers import initialization as init
except ImportError:  # older transformers only initialises missing weights anyway
    from torch.nn import init

# The name under which model outputs carry the cache (``past_key_values`` before transformers 5).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "tanh": torch.tanh,
    "identity": lambda t: t,
}


class ColaLinear(nn.Module):
    """``y = B σ(A x)``: ``weight_a`` ``(rank, in)`` projects onto the bottleneck, ``weight_b``
    ``(out, rank)`` projects out of it."""

    def __init__(self, in_features: int, out_features: int, rank: int, activation: str = "silu") -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.activation = activation
        self.act_fn = _ACTIVATIONS[activation]
        self.weight_a = nn.Parameter(torch.empty(rank, in_features))
        self.weight_b = nn.Parameter(torch.empty(out_features, rank))

    @property
    def init_std(self) -> float:
        """Entry std of A and B such that ``B @ A`` has entry variance ``1 / (in + out)``."""
        return self.rank ** (-0.25) * (self.in_features + self.out_features) ** (-0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_fn(F.linear(x, self.weight_a)), self.weight_b)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, activation={self.activation}"
        )


def _linear(config: ColaConfig, in_features: int, out_features: int) -> nn.Module:
    if config.cola_rank is None:
        return nn.Linear(in_features, out_features, bias=False)
    return ColaLinear(in_features, out_features, config.cola_rank, config.cola_activation)


class ColaRMSNorm(nn.Module):
    """RMSNorm computed in fp32, scaled by a learned weight in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(B, 1, T, head_dim)`` for ``position_ids`` ``(B, T)`` (rotate-half layout)."""
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (hd/2,)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, nh, T, hs)``: ``x cos + rotate_half(x) sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal_mask(
    attention_mask: torch.Tensor | None, past_len: int, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """The attention mask for ``scaled_dot_product_attention``, or ``None`` where none is needed.

    ``attention_mask`` is the usual 2D ``(B, L)`` padding mask (1 = token, 0 = padding) over the cached
    and new tokens (``None`` when there is no padding), or an already prepared 4D mask (returned as it
    is). The result is boolean ``(B or 1, 1, q_len, kv_len)``: query ``i`` (cache position
    ``past_len + i``) sees key ``j`` when ``j <= past_len + i`` and ``j`` is not padding. ``None`` means
    "use ``is_causal``" when nothing is cached, or "see every key" for one new token over an exactly
    filled cache.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    if attention_mask is None and kv_len == past_len + q_len and (past_len == 0 or q_len == 1):
        return None
    q_pos = torch.arange(q_len, device=device) + past_len  # (T,)
    k_pos = torch.arange(kv_len, device=device)  # (S,)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        keep = attention_mask[:, :kv_len].bool()  # (B, <=S)
        if keep.shape[1] < kv_len:  # a pre-allocated (static) cache: the other slots are in the future
            keep = F.pad(keep, (0, kv_len - keep.shape[1]), value=False)
        mask = mask & keep[:, None, None, :]  # (B, 1, T, S)
    # A query with nothing to see (a left-padding position) would give NaN; let it see everything,
    # its output is never used.
    return mask | ~mask.any(dim=-1, keepdim=True)


class _MaskFactory:
    """Builds the attention mask of one forward pass once, when the first layer knows the key length
    (after its cache update: a pre-allocated cache returns all its slots)."""

    def __init__(self, attention_mask: torch.Tensor | None, past_len: int, q_len: int) -> None:
        if attention_mask is not None and attention_mask.dim() == 2 and bool(attention_mask.all()):
            attention_mask = None  # no padding
        self.attention_mask = attention_mask
        self.past_len = past_len
        self.q_len = q_len
        self._built: dict[int, torch.Tensor | None] = {}

    def __call__(self, kv_len: int, device: torch.device) -> torch.Tensor | None:
        if kv_len not in self._built:
            self._built[kv_len] = causal_mask(self.attention_mask, self.past_len, self.q_len, kv_len, device)
        return self._built[kv_len]


class ColaAttention(nn.Module):
    def __init__(self, config: ColaConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.q_proj = _linear(config, d, d)
        self.k_proj = _linear(config, d, d)
        self.v_proj = _linear(config, d, d)
        self.o_proj = _linear(config, d, d)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        masks: _MaskFactory,
        cache: Cache | None,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        shape = (bsz, seq, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs): cached and new keys/values
        mask = masks(k.shape[2], x.device)
        is_causal = mask is None and seq > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(bsz, seq, -1))  # (B, T, d)


class ColaMLP(nn.Module):
    def __init__(self, config: ColaConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_activation = config.gate_activation
        self.gate_act_fn = _ACTIVATIONS[getattr(config, "mlp_gate_act", "silu")]
        self.gate_proj = _linear(config, d, f)
        self.up_proj = _linear(config, d, f)
        self.down_proj = _linear(config, f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.gate_activation:
            gate = self.gate_act_fn(gate)
        return self.down_proj(gate * self.up_proj(x))


class ColaDecoderLayer(nn.Module):
    def __init__(self, config: ColaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = ColaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ColaAttention(config, layer_idx)
        self.post_attention_layernorm = ColaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ColaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        masks: _MaskFactory,
        cache: Cache | None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, masks, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class ColaPreTrainedModel(PreTrainedModel):
    config_class = ColaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["ColaDecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Megatron-CoLA's initialisation: CoLA A and B at ``ColaLinear.init_std``, everything else
        ``N(0, initializer_range)``, norms at one."""
        std = self.config.initializer_range
        if isinstance(module, ColaLinear):
            init.normal_(module.weight_a, mean=0.0, std=module.init_std)
            init.normal_(module.weight_b, mean=0.0, std=module.init_std)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ColaRMSNorm):
            init.ones_(module.weight)


class ColaModel(ColaPreTrainedModel):
    """The decoder stack: embeddings, blocks, final norm. Returns the normed hidden states."""

    def __init__(self, config: ColaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ColaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = ColaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache is None:
            cache = past_key_values  # the argument's name before transformers 5
        if use_cache is None:
            use_cache = self.config.use_cache
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        if use_cache and cache is None:
            try:
                cache = DynamicCache(config=self.config)
            except TypeError:  # transformers < 4.56
                cache = DynamicCache()
        if not use_cache:
            cache = None

        bsz, seq = x.shape[:2]
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(seq, device=x.device) + past_len)[None]  # (1, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        masks = _MaskFactory(attention_mask, past_len, seq)

        hidden_states: tuple[torch.Tensor, ...] | None = (x,) if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, cos, sin, masks, cache)
            if hidden_states is not None:
                hidden_states += (x,)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states = hidden_states[:-1] + (x,)
        out = BaseModelOutputWithPast(
            last_hidden_state=x, hidden_states=hidden_states, **{_CACHE_FIELD: cache}
        )
        return out if return_dict is not False else out.to_tuple()


class ColaForCausalLM(ColaPreTrainedModel, GenerationMixin):
    """``ColaModel`` plus the (untied) LM head; ``generate()`` comes from ``GenerationMixin``."""

    def __init__(self, config: ColaConfig) -> None:
        super().__init__(config)
        self.model = ColaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits ``(B, T, vocab)`` (only the last ``logits_to_keep`` positions when it is positive) and,
        with ``labels``, the mean next-token cross-entropy (labels are shifted here; -100 is ignored)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        h = out.last_hidden_state  # (B, T, d)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)  # (B, T', vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)},
        )
        return result if return_dict is not False else result.to_tuple()


__all__ = ["ColaForCausalLM", "ColaModel", "ColaPreTrainedModel", "ColaLinear"]
