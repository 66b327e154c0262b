"""TabDiff's denoiser, as the official code builds it (``UniModMLP`` + ``Precond``).

tokens -> Transformer encoder -> flattened MLP trunk (+ time embedding) -> Transformer decoder
-> reconstructor: one scalar per numerical column, raw logits ``[K_j + 1]`` per categorical
column (MASK last). EDM preconditioning wraps it per numerical column (sigma_data = 1 in the
official configs); the network is conditioned on ``c_noise = log(sigma_ref(t)) / 4`` with
``sigma_ref`` the fixed rho = 7 EDM schedule at the row's t, not on the learned per-column sigma.

The forward pass is split into named stages (``tokenize``, ``encode``, ``trunk``, ``decode``,
``reconstruct``) so a sampler can hoist the time embedding out of the batch (it depends on t
only) and a forecaster can skip the trunk.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EDM_RHO, EDM_SIGMA_MIN, EDM_SIGMA_MAX = 7.0, 0.002, 80.0


def edm_sigma(t: Tensor) -> Tensor:
    """The fixed rho = 7 EDM schedule at t in [0, 1]: the network's conditioning level."""
    lo, hi = EDM_SIGMA_MIN ** (1 / EDM_RHO), EDM_SIGMA_MAX ** (1 / EDM_RHO)
    return (lo + t * (hi - lo)).pow(EDM_RHO)


def c_noise(t: Tensor) -> Tensor:
    """The network's noise-level input ``log(sigma_ref(t)) / 4`` at t in [0, 1]."""
    return torch.log(edm_sigma(t)) / 4


class Tokenizer(nn.Module):
    """Numerical token ``w_i x_i + b_i``; categorical token ``onehot(x_j) @ E_j + b_j``.

    Categorical input is either int64 indices ``[B, m]`` (a gather: exact for hard one-hots, used
    by the sampler) or a float one-hot ``[B, L]`` (a matmul: straight-through gradients of the
    soft corruption reach the masking schedule in training). The official tokenizer also builds a
    [CLS] token that the model drops; it is not built here (identical outputs).
    """

    def __init__(self, n_num: int, num_classes: Sequence[int], d_token: int):
        super().__init__()
        widths = [int(k) + 1 for k in num_classes]
        self.n_num, self.n_cat = n_num, len(widths)
        self.weight = nn.Parameter(torch.empty(n_num, d_token))
        self.bias = nn.Parameter(torch.empty(n_num + len(widths), d_token))
        self.cat_weight = nn.Parameter(torch.empty(sum(widths), d_token))
        self.register_buffer("offsets", torch.tensor([0] + widths[:-1], dtype=torch.int64).cumsum(0),
                             persistent=False)
        self.register_buffer("segment", torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(
            widths, dtype=torch.int64)) if widths else torch.zeros(0, dtype=torch.int64), persistent=False)
        for p in (self.weight, self.bias, self.cat_weight):   # as the official (nn.Linear-style init)
            if p.numel():
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def forward(self, x_num: Tensor, x_cat: Tensor) -> Tensor:
        tokens = [self.weight[None] * x_num[:, :, None]]
        if self.n_cat:
            if x_cat.dtype == torch.int64:
                tokens.append(self.cat_weight[x_cat + self.offsets])
            else:
                parts = x_cat[:, :, None] * self.cat_weight[None]                     # [B, L, d]
                cat = parts.new_zeros(x_cat.shape[0], self.n_cat, parts.shape[-1])
                tokens.append(cat.index_add(1, self.segment, parts))
        return torch.cat(tokens, dim=1) + self.bias[None]


