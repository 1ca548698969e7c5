"""Generation throughput and peak memory of one model variant (the worker of ``tools/bench_inference.py``).

``run_variant`` builds a randomly initialised ``ColaForCausalLM`` (CoLA or dense maps) or ``transformers``'
``LlamaForCausalLM`` at a named size's shapes and times ``generate()`` (greedy, KV cache). Only shapes
matter, so the weights are random.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any

VARIANTS = ("cola", "full", "llama")
DTYPES = ("fp32", "bf16")  # the --dtype choices benchmarked (names from hf_format.DTYPES)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_now_mib() -> float:
    """Current resident set size (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _maxrss_mib()


def _build_model(
    variant: str, model_size: str, max_positions: int, device: Any, dtype: Any
) -> tuple[Any, Any]:
    """``(model, generator)``: ``variant`` at ``model_size``'s shapes on ``device``, random weights."""
    import torch

    from megatron_cola.config import ModelArgs
    from megatron_cola.convert.configuration_cola import ColaConfig
    from megatron_cola.convert.modeling_cola import ColaForCausalLM

    args = ModelArgs.from_size(model_size, full_rank=variant != "cola")
    fields = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        max_position_embeddings=max_positions,
    )
    with torch.device("meta"):
        if variant == "llama":
            from transformers import LlamaConfig, LlamaForCausalLM

            model = LlamaForCausalLM(LlamaConfig(**fields, tie_word_embeddings=False))
        else:
            config = ColaConfig(
                **fields,
                cola_rank=args.cola_rank if variant == "cola" else None,
                gate_activation=args.gate_activation,
            )
            model = ColaForCausalLM(config)
    model.to_empty(device=device)
    model = model.to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for buf_name, buf in model.named_buffers():  # LLaMA's RoPE tables were left empty on the meta device
            if "inv_freq" in buf_name:
                rope = getattr(model.config, "rope_parameters", None) or {}
                base = rope.get("rope_theta", getattr(model.config, "rope_theta", 10000.0))
                hd = model.config.hidden_size // model.config.num_attention_heads
                buf.copy_(1.0 / (base ** (torch.arange(0, hd, 2, device=device).float() / hd)))
    return model, gen


def _time_generate(model: Any, prompt: Any, new_tokens: int, repeats: int) -> tuple[float, list[float]]:
    """Prefill milliseconds and the seconds of each of ``repeats`` ``generate()`` calls."""
    import torch

    cuda = prompt.device.type == "cuda"
    mask = torch.ones_like(prompt)
    kwargs = dict(
        attention_mask=mask,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(prompt.device)

    with torch.no_grad():
        model.generate(prompt, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        sync()
        t = time.perf_counter()
        model(prompt, attention_mask=mask, use_cache=True, logits_to_keep=1)  # as generate() does
        sync()
        prefill_ms = (time.perf_counter() - t) * 1e3
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            out = model.generate(prompt, **kwargs)
            sync()
            times.append(time.perf_counter() - t)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return prefill_ms, times


def run_variant(
    variant: str,
    model_size: str,
    batch_size: int,
    prompt_length: int,
    new_tokens: int,
    dtype: str = "fp32",
    device: str = "cpu",
    repeats: int = 3,
) -> dict:
    """Build ``variant`` (one of ``VARIANTS``), time ``generate()`` and measure memory.

    Meant to run in a fresh process per variant, so the peak memory is this variant's alone.
    """
    import torch

    from megatron_cola.convert.hf_format import DTYPES as HF_DTYPES

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    rss_before = _rss_now_mib()
    model, gen = _build_model(variant, model_size, prompt_length + new_tokens, dev, HF_DTYPES[dtype])
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch_size, prompt_length), device=dev, generator=gen)
    prefill_ms, times = _time_generate(model, prompt, new_tokens, repeats)
    elapsed = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else _maxrss_mib() - rss_before
    return {
        "variant": variant,
        "params": params,
        "weights_mib": weights_mib,
        "generate_tok_s": batch_size * new_tokens / elapsed,
        "prefill_ms": prefill_ms,
        "peak_mib": peak,
        "peak_kind": "cuda max_memory_allocated" if cuda else "peak RSS rise",
    }
