"""Implementation registry for the ops: `impl="auto"` picks the fastest implementation that exists for the backend;
an implementation asked for by name that cannot run here raises, never silently falls back (DESIGN.md conventions).

An entry names a module and function as a string so that heavy modules (Pallas kernels) are imported only when used.
Kernels register here, in `_TABLE`, with the backends they run on and a priority per backend (higher wins for
"auto"). "interpret" lets a Pallas kernel run on CPU in interpret mode when it is asked for by name.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax


@dataclasses.dataclass(frozen=True)
class Impl:
    target: str  # "module.path:function"
    # backend -> priority for "auto"; a backend listed with priority None runs only when asked for by name.
    backends: dict

    def load(self):
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)


# op name -> impl name -> Impl. References ("recurrent", "chunk", "xla") run everywhere.
_TABLE: dict[str, dict[str, Impl]] = {}


def register(op: str, impl: str, target: str, backends: dict) -> None:
    """Add (or replace) an implementation of `op`."""
    _TABLE.setdefault(op, {})[impl] = Impl(target, dict(backends))


def available(op: str, backend: str | None = None) -> list[str]:
    """Names of the implementations of `op` that can run on `backend` (default: the current one)."""
    backend = backend or jax.default_backend()
    return [name for name, im in _TABLE.get(op, {}).items() if backend in im.backends]


def ranked(op: str, backend: str | None = None) -> list[str]:
    """Implementations "auto" may pick on `backend`, best first (for ops that skip an impl per call)."""
    backend = backend or jax.default_backend()
    impls = _TABLE.get(op, {})
    ranked_ = sorted(((im.backends[backend], name) for name, im in impls.items()
                      if im.backends.get(backend) is not None), reverse=True)
    return [name for _, name in ranked_]


def resolve(op: str, impl: str = "auto", backend: str | None = None):
    """The function implementing `op` as `impl` on `backend`; "auto" picks the highest priority there."""
    backend = backend or jax.default_backend()
    impls = _TABLE.get(op)
    if not impls:
        raise KeyError(f"unknown op {op!r}; known: {sorted(_TABLE)}")
    if impl == "auto":
        ranked = [(im.backends[backend], name) for name, im in impls.items()
                  if im.backends.get(backend) is not None]
        if not ranked:
            raise RuntimeError(f"no implementation of {op!r} runs on backend {backend!r}")
        return impls[max(ranked)[1]].load()
    if impl not in impls:
        raise ValueError(f"{op}: unknown impl {impl!r}; choose one of {sorted(impls)} or 'auto'")
    if backend not in impls[impl].backends:
        raise RuntimeError(f"{op}: impl {impl!r} cannot run on backend {backend!r} "
                           f"(it runs on {sorted(impls[impl].backends)}); pick another impl or 'auto'")
    return impls[impl].load()
