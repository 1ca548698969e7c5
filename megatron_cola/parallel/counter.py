"""``CommCounter``: records every collective the tensor-parallel mappings issue.

Each record holds the op kind, the element count and byte size of the *full* tensor involved (the
all-reduce operand, the gathered output, the reduce-scatter input), the group size ``t``, and two byte
counts:

``payload_bytes``  the full tensor's size;
``bytes``          what each rank sends under the standard ring algorithm (NCCL's "bus bandwidth"
                   convention): all-reduce ``2 (t-1)/t · n``, all-gather and reduce-scatter
                   ``(t-1)/t · n`` with ``n`` the full tensor's bytes. This is the number reported
                   everywhere (``total_bytes``, ``megatron_cola.parallel.comm``, docs).

Use it as a context manager; counters nest and every active one sees every op::

    with CommCounter() as counter:
        loss = model(tokens, labels); loss.backward()
    print(counter.summary(tokens=tokens.numel(), layers=args.num_layers))

Collectives re-run by activation recomputation are counted too (they are real traffic).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

_ACTIVE: list[CommCounter] = []


def ring_factor(kind: str, group_size: int) -> float:
    """Bytes each rank sends per byte of the full tensor, ring algorithm."""
    t = group_size
    if kind == "all_reduce":
        return 2.0 * (t - 1) / t
    if kind in ("all_gather", "reduce_scatter"):
        return (t - 1) / t
    raise ValueError(f"unknown collective kind {kind!r}")


@dataclass(frozen=True)
class CommRecord:
    kind: str  # "all_reduce", "all_gather" or "reduce_scatter"
    direction: str  # "forward" or "backward" (recomputed forwards count as "forward")
    numel: int  # elements of the full tensor
    elem_bytes: int
    group_size: int

    @property
    def payload_bytes(self) -> int:
        return self.numel * self.elem_bytes

    @property
    def bytes(self) -> float:
        return self.payload_bytes * ring_factor(self.kind, self.group_size)


class CommCounter:
    """Collects ``CommRecord``s of the collectives issued while it is active."""

    def __init__(self) -> None:
        self.records: list[CommRecord] = []

    def __enter__(self) -> CommCounter:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)

    def reset(self) -> None:
        self.records.clear()

    @property
    def total_bytes(self) -> float:
        """Ring-algorithm bytes sent per rank, all ops."""
        return sum(r.bytes for r in self.records)

    @property
    def total_payload_bytes(self) -> int:
        return sum(r.payload_bytes for r in self.records)

    def bytes_by(self, key: str = "kind") -> dict[str, float]:
        """Ring bytes grouped by ``kind``, ``direction`` or ``"kind/direction"``."""
        out: dict[str, float] = defaultdict(float)
        for r in self.records:
            name = f"{r.kind}/{r.direction}" if key == "kind/direction" else getattr(r, key)
            out[name] += r.bytes
        return dict(out)

    def count_by(self, key: str = "kind") -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.records:
            name = f"{r.kind}/{r.direction}" if key == "kind/direction" else getattr(r, key)
            out[name] += 1
        return dict(out)

    def summary(self, tokens: int, layers: int | None = None) -> str:
        """One line per op kind and direction: calls and bytes per token (per layer when given)."""
        per = tokens * (layers or 1)
        unit = "B/token/layer" if layers else "B/token"
        counts = self.count_by("kind/direction")
        lines = [
            f"{name:<26} {counts[name]:>5} calls {b / per:>12.1f} {unit}"
            for name, b in sorted(self.bytes_by("kind/direction").items())
        ]
        lines.append(f"{'total':<26} {len(self.records):>5} calls {self.total_bytes / per:>12.1f} {unit}")
        return "\n".join(lines)


def record(kind: str, direction: str, numel: int, elem_bytes: int, group_size: int) -> None:
    """Report one collective to every active counter (no-op when none is active)."""
    if not _ACTIVE:
        return
    rec = CommRecord(kind, direction, numel, elem_bytes, group_size)
    for counter in _ACTIVE:
        counter.records.append(rec)


__all__ = ["CommCounter", "CommRecord", "record", "ring_factor"]
