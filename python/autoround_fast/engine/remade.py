"""Tensors that autograd makes again in the backward instead of holding them from the forward.

Within ``with RemadeInBackward() as remade``, ``remade.remake(t, make, *inputs)`` marks a
tensor the forward computed: wherever autograd saves it or a view of it for the backward (a
saved-tensor hook recognises its storage), it keeps ``make`` instead, and the backward calls
``make()`` once for all those uses, each taking its view of the result. For tensors that are
large and cheap to make exactly again from what stays alive anyway (a gather of rows, a fake
quantization). As autograd does for what it saves, the inputs ``make`` reads are checked for
in-place writes between the forward and the backward; a view saved after an in-place write
to the marked tensor is held as it is, not made again. :meth:`RemadeInBackward.active` is the
innermost such ``with`` of the thread, for code that marks what a caller's context saves.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

_ACTIVE = threading.local()  # .stack: this thread's RemadeInBackward contexts, innermost last


@dataclass(eq=False)
class Remade:
    """One marked tensor: how to make it, its layout, the saved uses of it not yet unpacked,
    and the tensor made again, held while uses remain."""

    make: Callable[[], torch.Tensor]
    layout: tuple  # the marked tensor's shape, strides, dtype and device, which make() must give again
    version: int   # the marked tensor's own, at marking: a saved view of it must still have it
    inputs: tuple[torch.Tensor, ...] = ()
    versions: tuple[int, ...] = ()
    uses: int = 0
    tensor: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def saved(self) -> bool:
        """Whether autograd saved the marked tensor, or a view of it, for a use still to come."""
        return self.uses > 0

    def current(self) -> torch.Tensor:
        """The tensor made again (without gradients); held for the uses still to come."""
        if self.tensor is not None:
            return self.tensor
        if tuple(t._version for t in self.inputs) != self.versions:
            raise RuntimeError("a tensor remade for the backward was modified in place after the forward")
        with torch.no_grad():
            made = self.make()
        if _layout(made) != self.layout:
            raise RuntimeError(f"a tensor remade for the backward came back as {_layout(made)}, "
                               f"not as the forward's {self.layout}")
        if self.uses > 0:
            self.tensor = made
        return made

    def unpack(self) -> torch.Tensor:
        made = self.current()
        self.uses -= 1
        if self.uses <= 0:
            self.tensor = None
        return made


@dataclass(eq=False)
class _View:
    """A saved use of a marked tensor: the view autograd saved (shape, strides, elements from
    the marked tensor's first)."""

    of: Remade
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int

    def unpack(self) -> torch.Tensor:
        made = self.of.unpack()
        return made.as_strided(self.shape, self.stride, made.storage_offset() + self.offset)


class RemadeInBackward(torch.autograd.graph.saved_tensors_hooks):
    """The saved-tensor hooks of the module docstring. The marked tensors stay alive until the
    ``with`` ends, so that no other tensor takes their storage meanwhile."""

    def __init__(self):
        self._marked: dict[tuple, Remade] = {}
        self._alive: list[torch.Tensor] = []
        super().__init__(functools.partial(_pack, self._marked), _unpack)

    def __enter__(self) -> "RemadeInBackward":
        super().__enter__()
        _stack().append(self)
        return self

    def __exit__(self, *exc):
        _stack().remove(self)
        self._alive.clear()
        self._marked.clear()
        return super().__exit__(*exc)

    @staticmethod
    def active() -> Optional["RemadeInBackward"]:
        """The innermost context entered on this thread and not left, or None."""
        stack = _stack()
        return stack[-1] if stack else None

    def remake(self, t: torch.Tensor, make: Callable[[], torch.Tensor], *inputs: torch.Tensor) -> Remade:
        """Mark ``t``, which must own its storage whole: the backward gets ``make()`` (which reads
        ``inputs``) where it saved ``t`` or a view of it."""
        if not owns_storage(t):
            raise ValueError("remake: the marked tensor must be the whole of its storage, not a view into one")
        entry = Remade(make, _layout(t), t._version, inputs, tuple(i._version for i in inputs))
        if t.numel() > 0:  # empty tensors share no storage to tell them apart by
            key = _key(t)
            if key in self._marked:
                raise ValueError("remake: this tensor is marked already")
            self._marked[key] = entry
            self._alive.append(t)
        return entry


def remade_with_grad() -> contextlib.AbstractContextManager:
    """A RemadeInBackward where gradients are on (a backward may come), else a null context."""
    return RemadeInBackward() if torch.is_grad_enabled() else contextlib.nullcontext()


def _stack() -> list:
    if not hasattr(_ACTIVE, "stack"):
        _ACTIVE.stack = []
    return _ACTIVE.stack


def owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` is the whole of its storage (what :meth:`RemadeInBackward.remake` marks)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _layout(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


def _key(t: torch.Tensor) -> tuple:
    """What tells a saved tensor's storage apart from the others alive."""
    return (t.untyped_storage().data_ptr(), t.dtype, t.device)


def _pack(marked: dict[tuple, Remade], t: torch.Tensor):
    """An empty view counts as a use as well: it would hold the whole storage too."""
    if t.layout != torch.strided:
        return t
    entry = marked.get(_key(t))
    if entry is None or t._version != entry.version:  # not marked, or written since: held
        return t
    entry.uses += 1
    return _View(entry, t.shape, t.stride(), t.storage_offset())


def _unpack(saved):
    return saved.unpack() if isinstance(saved, _View) else saved
