"""Where the wall time goes: exclusive seconds per named section, with JAX's compiles apart.

A `Timer` accumulates wall seconds under names ("data", "eval", "checkpoint", ...). Sections
nest, and each second is counted once, in the innermost open section. Inside
`timer.compiles()`, JAX's own compile events (`jax.monitoring`) are moved out of the section
they happened in into "trace" (tracing and lowering) and "compile" (XLA compilation or a
persistent-cache load), so "eval" means evaluating, not compiling the evaluation.
`scope(prefix)` files the sections opened under it as "prefix/name". What no section claims
is the caller's remainder (`summary(total)` reports it as `rest`).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator, Mapping

import jax

# jax._src.dispatch's event names (stable across 0.4 - 0.10): tracing to a jaxpr and lowering
# to StableHLO ("trace", paid on every new jit even when the persistent cache hits), and the
# XLA compile or persistent-cache load ("compile").
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "trace",
    "/jax/core/compile/backend_compile_duration": "compile",
}
# Persistent compilation cache lookups, counted while `compiles()` is open.
CACHE_EVENTS = {
    "/jax/compilation_cache/cache_hits": "cache_hits",
    "/jax/compilation_cache/cache_misses": "cache_misses",
}


class Timer:
    """Exclusive wall seconds by section name (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.Counter()
        self.events: dict[str, int] = collections.Counter()  # CACHE_EVENTS' names
        self._open: list[str] = []  # innermost last
        self._prefix = ""

    def name(self, section: str) -> str:
        return f"{self._prefix}{section}"

    @contextlib.contextmanager
    def scope(self, prefix: str) -> Iterator[None]:
        outer, self._prefix = self._prefix, f"{self._prefix}{prefix}/"
        try:
            yield
        finally:
            self._prefix = outer

    @contextlib.contextmanager
    def section(self, section: str) -> Iterator[None]:
        """Times the block under `section`; time spent in inner sections is theirs only."""
        name = self.name(section)
        self._open.append(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self._open.pop()
            self.seconds[name] += elapsed
            self.calls[name] += 1
            if self._open:
                self.seconds[self._open[-1]] -= elapsed

    def add(self, section: str, seconds: float) -> None:
        """Files `seconds` spent inside the innermost open section under `section` instead."""
        self.seconds[self.name(section)] += seconds
        self.calls[self.name(section)] += 1
        if self._open:
            self.seconds[self._open[-1]] -= seconds

    def merge(self, seconds: Mapping[str, float], prefix: str = "") -> None:
        """Adds another timer's seconds (e.g. a sub-run's profile) under `prefix`."""
        for name, value in seconds.items():
            self.seconds[f"{prefix}{name}"] += float(value)

    @contextlib.contextmanager
    def compiles(self) -> Iterator[Timer]:
        """Files JAX compile events under "trace" / "compile" (of the current scope)."""

        def listener(event: str, duration: float, **kwargs) -> None:
            del kwargs
            if event in COMPILE_EVENTS:
                self.add(COMPILE_EVENTS[event], duration)

        def counter(event: str, **kwargs) -> None:
            del kwargs
            if event in CACHE_EVENTS:
                self.events[CACHE_EVENTS[event]] += 1

        jax.monitoring.register_event_duration_secs_listener(listener)
        jax.monitoring.register_event_listener(counter)
        try:
            yield self
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
            jax.monitoring.unregister_event_listener(counter)

    def summary(
        self, total: float | None = None, rest: str = "rest", prefix: str = ""
    ) -> dict[str, float]:
        """{section: seconds} rounded (those under `prefix`, without it), plus `rest` = total -
        those sections when total is given."""
        mine = {
            name.removeprefix(prefix): value
            for name, value in self.seconds.items()
            if name.startswith(prefix)
        }
        out = {name: round(value, 2) for name, value in sorted(mine.items())}
        if total is not None:
            out[rest] = round(total - sum(mine.values()), 2)
            out["total"] = round(total, 2)
        return out
