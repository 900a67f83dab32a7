"""What a loss contributes to the benchmark: its cases, inputs, implementations and byte counts.

A loss's module (``fastkd/benchmark/<loss>.py``) defines ``BENCH``, an instance of a
:class:`LossBench` subclass. The harness never looks inside a case: it asks the loss for inputs,
for the implementations to time, and for the fewest bytes the loss must move.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

# "bwd" is not timed on its own: fastkd's one-pass ops consume their saved gradient in place, so a
# graph cannot be re-run backward (retain_graph) to time the backward alone. It is derived as
# time(fwdbwd) - time(fwd), i.e. what training costs on top of inference.
MODES = ("fwd", "fwdbwd", "bwd")
TIMED_MODES = ("fwd", "fwdbwd")

# Peer implementations a loss may offer next to fastkd.
PEERS = ("eager", "compile", "compile-max-autotune", "liger")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1024x1000"`` -> ``(1024, 1000)``; every size a positive integer."""
    parts = text.lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise ValueError(
            f"a shape is positive sizes joined by 'x' with at least two dims (e.g. 1024x1000), "
            f"got {text!r}"
        )
    return shape


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


@dataclass(frozen=True)
class Case:
    """One input configuration of one loss: shape, dtype name (a key of ``DTYPES``), variant."""

    loss: str
    shape: tuple[int, ...]
    dtype: str
    variant: str

    @property
    def key(self) -> str:
        return f"{self.loss}/{shape_str(self.shape)}/{self.dtype}/{self.variant}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Inputs:
    """Positional arguments of every implementation of a case, and the tensors that receive a
    gradient (their ``.grad`` is cleared, untimed, before each timed call)."""

    args: tuple
    differentiable: tuple[torch.Tensor, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(a) for a in self.args)

    def clone(self) -> Inputs:
        """A copy in fresh memory (for buffer rotation), same values and requires_grad flags."""
        mapping: dict[int, torch.Tensor] = {}

        def copy(x):
            if isinstance(x, torch.Tensor):
                y = x.detach().clone().requires_grad_(x.requires_grad)
                mapping[id(x)] = y
                return y
            if isinstance(x, (list, tuple)):
                return type(x)(copy(v) for v in x)
            return x

        args = tuple(copy(a) for a in self.args)
        return Inputs(args, tuple(mapping[id(t)] for t in self.differentiable))


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


@dataclass(frozen=True)
class Impl:
    """One implementation of a case. ``build()`` returns the function to time, called as
    ``fn(*inputs.args)`` and returning the scalar loss; it runs once per (case, mode) before the
    warm-up, so ``torch.compile`` peers start from a clean compile cache there."""

    name: str
    build: Callable[[], Callable[..., torch.Tensor]]
    backend: str | None = None


@dataclass(frozen=True)
class Skip:
    """An implementation that cannot run a case, and why."""

    name: str
    reason: str


@dataclass
class Selection:
    """What the user asked to run (the command line's choices)."""

    device: str = "cpu"
    dtypes: Sequence[str] = ("fp32", "bf16")
    modes: Sequence[str] = ("fwd", "fwdbwd")
    backends: Sequence[str] = ()
    peers: Sequence[str] = ("eager", "compile", "liger")
    shapes: Sequence[tuple[int, ...]] | None = None
    variants: Sequence[str] | None = None
    quick: bool = False
    seed: int = 0


