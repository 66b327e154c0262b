"""PoE-Bridge decoding: a masked-diffusion LM drafts, an autoregressive LM verifies through a
Product-of-Experts intermediate ``p_PoE ∝ p_D^w p_AR^(1-w)`` (rejection sampling DLM -> PoE),
and importance selection moves the K particles toward the AR model (PoE -> AR).

Per outer iteration (one DLM forward over ``committed prefix + M masks``):

1. the M masked rows of DLM logits are cut into windows of W rows;
2. for a window, ``diffkern.ops.poe_draft`` draws K particles at mixed temperatures;
3. one batched AR forward scores all particles on top of the per-particle KV cache;
4. ``diffkern.ops.poe_verify`` accepts each particle's prefix, corrects the first rejection from
   the residual ``(p_PoE - q)_+`` and returns importance log-weights;
5. a winner is selected per sequence (``resample`` ∝ weight, or ``argmax``), its tokens are
   committed and every particle continues from it (cache rows gathered, unused tail cropped);
6. elastic windows: while the winner's window is fully accepted, verify the next window of the
   same DLM forward; on the first rejection (or EOS, or the end of the M rows) re-run the DLM.

Batches (B > 1) are ragged: every sequence has its own committed length. The AR cache is one
``DynamicCache`` with B*K rows; positions that a sequence did not commit stay in it as masked
"holes" (2-D attention mask + explicit position ids) until they are cropped from the tail.
Invariant: the cache holds ``committed[:-1]`` of every sequence (the last committed token is
fed again with the next window, which yields the logits for the window's first draft).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from .adapters import CausalLMTarget, DraftModel, as_draft, as_target, check_vocab
from .config import PoEBridgeConfig


@dataclass
class GenerationStats:
    """Counters of one ``generate`` call. Forward counts are per sequence (a batched model call
    over n sequences counts n), as the official code counts at batch size 1."""

    num_sequences: int = 0
    dlm_forwards: int = 0
    ar_forwards: int = 0
    dlm_calls: int = 0
    ar_calls: int = 0
    new_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    ess: List[float] = field(default_factory=list)
    wall_time: float = 0.0

    @property
    def tokens_per_dlm_forward(self) -> float:
        return self.new_tokens / max(1, self.dlm_forwards)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / verified drafts, over all particles and windows."""
        return self.accepted / max(1, self.drafted)

    @property
    def mean_ess(self) -> float:
        return sum(self.ess) / max(1, len(self.ess))

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(1e-9, self.wall_time)

    def as_dict(self) -> dict:
        return {"num_sequences": self.num_sequences, "dlm_forwards": self.dlm_forwards,
                "ar_forwards": self.ar_forwards, "dlm_calls": self.dlm_calls, "ar_calls": self.ar_calls,
                "new_tokens": self.new_tokens, "tokens_per_dlm_forward": self.tokens_per_dlm_forward,
                "acceptance_rate": self.acceptance_rate, "mean_ess": self.mean_ess,
                "ess_per_window": list(self.ess), "wall_time": self.wall_time,
                "tokens_per_s": self.tokens_per_s}


@dataclass
class GenerationOutput:
    """``sequences[b]``: the new token ids of prompt b (EOS included when emitted)."""

    sequences: List[List[int]]
    stats: GenerationStats

    def padded(self, pad_token_id: int) -> Tensor:
        n = max([len(s) for s in self.sequences] + [0])
        out = torch.full((len(self.sequences), n), int(pad_token_id), dtype=torch.long)
        for i, s in enumerate(self.sequences):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out


def prompts_from(input_ids, attention_mask=None, name: str = "input_ids") -> List[List[int]]:
    """List of prompt id lists from a ``[B, P]`` tensor (+ optional padding mask) or lists."""
    if isinstance(input_ids, Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"{name}: expected a [B, P] tensor of token ids, got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"{name}: expected an integer tensor, got {input_ids.dtype}")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match "
                                 f"{name} shape {tuple(input_ids.shape)}")
            rows = [r[m.bool()].tolist() for r, m in zip(input_ids.cpu(), attention_mask.cpu())]
        else:
            rows = input_ids.cpu().tolist()
    elif isinstance(input_ids, (list, tuple)):
        rows = [list(r) for r in input_ids] if input_ids and isinstance(input_ids[0], (list, tuple)) \
            else [list(input_ids)]
    else:
        raise TypeError(f"{name}: expected a LongTensor [B, P] or a list of id lists, got {type(input_ids).__name__}")
    if not rows:
        raise ValueError(f"{name}: empty batch")
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError(f"{name}: prompt {i} is empty (PoE-Bridge needs at least one prompt token, e.g. BOS)")
    return [[int(t) for t in r] for r in rows]


def eos_set(eos_token_id, model) -> set:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


