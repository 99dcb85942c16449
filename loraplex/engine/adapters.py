"""What the engine needs from whoever owns the adapters (a fixed set here; the registry later).

Two lifetimes: a request holds its adapter from submission to its last token (`acquire` /
`release`: the adapter cannot be unloaded under it), and a *running* sequence holds a GPU
slot (`activate` / `deactivate`: a slot in use is never evicted). `activate` answers None
while the adapter is not in a GPU slot yet; the scheduler then leaves that request waiting
and goes on with others. `between_steps` is where pages move (engine thread, never mid-step);
it returns the handles whose requests must end now (a forced unload, a page-in that failed),
each with the finish reason and message to give them.

The prefix cache shares KV blocks only between sequences of one adapter *version*
(`version`: a number >= 1, new for every registration, so a replaced adapter's blocks are
never reused); `retired_versions` names the versions gone since it was last called (their
cached blocks are freed).
"""

from __future__ import annotations

from typing import Any, Protocol

from .request import FinishReason


class UnknownAdapterError(KeyError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"adapter {self.name!r} is not registered"


class AdapterProvider(Protocol):
    num_slots: int

    def has(self, name: str) -> bool: ...
    def acquire(self, name: str) -> Any: ...          # raises UnknownAdapterError
    def release(self, handle: Any) -> None: ...
    def activate(self, handle: Any) -> int | None: ...  # GPU slot, or None while paging in
    def deactivate(self, handle: Any) -> None: ...
    def between_steps(self) -> list[tuple[Any, FinishReason, str]]: ...
    def version(self, handle: Any) -> int: ...
    def retired_versions(self) -> list[int]: ...


class StaticAdapters:
    """A fixed set of adapters, each in its own GPU slot from start to end."""

    def __init__(self, model, adapters: dict[str, Any], slots: int | None = None, max_rank: int = 64):
        """`adapters` maps names to objects with `.modules` (see `CausalLM.set_lora_slot`)."""
        self.num_slots = max(1, slots or len(adapters))
        if len(adapters) > self.num_slots:
            raise ValueError(f"{len(adapters)} adapters do not fit in {self.num_slots} GPU slots")
        model.allocate_lora(self.num_slots, max_rank)
        self._slots: dict[str, int] = {}
        for slot, (name, adapter) in enumerate(adapters.items()):
            model.set_lora_slot(slot, adapter.modules)
            self._slots[name] = slot
        self.refcount = {name: 0 for name in adapters}

    def names(self) -> list[str]:
        return list(self._slots)

    def has(self, name: str) -> bool:
        return name in self._slots

    def acquire(self, name: str) -> str:
        if name not in self._slots:
            raise UnknownAdapterError(name)
        self.refcount[name] += 1
        return name

    def release(self, handle: str) -> None:
        self.refcount[handle] -= 1

    def activate(self, handle: str) -> int:
        return self._slots[handle]

    def deactivate(self, handle: str) -> None:
        pass

    def between_steps(self) -> list[tuple[Any, FinishReason, str]]:
        return []

    def version(self, handle: str) -> int:
        return self._slots[handle] + 1

    def retired_versions(self) -> list[int]:
        return []
