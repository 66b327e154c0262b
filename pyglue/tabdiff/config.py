"""TabDiff hyper-parameters: the official defaults (``TabDiffConfig.paper()``) and a CPU-sized default."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class TabDiffConfig:
    """Every knob of the model, its training and its sampler; JSON-serialisable.

    The default is CPU-sized (a 256-wide trunk instead of 1024; EMA per optimiser step instead of
    per epoch, since a few hundred epochs of per-epoch EMA at 0.997 would keep most of the random
    initialisation). :meth:`paper` returns the official configuration (8000 epochs, for GPUs).
    """

    # network (official: d_token 4, 2 layers, 1 head, factor 32, dim_t 1024)
    d_token: int = 4
    num_layers: int = 2
    n_heads: int = 1
    ffn_factor: int = 32
    dim_t: int = 256
    sigma_data: float = 1.0
    # schedules
    learnable_schedules: bool = True
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho_init: float = 7.0
    rho_offset: float = 5.0
    eps_max: float = 1e-3
    eps_min: float = 1e-5
    k_init: float = -6.0
    k_offset: float = 1.0
    # training
    epochs: int = 300
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_factor: float = 0.9
    lr_patience: int = 50
    ema_decay: float = 0.997
    ema_every: str = "step"            # "epoch" (official) or "step"
    closs_weight: str = "anneal"       # numerical loss weight 1 - epoch/epochs ("fixed": 1)
    checkpoint_every: int = 25         # epochs between checkpoints when a checkpoint dir is given
    # classifier-free guidance model (trained by fit(target=...)): official dim_t 128, no MLP
    guidance_dim_t: int = 128
    guidance_epochs: Optional[int] = None   # None: the main model's epochs
    # sampler
    steps: int = 50
    sample_batch_size: int = 10_000
    stochastic: bool = True
    heun: bool = True
    churn: float = 1.0
    guidance: float = 0.6
    # data
    max_categories: int = 1000         # a categorical column with more levels is rejected (ID-like)
    round_integers: bool = True
    clip: bool = True

    @classmethod
    def paper(cls, **overrides) -> "TabDiffConfig":
        """The official configuration (TabDiff ``tabdiff_configs.toml``): 8000 epochs, dim_t 1024,
        EMA once per epoch. Meant for a GPU: ~10.6M parameters for Adult, days on 2 CPU cores."""
        base = dict(dim_t=1024, epochs=8000, ema_every="epoch")
        return cls(**{**base, **overrides})

    def __post_init__(self):
        if self.ema_every not in ("epoch", "step"):
            raise ValueError(f"ema_every: expected 'epoch' or 'step', got {self.ema_every!r}")
        if self.closs_weight not in ("anneal", "fixed"):
            raise ValueError(f"closs_weight: expected 'anneal' or 'fixed', got {self.closs_weight!r}")
        for name in ("epochs", "batch_size", "steps", "sample_batch_size", "dim_t", "d_token", "num_layers",
                     "n_heads", "ffn_factor", "guidance_dim_t", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.steps < 2:
            raise ValueError(f"steps: expected >= 2 sampler steps, got {self.steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected 0 <= ema_decay < 1, got {self.ema_decay}")

    def network_kwargs(self, guidance_model: bool = False) -> dict:
        return dict(d_token=self.d_token, num_layers=self.num_layers, n_heads=self.n_heads,
                    ffn_factor=self.ffn_factor, dim_t=self.guidance_dim_t if guidance_model else self.dim_t,
                    use_mlp=not guidance_model, sigma_data=self.sigma_data)

    def schedule_kwargs(self) -> dict:
        return dict(sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho_init=self.rho_init,
                    rho_offset=self.rho_offset, eps_max=self.eps_max, eps_min=self.eps_min,
                    k_init=self.k_init, k_offset=self.k_offset)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TabDiffConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        return cls(**data)