class Attention(nn.Module):
    """Multi-head self-attention of the official Transformer (no output projection for 1 head)."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"n_heads: d_token={d} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.W_q, self.W_k, self.W_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.W_out = nn.Linear(d, d) if n_heads > 1 else None
        for lin in (self.W_q, self.W_k, self.W_v) + ((self.W_out,) if self.W_out is not None else ()):
            nn.init.zeros_(lin.bias)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        return x.reshape(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._heads(self.W_q(x)), self._heads(self.W_k(x)), self._heads(self.W_v(x))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(x.shape)
        return self.W_out(out) if self.W_out is not None else out


class TransformerLayer(nn.Module):
    def __init__(self, d: int, n_heads: int, ffn_factor: int, first: bool):
        super().__init__()
        self.attention = Attention(d, n_heads)
        self.linear0, self.linear1 = nn.Linear(d, d * ffn_factor), nn.Linear(d * ffn_factor, d)
        self.norm0 = None if first else nn.LayerNorm(d)      # pre-LN, none before the first attention
        self.norm1 = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(x if self.norm0 is None else self.norm0(x))
        return x + self.linear1(F.relu(self.linear0(self.norm1(x))))


class Transformer(nn.Sequential):
    def __init__(self, num_layers: int, d: int, n_heads: int, ffn_factor: int):
        super().__init__(*[TransformerLayer(d, n_heads, ffn_factor, first=i == 0) for i in range(num_layers)])


class TimeEmbedding(nn.Module):
    """Sinusoid of c_noise (sin/cos order swapped, as the official code) -> Linear-SiLU-Linear."""

    def __init__(self, dim_t: int, max_positions: float = 10_000.0):
        super().__init__()
        self.dim_t, self.max_positions = dim_t, max_positions
        self.mlp = nn.Sequential(nn.Linear(dim_t, dim_t), nn.SiLU(), nn.Linear(dim_t, dim_t))

    def forward(self, c_noise: Tensor) -> Tensor:
        half = self.dim_t // 2
        freqs = (1.0 / self.max_positions) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
        angles = c_noise.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class Trunk(nn.Module):
    """The flattened-token MLP: ``Linear(d_in, dim_t) + time embedding``, then the MLP back to d_in."""

    def __init__(self, d_in: int, dim_t: int, use_mlp: bool):
        super().__init__()
        self.proj = nn.Linear(d_in, dim_t)
        self.mlp = nn.Sequential(
            nn.Linear(dim_t, dim_t * 2), nn.SiLU(), nn.Linear(dim_t * 2, dim_t * 2), nn.SiLU(),
            nn.Linear(dim_t * 2, dim_t), nn.SiLU(), nn.Linear(dim_t, d_in)) if use_mlp else nn.Linear(dim_t, d_in)

    def forward(self, flat: Tensor, time_emb: Tensor) -> Tensor:
        return self.mlp(self.proj(flat) + time_emb)


class Reconstructor(nn.Module):
    def __init__(self, n_num: int, num_classes: Sequence[int], d_token: int):
        super().__init__()
        self.n_num = n_num
        self.weight = nn.Parameter(torch.empty(n_num, d_token))
        if n_num:
            nn.init.xavier_uniform_(self.weight, gain=1 / math.sqrt(2))
        self.heads = nn.ModuleList(nn.Linear(d_token, int(k) + 1) for k in num_classes)
        for head in self.heads:
            nn.init.xavier_uniform_(head.weight, gain=1 / math.sqrt(2))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        out_num = (h[:, :self.n_num] * self.weight[None]).sum(-1)
        logits = [head(h[:, self.n_num + j]) for j, head in enumerate(self.heads)]
        return out_num, torch.cat(logits, dim=-1) if logits else h.new_zeros(h.shape[0], 0)


class Denoiser(nn.Module):
    """EDM-preconditioned TabDiff network: ``D = c_skip x + c_out F(c_in x, x_cat, c_noise)``."""

    def __init__(self, n_num: int, num_classes: Sequence[int], *, d_token: int = 4, num_layers: int = 2,
                 n_heads: int = 1, ffn_factor: int = 32, dim_t: int = 1024, use_mlp: bool = True,
                 sigma_data: float = 1.0):
        super().__init__()
        self.n_num, self.num_classes, self.sigma_data = n_num, [int(k) for k in num_classes], sigma_data
        n_tokens = n_num + len(self.num_classes)
        self.tokenizer = Tokenizer(n_num, self.num_classes, d_token)
        self.encoder = Transformer(num_layers, d_token, n_heads, ffn_factor)
        self.time_embedding = TimeEmbedding(dim_t)
        self.trunk = Trunk(n_tokens * d_token, dim_t, use_mlp)
        self.decoder = Transformer(num_layers, d_token, n_heads, ffn_factor)
        self.reconstructor = Reconstructor(n_num, self.num_classes, d_token)

    def time_emb(self, t: Tensor) -> Tensor:
        """``[len(t), dim_t]`` time embedding of rows at times t (one row of t: the whole batch)."""
        return self.time_embedding(c_noise(t.float()))

    def hidden(self, x_num: Tensor, x_cat: Tensor, sigma: Tensor, time_emb: Tensor) -> Tensor:
        """The trunk's output tokens ``[B, n_tokens, d]`` (what the decoder reads)."""
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        tokens = self.encoder(self.tokenizer(c_in * x_num, x_cat))
        return self.trunk(tokens.flatten(1), time_emb).view(tokens.shape)

    def head(self, hidden: Tensor, x_num: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder + reconstructor + preconditioning: ``(D [B, n], raw logits [B, L])``."""
        F_x, logits = self.reconstructor(self.decoder(hidden))
        s2 = sigma ** 2 + self.sigma_data ** 2
        denoised = (self.sigma_data ** 2 / s2) * x_num + (sigma * self.sigma_data / s2.sqrt()) * F_x
        return denoised, logits

    def forward(self, x_num: Tensor, x_cat: Tensor, t: Tensor, sigma: Tensor,
                time_emb: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """x_num ``[B, n]`` at per-column levels ``sigma [B, n]`` (or ``[n]``); x_cat int64 ``[B, m]``
        or float one-hot ``[B, L]``; ``t [B]`` or ``[1]`` (shared). ``time_emb`` overrides t."""
        x_num, sigma = x_num.float(), sigma.float()
        if time_emb is None:
            time_emb = self.time_emb(t.reshape(-1))
        return self.head(self.hidden(x_num, x_cat, sigma, time_emb), x_num, sigma)
