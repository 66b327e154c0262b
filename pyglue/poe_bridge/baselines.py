"""Baselines sharing the PoE-Bridge adapters, stats and operators.

* :func:`ar_generate` - AR-only sampling (KV cache, temperature + top-p through ``poe_draft``).
* :func:`dlm_generate` - standard masked-diffusion decoding: the whole answer canvas starts
  masked; every step runs one DLM forward, samples every masked position (``poe_draft``) and
  unmasks the ``tokens_per_step`` most confident ones (highest log-probability of the sampled
  token). Once an EOS is unmasked, every later position becomes EOS, and decoding stops when no
  mask is left before the first EOS.
* :func:`speculative_generate` - naive speculative decoding: PoE-Bridge with weight 0 and one
  particle (the DLM drafts, the AR model verifies, standard rejection sampling).
* :func:`is_only_generate` - importance sampling alone (the "prior approach", EDLM-style, applied
  window by window): PoE-Bridge with weight 1 and ``top_p=1``, so the PoE target *is* the proposal
  q, every draft is accepted, and the K particles are reweighted by ``log p_AR - log q``.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from .. import ops
from ..ops import _checks
from .adapters import as_draft, as_target
from .config import PoEBridgeConfig
from .decoder import GenerationOutput, GenerationStats, PoEBridgeDecoder, _progress, eos_set, prompts_from


def _check_common(max_new_tokens, temperature, top_p):
    _checks.integer("max_new_tokens", max_new_tokens, 1)
    if not float(temperature) > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature!r}")
    if not 0 < float(top_p) <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p!r}")


@torch.no_grad()
def ar_generate(target_model, input_ids, attention_mask=None, *, max_new_tokens: int = 256,
                temperature: float = 0.2, top_p: float = 0.95, seed: int = 0, eos_token_id=None,
                progress: bool = False) -> GenerationOutput:
    """Sample from the AR model alone (one AR forward per token, batched, KV cache)."""
    _check_common(max_new_tokens, temperature, top_p)
    target = as_target(target_model)
    prompts = prompts_from(input_ids, attention_mask)
    eos = eos_set(eos_token_id, target.model)
    t0 = time.perf_counter()
    B, dev = len(prompts), target.device
    P = max(map(len, prompts))
    ids = torch.zeros(B, P, dtype=torch.long, device=dev)
    am = torch.zeros(B, P, dtype=torch.long, device=dev)
    pos = torch.zeros(B, P, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):  # left padding
        ids[b, P - len(p):] = torch.tensor(p, device=dev)
        am[b, P - len(p):] = 1
        pos[b, P - len(p):] = torch.arange(len(p), device=dev)
    temps = torch.tensor([float(temperature)], device=dev)
    cache = target.new_cache()
    gen = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    stats = GenerationStats(num_sequences=B)
    lengths = torch.tensor([len(p) for p in prompts], device=dev)
    bar = _progress(progress, max_new_tokens, "ar")
    for step in range(max_new_tokens):
        logits, cache = target.forward(ids, am, pos, cache)
        stats.count_ar((~done).nonzero()[:, 0].tolist())
        tok, _ = ops.poe_draft(logits[:, -1:, : target.vocab_size], temps, top_p=top_p, seed=seed, offset=step)
        tok = tok[:, 0, 0].cpu()
        for b in range(B):
            if not done[b]:
                gen[b].append(int(tok[b]))
                stats.new_tokens += 1
                if int(tok[b]) in eos:
                    done[b] = True
        if bar is not None:
            bar.update(1)
        if bool(done.all()):
            break
        ids = tok[:, None].to(dev)
        am = torch.cat([am, torch.ones(B, 1, dtype=torch.long, device=dev)], dim=1)
        pos = (lengths + step)[:, None]
    if bar is not None:
        bar.close()
    stats.wall_time = time.perf_counter() - t0
    return GenerationOutput(gen, stats)


@torch.no_grad()
def dlm_generate(draft_model, input_ids, attention_mask=None, *, max_new_tokens: int = 256,
                 tokens_per_step: int = 1, temperature: float = 0.2, top_p: float = 0.95, seed: int = 0,
                 eos_token_id=None, tokenizer=None, progress: bool = False) -> GenerationOutput:
    """Confidence-ordered parallel unmasking, ``tokens_per_step`` positions per DLM forward."""
    _check_common(max_new_tokens, temperature, top_p)
    _checks.integer("tokens_per_step", tokens_per_step, 1)
    draft = as_draft(draft_model, tokenizer)
    prompts = prompts_from(input_ids, attention_mask)
    eos = eos_set(eos_token_id, getattr(draft, "model", None))
    if not eos:
        raise ValueError("eos_token_id: the draft model's config has no eos_token_id; pass eos_token_id=")
    eos_id = min(eos)
    t0 = time.perf_counter()
    B, N, dev = len(prompts), max_new_tokens, draft.device
    mask_id = draft.mask_token_id
    Lc = max(map(len, prompts)) + N
    ids = torch.full((B, Lc), mask_id, dtype=torch.long)
    am = torch.zeros(B, Lc, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
        am[b, : len(p) + N] = 1
    starts = torch.tensor([len(p) for p in prompts])
    cols = starts[:, None] + torch.arange(N)[None]  # [B, N] canvas positions of the answer
    temps = torch.tensor([float(temperature)], device=dev)
    stats = GenerationStats(num_sequences=B)
    done = torch.zeros(B, dtype=torch.bool)
    bar = _progress(progress, B * N, f"dlm-{tokens_per_step}")
    step = 0
    while not bool(done.all()):
        act = (~done).nonzero()[:, 0]
        logits = draft.logits(ids[act].to(dev), am[act].to(dev))
        stats.count_dlm(act.tolist())
        region = torch.gather(logits, 1, cols[act].to(dev)[..., None].expand(-1, -1, logits.shape[-1]))
        tok, logq = ops.poe_draft(region[..., : draft.vocab_size], temps, top_p=top_p, seed=seed, offset=step)
        tok, logq = tok[:, 0].cpu(), logq[:, 0].float().cpu()
        step += 1
        for i, b in enumerate(act.tolist()):
            cur = ids[b, cols[b]]
            masked = cur == mask_id
            conf = torch.where(masked, logq[i], torch.full_like(logq[i], float("-inf")))
            n = min(tokens_per_step, int(masked.sum()))
            pick = torch.topk(conf, n).indices
            cur[pick] = tok[i, pick]
            is_eos = torch.isin(cur, torch.tensor(sorted(eos)))
            if bool(is_eos.any()):
                first = int(is_eos.nonzero()[0])
                cur[first + 1:] = eos_id
                if not bool((cur[:first] == mask_id).any()):
                    done[b] = True
            if not bool((cur == mask_id).any()):
                done[b] = True
            ids[b, cols[b]] = cur
            if bar is not None:
                bar.update(n)
    if bar is not None:
        bar.close()
    gen = []
    for b in range(B):
        row = ids[b, cols[b]].tolist()
        out = []
        for t in row:
            out.append(t)
            if t in eos:
                break
        gen.append(out)
        stats.new_tokens += len(out)
    stats.wall_time = time.perf_counter() - t0
    return GenerationOutput(gen, stats)


def speculative_generate(draft_model, target_model, input_ids, attention_mask=None, *,
                         config: Optional[PoEBridgeConfig] = None, **kwargs) -> GenerationOutput:
    """Naive speculative decoding: PoE-Bridge with ``weight=0`` and one particle."""
    cfg = (config or PoEBridgeConfig()).replace(weight=0.0, num_particles=1, n_low_temp=1)
    return PoEBridgeDecoder(draft_model, target_model, cfg).generate(input_ids, attention_mask, **kwargs)


def is_only_generate(draft_model, target_model, input_ids, attention_mask=None, *,
                     config: Optional[PoEBridgeConfig] = None, **kwargs) -> GenerationOutput:
    """Importance sampling alone: PoE-Bridge with ``weight=1`` and ``top_p=1``.

    With w = 1 the PoE target equals the DLM's tempered softmax; without a nucleus that is exactly
    the proposal q, so the acceptance test always passes and the importance log-weights are
    ``sum_j [log p_AR,T*(x_j) - log q(x_j)]``. The other settings (K, windows, temperatures,
    selection) are ``config``'s."""
    cfg = (config or PoEBridgeConfig()).replace(weight=1.0, top_p=1.0)
    return PoEBridgeDecoder(draft_model, target_model, cfg).generate(input_ids, attention_mask, **kwargs)
