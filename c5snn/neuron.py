"""The LIF neuron, defined once for every Python path: snntorch's `Leaky` semantics (DESIGN §2).

    U[0] = X[0]                                          membranes start at zero
    U[t] = beta * U[t-1] + X[t] - S[t-1] * threshold     reset by subtraction
    S[t] = H(U[t] - threshold)
    dS/dU = 1 / (slope * |U - threshold| + 1)^2          snntorch.surrogate.fast_sigmoid(slope)
    dL/dU[t] = dL/dS[t] * dS/dU[t] + beta * dL/dU[t+1]   the reset term detached, as snntorch

With `reset="zero"` instead: U[t] = beta * (1 - S[t-1]) * U[t-1] + X[t], carried back by
beta * (1 - S[t]). `beta` is a grid parameter, each configuration's own; the rest is here. The
torch recurrence (`c5snn.lif`), the Triton kernel (`c5snn.kernels.triton`), the snntorch
reference (`c5snn.reference`) and the study file's check (`model.surrogate`) read `NEURON`; the
compiled CPU operators hold the same definition in C++ (`c5snn/kernels/cpu/neuron.h`), and
tests/test_kernels.py checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

RESETS = ("subtract", "zero")  # snntorch's reset_mechanism values c5snn implements


@dataclass(frozen=True)
class Neuron:
    threshold: float = 1.0
    reset: str = "subtract"
    surrogate: str = "fast_sigmoid"
    slope: float = 25.0

    def __post_init__(self) -> None:
        if self.reset not in RESETS:
            raise ValueError(f"reset must be one of {RESETS}, got {self.reset!r}")


NEURON = Neuron()
