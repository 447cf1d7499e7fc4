"""Tensors that autograd makes again in the backward instead of holding them from the forward.

Within ``with RemadeInBackward() as remade``, ``remade.remake(t, make, *inputs)`` marks a
tensor the forward computed: wherever autograd saves it for the backward (a saved-tensor hook
recognises it by its address, shape, strides and dtype), it keeps ``make`` instead, and the
backward calls ``make()`` once for all those uses. For tensors that are large and cheap to
make exactly again from what stays alive anyway (a gather of rows, a fake quantization).
As autograd does for what it saves, the inputs ``make`` reads are checked for in-place writes
between the forward and the backward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass(eq=False)
class Remade:
    """One marked tensor: how to make it, the saved uses of it not yet unpacked, and the tensor
    made again, held while uses remain."""

    make: Callable[[], torch.Tensor]
    inputs: tuple[torch.Tensor, ...] = ()
    versions: tuple[int, ...] = ()
    uses: int = 0
    tensor: Optional[torch.Tensor] = field(default=None, repr=False)

    def current(self) -> torch.Tensor:
        """The tensor made again (without gradients); held for the uses still to come."""
        if self.tensor is not None:
            return self.tensor
        if tuple(t._version for t in self.inputs) != self.versions:
            raise RuntimeError("a tensor remade for the backward was modified in place after the forward")
        with torch.no_grad():
            made = self.make()
        if self.uses > 0:
            self.tensor = made
        return made

    def unpack(self) -> torch.Tensor:
        made = self.current()
        self.uses -= 1
        if self.uses <= 0:
            self.tensor = None
        return made


class RemadeInBackward(torch.autograd.graph.saved_tensors_hooks):
    """The saved-tensor hooks of the module docstring. The marked tensors stay alive until the
    ``with`` ends, so that no other tensor takes their address meanwhile."""

    def __init__(self):
        self._marked: dict[tuple, Remade] = {}
        self._alive: list[torch.Tensor] = []
        super().__init__(functools.partial(_pack, self._marked), _unpack)

    def __enter__(self) -> "RemadeInBackward":
        super().__enter__()
        return self

    def __exit__(self, *exc):
        self._alive.clear()
        self._marked.clear()
        return super().__exit__(*exc)

    def remake(self, t: torch.Tensor, make: Callable[[], torch.Tensor], *inputs: torch.Tensor) -> Remade:
        """Mark ``t``: the backward gets ``make()`` (which reads ``inputs``) where it saved ``t``."""
        entry = Remade(make, inputs, tuple(i._version for i in inputs))
        self._marked[_address(t)] = entry
        self._alive.append(t)
        return entry


def _address(t: torch.Tensor) -> tuple:
    """What tells a saved tensor apart from the others alive: where it starts, how it is laid out."""
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def _pack(marked: dict[tuple, Remade], t: torch.Tensor):
    entry = marked.get(_address(t))
    if entry is None:
        return t
    entry.uses += 1
    return entry


def _unpack(saved):
    return saved.unpack() if isinstance(saved, Remade) else saved
