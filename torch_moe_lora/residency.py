"""Which adapters are registered, which occupy a slot, and which slot to give up next.

A patched model has ``L`` slots per table but may serve more adapters: every registered adapter is
kept in host memory (pinned where the tables are on a CUDA device, so a swap-in is a plain host-to-device copy),
and an adapter takes a slot when a mapping or a request names it. A slot whose adapter nothing uses
is given up least recently used first. This module only keeps the books; ``patch.MoELoRAModel``
writes the tables and says what is in use.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .adapters import AdapterLoRA, BlockLoRA, LinearLoRA


def host_copy(
    adapter: AdapterLoRA, linear_dtype: dict[str, torch.dtype], block_dtype: dict[str, torch.dtype], pin: bool
) -> AdapterLoRA:
    """``adapter`` with every matrix in the dtype of the table it goes into, in host memory, pinned
    with ``pin`` (for tables on a CUDA device: writing it into a slot then copies without a staging
    buffer)."""

    def host(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = t.to("cpu", dtype).contiguous()
        return t.pin_memory() if pin else t

    linears = {
        name: LinearLoRA(host(lora.a, linear_dtype[name]), host(lora.b, linear_dtype[name]), lora.scale)
        for name, lora in adapter.linears.items()
    }
    experts = {}
    for name, lora in adapter.experts.items():
        pairs = {
            role: None if pair is None else tuple(host(t, block_dtype[name]) for t in pair)
            for role, pair in zip(BlockLoRA._fields[:4], lora[:4])
        }
        experts[name] = lora._replace(**pairs)
    return adapter._replace(linears=linears, experts=experts)


class AdapterStore:
    """The registered adapters (host copies), the slot of each resident one, and the order of use.

    Args:
        num_slots: ``L``.
    """

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.host: dict[str, AdapterLoRA] = {}
        self.slot_of: dict[str, int] = {}
        self._last_use: dict[str, int] = {}
        self._clock = 0

    def __contains__(self, name: str) -> bool:
        return name in self.host

    @property
    def resident(self) -> list[str]:
        """Names of the adapters in a slot, in slot order."""
        return sorted(self.slot_of, key=self.slot_of.get)

    @property
    def names(self) -> list[str]:
        """Names of every registered adapter, in the order they were registered."""
        return list(self.host)

    def free_slots(self) -> list[int]:
        taken = set(self.slot_of.values())
        return [slot for slot in range(self.num_slots) if slot not in taken]

    def touch(self, names: Iterable[str | None]) -> None:
        """Marks ``names`` as used now (the least recently used resident adapter is evicted first)."""
        for name in names:
            if name is not None:
                self._clock += 1
                self._last_use[name] = self._clock

    def least_recent(self, names: Iterable[str]) -> str | None:
        """The least recently used of ``names``, or None if there are none."""
        return min(names, key=lambda name: self._last_use.get(name, 0), default=None)

    def add(self, name: str, adapter: AdapterLoRA) -> None:
        self.host[name] = adapter
        self.touch([name])

    def remove(self, name: str) -> int | None:
        """Forgets ``name``; returns the slot it held, or None."""
        del self.host[name]
        self._last_use.pop(name, None)
        return self.slot_of.pop(name, None)

    def evictable(self, keep: Iterable[str]) -> list[str]:
        """The resident adapters not in ``keep``, whose slots can be refilled: least recently used first."""
        keep = set(keep)
        return sorted((n for n in self.slot_of if n not in keep), key=lambda n: self._last_use.get(n, 0))

    def place(self, names: Iterable[str], in_use: set[str]) -> list[tuple[str, int]]:
        """Finds a slot for every adapter of ``names`` that has none: a free one, else the slot of the
        least recently used resident adapter that is neither in ``in_use`` nor in ``names`` (it stays
        registered). Updates the books and returns the ``(name, slot)`` pairs to write, in order.

        Raises:
            ValueError: not enough slots can be freed (nothing is changed then).
        """
        names = list(names)
        wanted = list(dict.fromkeys(n for n in names if n not in self.slot_of))
        if not wanted:
            return []
        keep = set(names) | in_use
        free = self.free_slots()
        evictable = self.evictable(keep)
        if len(wanted) > len(free) + len(evictable):
            raise ValueError(
                f"adapters {wanted} need {len(wanted)} slot{'s' if len(wanted) > 1 else ''} but only "
                f"{len(free) + len(evictable)} of the "
                f"{self.num_slots} can be freed: {sorted(set(self.slot_of) & keep)} are in use (by the mapping, an "
                "enclosing adapters() block or a running request); wait for those, or patch with a larger max_loras"
            )
        placed = []
        for name in wanted:
            if free:
                slot = free.pop(0)
            else:
                slot = self.slot_of.pop(evictable.pop(0))
            self.slot_of[name] = slot
            placed.append((name, slot))
        return placed