class LossBench(abc.ABC):
    """One loss's part of the benchmark. Subclasses set the class attributes and implement the
    four methods; :meth:`cases` has a default built from the attributes."""

    name: str
    # variant name -> one-line description (shown by ``python -m fastkd bench --list``)
    variants: dict[str, str]
    default_variants: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    quick_shapes: tuple[tuple[int, ...], ...]

    def cases(self, sel: Selection) -> list[Case]:
        """Every (shape, dtype, variant). Requested variants select this loss's own; the others
        belong to other losses (the command line rejects a variant that no loss defines), and
        requesting only others' is an error here."""
        shapes = sel.shapes or (self.quick_shapes if sel.quick else self.shapes)
        variants = sel.variants or self.default_variants
        own = [v for v in variants if v in self.variants]
        if not own:
            raise ValueError(
                f"{self.name}: unknown variant(s) {', '.join(variants)}; "
                f"choose from {', '.join(self.variants)}"
            )
        variants = own
        return [
            Case(self.name, tuple(shape), dtype, variant)
            for shape in shapes
            for dtype in sel.dtypes
            for variant in variants
        ]

    @abc.abstractmethod
    def make_inputs(self, case: Case, device: str, requires_grad: bool, seed: int) -> Inputs:
        """Random inputs of the case; the student requires grad when `requires_grad`."""

    @abc.abstractmethod
    def impls(self, case: Case, sel: Selection) -> list[Impl | Skip]:
        """fastkd (backend auto plus ``sel.backends``) and the peers in ``sel.peers``."""

    @abc.abstractmethod
    def min_bytes(self, case: Case, mode: str) -> int:
        """The fewest bytes `mode` must move: each input read once, each output written once."""

    @abc.abstractmethod
    def reference(self, case: Case, inputs: Inputs) -> float | None:
        """The loss in float32 or better, to check every implementation's value; None to skip."""


def fastkd_impls(
    sel: Selection,
    choose: Callable[[str], str],
    make: Callable[[str], Callable[..., torch.Tensor]],
) -> list[Impl | Skip]:
    """fastkd with backend "auto", then with each backend the selection asks for: ``choose(b)``
    resolves a requested backend (raising ValueError with the reason when it cannot run),
    ``make(backend)`` returns the loss function on it. A backend that is what "auto" chose is
    skipped as already measured."""
    out: list[Impl | Skip] = []
    auto = None
    for requested in ("auto", *[b for b in sel.backends if b != "auto"]):
        name = "fastkd" if requested == "auto" else f"fastkd-{requested}"
        try:
            backend = choose(requested)
        except ValueError as e:
            out.append(Skip(name, str(e)))
            continue
        if requested == "auto":
            auto = backend
        elif backend == auto:
            out.append(Skip(name, f"measured as fastkd: backend auto chose {backend}"))
            continue
        out.append(Impl(name, constant(make(backend)), backend))
    return out


def peer_impls(
    loss: str,
    sel: Selection,
    eager: Callable[..., torch.Tensor],
    liger: Callable[[], Impl | Skip],
) -> list[Impl | Skip]:
    """The peers the selection asks for: `eager`, ``torch.compile`` of it (default mode and
    max-autotune) and Liger-Kernel's form from ``liger()``."""
    out: list[Impl | Skip] = []
    for peer in sel.peers:
        if peer == "eager":
            out.append(Impl("eager", constant(eager)))
        elif peer == "compile":
            out.append(Impl("compile", compiled(eager, None)))
        elif peer == "compile-max-autotune":
            # Without CUDA graphs: their static input buffers would add a copy of every
            # (rotated) input to each call, which is not the loss's cost.
            out.append(Impl(peer, compiled(eager, "max-autotune-no-cudagraphs")))
        elif peer == "liger":
            out.append(liger())
        else:
            raise ValueError(f"{loss}: unknown peer {peer!r}")
    return out


def compiled(fn: Callable[..., torch.Tensor], mode: str | None):
    """An ``Impl.build`` compiling `fn` in `mode`."""

    def build():
        # A clean cache per (case, mode): the compiled graph is specialised to this case alone,
        # and no earlier case counts towards dynamo's recompile limit.
        torch._dynamo.reset()
        return torch.compile(fn, mode=mode, dynamic=False)

    return build


def constant(fn: Callable[..., torch.Tensor]):
    """An ``Impl.build`` returning `fn` itself."""
    return lambda: fn
