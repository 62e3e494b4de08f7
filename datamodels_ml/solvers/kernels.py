"""Kernels chosen by the rate measured on the machine that runs them.

Where two exact kernels compute the same thing (``solvers.candidates``), which one is faster
depends on the CPU, not on whether a function exists: ``torch._int_mm`` on 0/1 int8 masks was 4x
OpenBLAS's float32 ``syrk`` on an AVX-512 VNNI CPU and 80-200x *slower* on an AVX2-only CPU of the
same machine kind. So every such choice is made here from the rates of a short probe
(``solvers.probe``) on this process's threads: the fastest candidate of each op, ties to the first
listed, unless a setting forces one.

A kernel can be forced (tests, users) with ``op=name`` pairs: the ``DATAMODELS_KERNELS`` variable
(e.g. ``gram=syrk,gemm=torch``) or :func:`use`. Pure torch: no files; the command layer
(``kernel_cache``) keeps the measured rates per machine and installs them with :func:`use`.
Without that, the first solver call in a process probes once.
"""


from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from datamodels_ml.solvers.candidates import OPS, UNITS
from datamodels_ml.solvers import probe

__all__ = ["Kernels", "choose", "parse_forced", "use", "active", "pick", "rate", "ENV", "CONSTANTS"]

# the cost models' constants: name -> default (seconds), used only when not measured
CONSTANTS = {"sparse_s": 1.5e-10, "gather_s": 3e-9, "matvec_s": 1e-9}
ENV = "DATAMODELS_KERNELS"


@dataclass(frozen=True)
class Kernels:
    """The kernels in use: ``picks`` (op -> kernel), the ``rates`` they were picked from
    (``"op.kernel"`` -> rate, plus the cost constants), the ops ``forced`` by a setting, and where
    the rates came from (``source``: measured, cached, or a note)."""

    picks: dict[str, str]
    rates: dict[str, float]
    forced: tuple[str, ...] = ()
    source: str = "measured"
    threads: int = field(default_factory=torch.get_num_threads)

    def constant(self, name: str) -> float:
        value = self.rates.get(name)
        return float(value) if value and value > 0 else CONSTANTS[name]

    def describe(self) -> str:
        """One line: each op's kernel with its rate, and the runners-up in parentheses."""
        parts = []
        for op, names in OPS.items():
            pick = self.picks[op]
            others = [f"{n} {_fmt(self.rates.get(f'{op}.{n}'))}" for n in names if n != pick]
            how = " forced" if op in self.forced else ""
            parts.append(f"{op}={pick}{how} {_fmt(self.rates.get(f'{op}.{pick}'))} {UNITS[op]}"
                         + (f" ({', '.join(others)})" if others else ""))
        return f"kernels ({self.source}, {self.threads} threads): " + "; ".join(parts)

    def params(self) -> dict[str, str]:
        """Flat ``kernel.<op>`` / ``kernel.<op>.rate`` entries (MLflow params)."""
        out = {f"kernel.{op}": self.picks[op] + (" (forced)" if op in self.forced else "") for op in OPS}
        out.update({f"kernel.{op}.rate": _fmt(self.rates.get(f"{op}.{self.picks[op]}")) for op in OPS})
        out["kernel.source"] = self.source
        out["kernel.threads"] = str(self.threads)
        return out


def _fmt(rate: float | None) -> str:
    return "unmeasured" if rate is None or rate != rate else f"{rate:.3g}"


# -- the choice -------------------------------------------------------------------------------------
def parse_forced(text: str | None) -> dict[str, str]:
    """``"gram=syrk,gemm=torch"`` -> ``{"gram": "syrk", "gemm": "torch"}``; empty -> {}. Raises
    ValueError naming the op or kernel that does not exist."""
    out: dict[str, str] = {}
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        op, eq, name = (s.strip() for s in part.partition("="))
        if not eq or op not in OPS:
            raise ValueError(f"unknown kernel setting '{part}': give op=kernel with op one of {', '.join(OPS)}")
        if name not in OPS[op]:
            raise ValueError(f"unknown kernel '{name}' for {op}: one of {', '.join(OPS[op])}")
        out[op] = name
    return out


def choose(rates: dict[str, float], forced: dict[str, str] | None = None, *, source: str = "measured") -> Kernels:
    """The fastest candidate of each op by ``rates`` (ties: the first listed), except the ``forced``."""
    forced = dict(forced or {})
    picks = {}
    for op, names in OPS.items():
        if op in forced:
            picks[op] = forced[op]
            continue
        rated = [(rates.get(f"{op}.{n}", 0.0) or 0.0, -i, n) for i, n in enumerate(names)]
        picks[op] = max(rated)[2] if max(rated)[0] > 0 else names[-1]
    return Kernels(picks=picks, rates=dict(rates), forced=tuple(sorted(forced)), source=source)


_STATE: dict[str, object] = {"base": None, "env": None, "effective": None}


def use(kernels: Kernels | None) -> None:
    """Install ``kernels`` for this process (None: probe again at the next use)."""
    _STATE.update(base=kernels, env=None, effective=None)


def active() -> Kernels:
    """The kernels in use: the installed ones, else a probe now (once per process); either way
    with the ops that ``DATAMODELS_KERNELS`` names forced."""
    base = _STATE["base"]
    if base is None:
        base = choose(probe.probe(), source="measured")
        _STATE.update(base=base, env=None, effective=None)
    env = os.environ.get(ENV, "")
    if _STATE["effective"] is None or _STATE["env"] != env:
        forced = parse_forced(env)
        eff = base if not forced else choose(base.rates, {**{op: base.picks[op] for op in base.forced}, **forced},
                                             source=base.source)
        _STATE.update(env=env, effective=eff)
    return _STATE["effective"]  # type: ignore[return-value]


def pick(op: str) -> str:
    """The kernel in use for ``op``."""
    return active().picks[op]


def rate(op: str, name: str | None = None) -> float:
    """The measured rate of ``op``'s kernel ``name`` (default: the one in use); 0 if unmeasured."""
    k = active()
    return float(k.rates.get(f"{op}.{name or k.picks[op]}", 0.0) or 0.0)