class PoEBridgeDecoder:
    """PoE-Bridge: decode with a diffusion LM drafting and an AR LM verifying.

    Args:
        draft_model: a :class:`DraftModel` or a transformers masked LM (wrapped by
            :class:`MaskedLMDraft`, unshifted logits).
        target_model: a transformers causal LM (or :class:`CausalLMTarget`).
        config: :class:`PoEBridgeConfig`.
    """

    def __init__(self, draft_model, target_model, config: Optional[PoEBridgeConfig] = None, *, tokenizer=None):
        if config is None:
            config = PoEBridgeConfig()
        if not isinstance(config, PoEBridgeConfig):
            raise TypeError(f"config: expected PoEBridgeConfig, got {type(config).__name__}")
        self.draft: DraftModel = as_draft(draft_model, tokenizer)
        self.target: CausalLMTarget = as_target(target_model)
        self.config = config
        self.vocab_size = check_vocab(self.draft, self.target, config.vocab_size)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, attention_mask: Optional[Tensor] = None, *, max_new_tokens: Optional[int] = None,
                 seed: int = 0, eos_token_id=None, progress: bool = False,
                 hook: Optional[Callable[[dict], None]] = None) -> GenerationOutput:
        """Generate continuations of a batch of prompts.

        Args:
            input_ids: ``[B, P]`` ids (rows may be padded: pass ``attention_mask``) or id lists.
            max_new_tokens: budget per sequence (default ``config.max_new_tokens``).
            seed: seeds the operators' Philox streams and the selection generator.
            eos_token_id: int or ids ending a sequence (default: the target's config).
            hook: debugging callback after every window, given the decoder state (used by tests).
        Returns:
            :class:`GenerationOutput` with the new ids per prompt and :class:`GenerationStats`.
        """
        cfg = self.config
        max_new = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new, int) or max_new < 1:
            raise ValueError(f"max_new_tokens: must be an int >= 1, got {max_new!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        prompts = prompts_from(input_ids, attention_mask)
        eos = eos_set(eos_token_id, self.target.model)
        t0 = time.perf_counter()

        B, K, W, M, V = len(prompts), cfg.num_particles, cfg.window, cfg.max_lookahead, self.vocab_size
        dev = self.target.device
        ddev = self.draft.device
        temps = cfg.particle_temperatures().to(dev)
        target_t = float(cfg.temperature if cfg.target_temperature is None else cfg.target_temperature)
        parity = cfg.weights == "parity"
        sel_gen = torch.Generator(device="cpu")
        sel_gen.manual_seed(seed)
        offset = 0

        stats = GenerationStats(num_sequences=B)
        committed = [list(p) for p in prompts]
        gen: List[List[int]] = [[] for _ in range(B)]
        done = [False] * B
        cached = [0] * B  # committed tokens of sequence b whose KV is in the cache
        cache = self.target.new_cache()
        valid = torch.zeros(B * K, 0, dtype=torch.bool, device=dev)
        mask_id = self.draft.mask_token_id
        bar = _progress(progress, B * max_new, "poe-bridge")

        while not all(done):
            act = [b for b in range(B) if not done[b]]
            # ---- one DLM forward: committed prefix + up to M masks per active sequence ----
            m = {b: min(M, max_new - len(gen[b])) for b in act}
            canvases = [committed[b] + [mask_id] * m[b] for b in act]
            Lc = max(map(len, canvases))
            ids = torch.full((len(act), Lc), mask_id, dtype=torch.long)
            am = torch.zeros((len(act), Lc), dtype=torch.long)
            for i, c in enumerate(canvases):
                ids[i, : len(c)] = torch.tensor(c)
                am[i, : len(c)] = 1
            dl = self.draft.logits(ids.to(ddev), am.to(ddev))[..., :V].to(dev)
            stats.dlm_forwards += len(act)
            stats.dlm_calls += 1
            drafts_rows = {b: dl[i, len(committed[b]): len(committed[b]) + m[b]] for i, b in enumerate(act)}

            in_window, wi = list(act), 0
            while in_window:
                Ba = len(in_window)
                lens = {b: min(W, m[b] - wi * W) for b in in_window}
                dwin = torch.zeros(Ba, W, V, dtype=dl.dtype, device=dev)
                for i, b in enumerate(in_window):
                    dwin[i, : lens[b]] = drafts_rows[b][wi * W: wi * W + lens[b]]
                tokens, _ = ops.poe_draft(dwin, temps, top_p=cfg.top_p, seed=seed, offset=offset)
                offset += 1

                # ---- one AR forward over all B*K rows (rows of other sequences are padding) ----
                pend = {b: committed[b][cached[b]:] for b in in_window}
                P = max(len(p) for p in pend.values())
                Lin = P + W
                a_ids = torch.zeros(B * K, Lin, dtype=torch.long, device=dev)
                a_mask = torch.zeros(B * K, Lin, dtype=torch.long, device=dev)
                a_pos = torch.zeros(B * K, Lin, dtype=torch.long, device=dev)
                for i, b in enumerate(in_window):
                    p, c = pend[b], len(committed[b])
                    rows = slice(b * K, (b + 1) * K)
                    a_ids[rows, P - len(p): P] = torch.tensor(p, device=dev)
                    a_ids[rows, P:] = tokens[i]
                    a_mask[rows, P - len(p): P + lens[b]] = 1
                    a_pos[rows, P - len(p):] = torch.arange(c - len(p), c + W, device=dev)
                full_mask = torch.cat([valid.long(), a_mask], dim=1)
                logits, cache = self.target.forward(a_ids, full_mask, a_pos, cache)
                stats.ar_calls += 1
                stats.ar_forwards += Ba
                rows_idx = torch.tensor([b * K + k for b in in_window for k in range(K)], device=dev)
                ar_win = logits[rows_idx, P - 1: P - 1 + W, :V].reshape(Ba, K, W, V).to(dwin.dtype)
                # rows past a short (last) window: identical zero logits -> always accepted, zero weight
                for i, b in enumerate(in_window):
                    if lens[b] < W:
                        ar_win[i, :, lens[b]:] = 0
                res = ops.poe_verify(dwin, ar_win, tokens, temps, weight=cfg.weight, top_p=cfg.top_p,
                                     target_temperature=target_t, seed=seed, offset=offset, parity=parity)
                offset += 1

                sel = torch.arange(B * K, device=dev)
                new_valid = torch.zeros(B * K, Lin, dtype=torch.bool, device=dev)
                na_all, cor_all = res.num_accepted.cpu(), res.corrected.cpu()
                tok_all, lw_all = res.tokens.cpu(), res.log_weights.detach().float().cpu()
                cont, chosen = [], {}
                for i, b in enumerate(in_window):
                    Lb = lens[b]
                    na = na_all[i].clamp(max=Lb)
                    full = na_all[i] >= Lb
                    emit = torch.where(full, torch.full_like(na, Lb), na + cor_all[i].long()).clamp(max=Lb)
                    has_eos = torch.zeros(K, dtype=torch.bool)
                    for k in range(K):
                        for j in range(int(emit[k])):
                            if int(tok_all[i, k, j]) in eos:
                                emit[k], has_eos[k] = j + 1, True
                                break
                    lw = lw_all[i]
                    lw = torch.nan_to_num(lw, nan=float("-inf"))
                    if cfg.selection == "argmax" or K == 1:
                        k_star = int(torch.argmax(lw))
                    else:
                        probs = torch.softmax(lw.double(), 0)
                        k_star = int(torch.multinomial(probs, 1, generator=sel_gen)) if torch.isfinite(probs).all() \
                            else int(torch.argmax(lw))
                    wts = torch.softmax(lw.double(), 0)
                    stats.ess.append(float(1.0 / (wts * wts).sum()) if torch.isfinite(wts).all() else 1.0)
                    stats.drafted += K * Lb
                    stats.accepted += int(na.sum())
                    e = int(emit[k_star])
                    chosen[b] = (i, k_star, e)
                    new = tok_all[i, k_star, :e].tolist()
                    gen[b] += new
                    committed[b] += new
                    stats.new_tokens += e
                    if bar is not None:
                        bar.update(e)
                    sel[b * K:(b + 1) * K] = b * K + k_star
                    p = pend[b]
                    new_valid[b * K:(b + 1) * K, P - len(p): P + e - 1] = True
                    cached[b] = len(committed[b]) - 1
                    if bool(has_eos[k_star]) or len(gen[b]) >= max_new:
                        done[b] = True
                    elif bool(full[k_star]) and (wi + 1) * W < m[b]:
                        cont.append(b)
                self.target.select(cache, sel)
                valid = torch.cat([valid[sel], new_valid], dim=1)
                used = valid.any(dim=0).nonzero()
                keep = int(used.max()) + 1 if used.numel() else 0
                self.target.crop(cache, keep)
                valid = valid[:, :keep]
                if hook is not None:
                    hook({"committed": committed, "generated": gen, "cache": cache, "valid": valid,
                          "cached": cached, "num_particles": K, "target": self.target, "done": done,
                          "result": res, "draft_tokens": tokens, "window_sequences": list(in_window),
                          "selected": chosen, "window_lengths": lens})
                in_window = cont
                wi += 1
        if bar is not None:
            bar.close()
        stats.wall_time = time.perf_counter() - t0
        return GenerationOutput(gen, stats)


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tok", leave=False)
