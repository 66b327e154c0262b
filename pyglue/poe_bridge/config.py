"""PoE-Bridge configuration (defaults = the official release's ``run_poe-bridge.sh``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..ops import _checks

SELECTIONS = ("resample", "argmax")
WEIGHTS = ("principled", "parity")


@dataclass
class PoEBridgeConfig:
    """Settings of :class:`~diffkern.poe_bridge.PoEBridgeDecoder`.

    Attributes:
        num_particles: K, particles drafted and verified in parallel per window.
        weight: w in ``p_PoE ∝ p_D^w p_AR^(1-w)`` (0: plain speculative decoding toward the AR model).
        max_lookahead: M, masked positions one DLM forward drafts.
        window: W, tokens the AR model verifies per particle per step (elastic windows).
        temperature, high_temperature, anneal, n_low_temp: particle temperatures. With ``anneal``:
            ``T[:n_low-1] = T`` and ``T[n_low-1:] = linspace(T, T_hi, K - n_low + 1)``; without:
            ``n_low`` particles at T, the rest at T_hi.
        top_p: nucleus of the draft, taken on the *tempered* DLM distribution softmax(l_D / T_k), so
            q is exactly the distribution each particle draws from (the official code takes it on
            the untempered logits; see :mod:`diffkern.ops.poe`).
        selection: ``"resample"`` (draw the winner ∝ importance weight) or ``"argmax"``.
        weights: ``"principled"`` (log p_AR,T*(x) - log p_PoE(x) summed over emitted tokens) or
            ``"parity"`` (the official raw-logit energy, averaged over emitted tokens).
        max_new_tokens: generation budget per sequence.
        target_temperature: T* of the importance target for ``"principled"`` weights
            (None: ``temperature``).
        vocab_size: slice both models' logits to this many leading entries (None: they must match).
    """

    num_particles: int = 4
    weight: float = 0.3
    max_lookahead: int = 256
    window: int = 32
    temperature: float = 0.2
    high_temperature: float = 0.7
    anneal: bool = True
    n_low_temp: int = 1
    top_p: float = 0.95
    selection: str = "resample"
    weights: str = "principled"
    max_new_tokens: int = 256
    target_temperature: Optional[float] = None
    vocab_size: Optional[int] = None

    def __post_init__(self):
        def need(cond, name, msg):
            if not cond:
                raise ValueError(f"PoEBridgeConfig: {name}={getattr(self, name)!r} {msg}")
        for name in ("num_particles", "max_lookahead", "window", "max_new_tokens", "n_low_temp"):
            _checks.integer(name, getattr(self, name), 1)
        need(0.0 <= float(self.weight) <= 1.0, "weight", "must be in [0, 1]")
        need(float(self.temperature) > 0, "temperature", "must be > 0")
        need(float(self.high_temperature) > 0, "high_temperature", "must be > 0")
        need(0.0 < float(self.top_p) <= 1.0, "top_p", "must be in (0, 1]")
        need(self.n_low_temp <= self.num_particles, "n_low_temp", f"must be <= num_particles={self.num_particles}")
        need(self.selection in SELECTIONS, "selection", f"must be one of {SELECTIONS}")
        need(self.weights in WEIGHTS, "weights", f"must be one of {WEIGHTS}")
        need(self.target_temperature is None or float(self.target_temperature) > 0, "target_temperature",
             "must be None or > 0")
        need(self.vocab_size is None or (isinstance(self.vocab_size, int) and self.vocab_size >= 1),
             "vocab_size", "must be None or an int >= 1")

    def replace(self, **changes) -> "PoEBridgeConfig":
        return dataclasses.replace(self, **changes)

    def particle_temperatures(self) -> torch.Tensor:
        """``[K]`` float32 particle temperatures."""
        K, n, T, Th = self.num_particles, self.n_low_temp, float(self.temperature), float(self.high_temperature)
        temps = torch.full((K,), Th, dtype=torch.float32)
        if self.anneal:
            temps[: n - 1] = T
            temps[n - 1:] = torch.linspace(T, Th, K - n + 1, dtype=torch.float32)
        else:
            temps[:n] = T
        return temps
