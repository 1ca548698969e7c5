"""Communication of the tensor-parallel schemes: the analytic model (parallel/comm.py) meets the targets
of issue 17 and equals what ``CommCounter`` measures on real TP ranks; ``tools/comm_bytes.py --json``.

The measured checks run in one spawned 2-process gloo job (the debug model, every scheme this build
implements, recompute none / full / cola-m, plain and grouped). A scheme not implemented yet is skipped
with the reason; it runs as soon as ``apply_tensor_parallel`` takes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from megatron_cola.cli.bench_tp import main as bench_tp_main
from megatron_cola.cli.comm_bytes import main as comm_bytes_main
from megatron_cola.config import ModelArgs
from megatron_cola.model.activation_memory import cola_m_kept_per_rank
from megatron_cola.parallel.comm import (
    COLA_TP_SCHEMES,
    block_collectives,
    block_comm_bytes_per_token,
    canonical_scheme,
    outside_blocks_volume,
)
from megatron_cola.parallel.measure import Case, measure_tp

TP = 2
BASE = ModelArgs.from_size("debug", vocab_size=256)


def test_bottleneck_bytes_target_at_paper_rank() -> None:
    """Bottleneck TP moves at most 0.9x dense TP's bytes per block at r = d/4 (1B, 7B; TP 2, 4, 8),
    with fewer collectives than split-rank; split-rank stays at 1 + 1.75 r/d."""
    for size in ("1B", "7B"):
        for grouped in (False, True):
            args = ModelArgs.from_size(size, grouped_projections=grouped)
            assert args.cola_rank * 4 == args.hidden_size
            for t in (2, 4, 8):
                dense = block_comm_bytes_per_token(args, t, "dense")
                bottleneck = block_comm_bytes_per_token(args, t, "bottleneck")
                split = block_comm_bytes_per_token(args, t, "split-rank")
                assert 0.875 <= bottleneck / dense <= 0.9, (size, t, grouped)
                assert split / dense == pytest.approx(1.4375)
            assert block_collectives(args, "bottleneck") == (8 if grouped else 14)
            assert block_collectives(args, "split-rank") == 18 and block_collectives(args, "dense") == 4
    assert canonical_scheme("cola") == "split-rank"
    with pytest.raises(ValueError, match="unknown TP scheme"):
        canonical_scheme("boost")


def test_cola_m_kept_per_rank() -> None:
    args = ModelArgs.from_size("7B")
    d, r = args.hidden_size, args.cola_rank
    assert cola_m_kept_per_rank(args, 4, "split-rank") == 2 * d + 7 * r / 4
    assert cola_m_kept_per_rank(args, 4, "bottleneck") == 2 * d / 4 + 7 * r + 5  # + norms' sums of squares
    assert (
        cola_m_kept_per_rank(args.replace(grouped_projections=True), 4, "bottleneck") == 2 * d / 4 + 7 * r + 2
    )
    # At r = d/4 bottleneck keeps less per rank from t = 2 on: 2d/t + 1.75d < 2d + 1.75d/t.
    for t in (2, 4, 8):
        assert cola_m_kept_per_rank(args, t, "bottleneck") < cola_m_kept_per_rank(args, t, "split-rank")


def test_json_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "comm.json"
    assert comm_bytes_main(["--model-size", "1B", "7B", "--tp", "2", "4", "8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["comm.json"]  # written atomically, nothing left
    keys = {"source", "size", "tp", "scheme", "cola_bytes", "dense_bytes", "ratio", "collectives"}
    assert all(keys <= row.keys() and row["source"] == "analytic" for row in rows)
    combos = {(row["size"], row["tp"], row["scheme"]) for row in rows}
    assert len(rows) == len(combos) == 2 * 3 * len(COLA_TP_SCHEMES)
    for row in rows:
        assert row["ratio"] == pytest.approx(row["cola_bytes"] / row["dense_bytes"])
        assert isinstance(row["collectives"], int) and row["dense_collectives"] == 4
    assert "| 7B | 8 | bottleneck |" in capsys.readouterr().out
    assert (
        comm_bytes_main(["--model-size", "7B", "--tp", "4", "--cola-tp-scheme", "bottleneck", "--json"]) == 0
    )
    (row,) = json.loads(capsys.readouterr().out)  # --json alone: JSON on stdout, table on stderr
    assert row["scheme"] == "bottleneck" and row["ratio"] <= 0.9


CASES = [
    Case(scheme, recompute, grouped)
    for scheme in COLA_TP_SCHEMES
    for recompute in ("none", "full", "cola-m")
    for grouped in (False, True)
] + [Case("dense", recompute) for recompute in ("none", "full")]


@pytest.fixture(scope="module")
def measured() -> dict[Case, dict[str, Any]]:
    return dict(zip(CASES, measure_tp(BASE, TP, CASES), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [*COLA_TP_SCHEMES, "dense"])
def test_measured_equals_analytic(scheme: str, measured: dict[Case, dict[str, Any]]) -> None:
    """CommCounter on a TP=2 gloo run: bytes and collectives per block, the rest of the model, and what
    CoLA-M keeps per rank, all as the analytic model says."""
    cases = [c for c in measured if c.scheme == scheme]
    assert cases
    for case in cases:
        m, args = measured[case], case.model_args(BASE)
        assert m["block_bytes"] == pytest.approx(
            block_comm_bytes_per_token(args, TP, scheme, 4, case.recompute), rel=1e-12
        ), case
        assert m["block_collectives"] == block_collectives(args, scheme, case.recompute), case
        acts, loss = outside_blocks_volume(args, scheme)
        assert m["outside_bytes"] == pytest.approx(acts.ring_bytes(TP, 4) + loss.ring_bytes(TP, 4)), case
        if case.recompute == "cola-m":
            assert m["saved_elements"] == cola_m_kept_per_rank(args, TP, scheme), case


@pytest.mark.slow
def test_bench_tp_times_every_implemented_scheme(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--model-size", "debug", "--nproc", "2", "--recompute", "cola-m", "--rounds", "1"]
    assert bench_tp_main([*argv, "--seq-length", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [tuple(v) for v in result["variants"]] == [(2, s, "cola-m") for s in COLA_TP_SCHEMES]
    assert len(result["seconds_per_step"]) == 1 and all(
        t > 0 for row in result["seconds_per_step"] for t in row
    )
    (row,) = result["rows"]
    assert (row["nproc"], row["recompute"]) == (2, "cola-m") and row["split-rank_s_per_step"] > 0
    assert row["bottleneck_s_per_step"] > 0 and row["bottleneck_over_split_rank"] > 0
