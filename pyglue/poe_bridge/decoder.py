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
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from .. import ops
from ..ops import _checks
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
    #: the same counters per sequence (``seq_ess[b]``: the ESS of each of b's windows)
    seq_dlm_forwards: List[int] = field(default_factory=list)
    seq_ar_forwards: List[int] = field(default_factory=list)
    seq_drafted: List[int] = field(default_factory=list)
    seq_accepted: List[int] = field(default_factory=list)
    seq_ess: List[List[float]] = field(default_factory=list)

    def __post_init__(self):
        n = self.num_sequences
        for name in ("seq_dlm_forwards", "seq_ar_forwards", "seq_drafted", "seq_accepted"):
            if not getattr(self, name):
                setattr(self, name, [0] * n)
        if not self.seq_ess:
            self.seq_ess = [[] for _ in range(n)]

    def count_dlm(self, seqs) -> None:
        """One DLM call over the sequences ``seqs``."""
        self.dlm_calls += 1
        self.dlm_forwards += len(seqs)
        for b in seqs:
            self.seq_dlm_forwards[b] += 1

    def count_ar(self, seqs) -> None:
        """One AR call over the sequences ``seqs``."""
        self.ar_calls += 1
        self.ar_forwards += len(seqs)
        for b in seqs:
            self.seq_ar_forwards[b] += 1

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
        max_new = _checks.integer("max_new_tokens", self.config.max_new_tokens if max_new_tokens is None
                                  else max_new_tokens, 1)
        seed = _checks.integer("seed", seed, 0)
        prompts = prompts_from(input_ids, attention_mask)
        t0 = time.perf_counter()
        run = self._start(prompts, max_new, seed, eos_set(eos_token_id, self.target.model), progress)
        while run.active:
            dlm = self._dlm_forward(run)                     # steps 1-2: one DLM forward, its windows
            window = self._window(run, dlm, run.active, 0)
            while window is not None:                        # step 6: elastic windows
                self._draft(run, window)                     # step 2
                self._ar_forward(run, window)                # step 3
                self._verify(run, window)                    # step 4
                self._select_and_commit(run, dlm, window)    # step 5
                self._advance_cache(run, window)
                if hook is not None:
                    hook(run.hook_view(window))
                window = self._window(run, dlm, window.continuing, window.index + 1)
        if run.bar is not None:
            run.bar.close()
        run.stats.wall_time = time.perf_counter() - t0
        return GenerationOutput([s.generated for s in run.seqs], run.stats)

    # ---- the steps of generate(), in order ---------------------------------------------------
    def _start(self, prompts: List[List[int]], max_new: int, seed: int, eos: set, progress: bool) -> "_Run":
        cfg = self.config
        sel_gen = torch.Generator(device="cpu")
        sel_gen.manual_seed(seed)
        B, K = len(prompts), cfg.num_particles
        return _Run(
            seqs=[_Sequence(list(p)) for p in prompts], max_new=max_new, seed=seed, eos=eos,
            temps=cfg.particle_temperatures().to(self.target.device),
            target_t=float(cfg.temperature if cfg.target_temperature is None else cfg.target_temperature),
            parity=cfg.weights == "parity", sel_gen=sel_gen, stats=GenerationStats(num_sequences=B),
            cache=self.target.new_cache(), valid=torch.zeros(B * K, 0, dtype=torch.bool, device=self.target.device),
            num_particles=K, target=self.target, bar=_progress(progress, B * max_new, "poe-bridge"),
            synced=[0] * B)

    def _dlm_forward(self, run: "_Run") -> "_DLMForward":
        """One DLM forward over committed prefix + up to M masks per active sequence."""
        act, mask_id, V = run.active, self.draft.mask_token_id, self.vocab_size
        m = {b: min(self.config.max_lookahead, run.max_new - len(run.seqs[b].generated)) for b in act}
        canvases = [run.seqs[b].committed + [mask_id] * m[b] for b in act]
        Lc = max(map(len, canvases))
        ids = torch.full((len(act), Lc), mask_id, dtype=torch.long)
        am = torch.zeros((len(act), Lc), dtype=torch.long)
        for i, c in enumerate(canvases):
            ids[i, : len(c)] = torch.tensor(c)
            am[i, : len(c)] = 1
        ddev = self.draft.device
        dl = self.draft.logits(ids.to(ddev), am.to(ddev))[..., :V].to(self.target.device)
        run.stats.count_dlm(act)
        rows = {b: dl[i, len(run.seqs[b].committed): len(run.seqs[b].committed) + m[b]] for i, b in enumerate(act)}
        return _DLMForward(masks=m, rows=rows, dtype=dl.dtype)

    def _window(self, run: "_Run", dlm: "_DLMForward", seqs: List[int], index: int) -> Optional["_Window"]:
        """Window ``index`` (W rows) of the DLM forward for ``seqs``; None when no sequence goes on."""
        if not seqs:
            return None
        W, V = self.config.window, self.vocab_size
        lens = {b: min(W, dlm.masks[b] - index * W) for b in seqs}
        logits = torch.zeros(len(seqs), W, V, dtype=dlm.dtype, device=self.target.device)
        for i, b in enumerate(seqs):
            logits[i, : lens[b]] = dlm.rows[b][index * W: index * W + lens[b]]
        return _Window(index=index, seqs=list(seqs), lens=lens, dlm_logits=logits)

    def _draft(self, run: "_Run", win: "_Window") -> None:
        win.drafts, _ = ops.poe_draft(win.dlm_logits, run.temps, top_p=self.config.top_p, seed=run.seed,
                                      offset=run.offset)
        run.offset += 1

    def _ar_forward(self, run: "_Run", win: "_Window") -> None:
        """One AR forward over all B*K rows (rows of other sequences are padding): the pending
        committed tokens, then the drafts; keeps the window's rows of AR logits."""
        K, W, V, dev = run.num_particles, self.config.window, self.vocab_size, self.target.device
        win.pending = {b: run.seqs[b].committed[run.seqs[b].cached:] for b in win.seqs}
        P = win.prefix = max(len(p) for p in win.pending.values())
        B, Lin = len(run.seqs), P + W
        a_ids = torch.zeros(B * K, Lin, dtype=torch.long, device=dev)
        a_mask = torch.zeros(B * K, Lin, dtype=torch.long, device=dev)
        a_pos = torch.zeros(B * K, Lin, dtype=torch.long, device=dev)
        for i, b in enumerate(win.seqs):
            p, c = win.pending[b], len(run.seqs[b].committed)
            rows = slice(b * K, (b + 1) * K)
            a_ids[rows, P - len(p): P] = torch.tensor(p, device=dev)
            a_ids[rows, P:] = win.drafts[i]
            a_mask[rows, P - len(p): P + win.lens[b]] = 1
            # rows past a short window are masked out; clamping keeps their position ids in the
            # model's range when the window reaches past the canvas
            a_pos[rows, P - len(p):] = torch.arange(c - len(p), c + W, device=dev).clamp(max=c + win.lens[b] - 1)
        full_mask = torch.cat([run.valid.long(), a_mask], dim=1)
        logits, run.cache = self.target.forward(a_ids, full_mask, a_pos, run.cache)
        run.stats.count_ar(win.seqs)
        rows_idx = torch.tensor([b * K + k for b in win.seqs for k in range(K)], device=dev)
        win.ar_logits = logits[rows_idx, P - 1: P - 1 + W, :V].reshape(len(win.seqs), K, W, V).to(win.dlm_logits.dtype)
        # rows past a short (last) window: identical zero logits -> always accepted, zero weight
        for i, b in enumerate(win.seqs):
            if win.lens[b] < W:
                win.ar_logits[i, :, win.lens[b]:] = 0

    def _verify(self, run: "_Run", win: "_Window") -> None:
        cfg = self.config
        win.result = ops.poe_verify(win.dlm_logits, win.ar_logits, win.drafts, run.temps, weight=cfg.weight,
                                    top_p=cfg.top_p, target_temperature=run.target_t, seed=run.seed,
                                    offset=run.offset, parity=run.parity)
        run.offset += 1

    def _select_and_commit(self, run: "_Run", dlm: "_DLMForward", win: "_Window") -> None:
        """Per sequence: what each particle emits, the winner, its tokens committed; which
        sequences verify the next window of this DLM forward (fully accepted, masks left)."""
        K, W = run.num_particles, self.config.window
        res = win.result
        na_all, cor_all = res.num_accepted.cpu(), res.corrected.cpu()
        tok_all, lw_all = res.tokens.cpu(), res.log_weights.detach().float().cpu()
        win.select = torch.arange(len(run.seqs) * K, device=self.target.device)
        win.new_valid = torch.zeros(len(run.seqs) * K, win.prefix + W, dtype=torch.bool, device=self.target.device)
        for i, b in enumerate(win.seqs):
            emit, full, has_eos = self._emitted(run, win.lens[b], na_all[i], cor_all[i], tok_all[i])
            k_star = self._choose_particle(run, b, lw_all[i])
            accepted = int(na_all[i].clamp(max=win.lens[b]).sum())
            run.stats.drafted += K * win.lens[b]
            run.stats.accepted += accepted
            run.stats.seq_drafted[b] += K * win.lens[b]
            run.stats.seq_accepted[b] += accepted
            e = int(emit[k_star])
            win.chosen[b] = (i, k_star, e)
            self._commit(run, b, tok_all[i, k_star, :e].tolist())
            win.select[b * K:(b + 1) * K] = b * K + k_star
            win.new_valid[b * K:(b + 1) * K, win.prefix - len(win.pending[b]): win.prefix + e - 1] = True
            seq = run.seqs[b]
            if bool(has_eos[k_star]) or len(seq.generated) >= run.max_new:
                seq.done = True
            elif bool(full[k_star]) and (win.index + 1) * W < dlm.masks[b]:
                win.continuing.append(b)

    @staticmethod
    def _emitted(run: "_Run", Lb: int, num_accepted: Tensor, corrected: Tensor, tokens: Tensor):
        """Tokens each particle emits from a window of ``Lb`` real rows: the accepted prefix, plus
        the correction, cut after the first EOS. Returns (emit [K], fully accepted [K], EOS [K])."""
        na = num_accepted.clamp(max=Lb)
        full = num_accepted >= Lb
        emit = torch.where(full, torch.full_like(na, Lb), na + corrected.long()).clamp(max=Lb)
        has_eos = torch.zeros(len(emit), dtype=torch.bool)
        for k in range(len(emit)):
            for j in range(int(emit[k])):
                if int(tokens[k, j]) in run.eos:
                    emit[k], has_eos[k] = j + 1, True
                    break
        return emit, full, has_eos

    def _choose_particle(self, run: "_Run", b: int, log_weights: Tensor) -> int:
        """The winner: argmax, or a draw proportional to the importance weights; records the ESS."""
        lw = torch.nan_to_num(log_weights, nan=float("-inf"))
        if self.config.selection == "argmax" or run.num_particles == 1:
            k_star = int(torch.argmax(lw))
        else:
            probs = torch.softmax(lw.double(), 0)
            k_star = int(torch.multinomial(probs, 1, generator=run.sel_gen)) if torch.isfinite(probs).all() \
                else int(torch.argmax(lw))
        wts = torch.softmax(lw.double(), 0)
        ess = float(1.0 / (wts * wts).sum()) if torch.isfinite(wts).all() else 1.0
        run.stats.ess.append(ess)
        run.stats.seq_ess[b].append(ess)
        return k_star

    @staticmethod
    def _commit(run: "_Run", b: int, new: List[int]) -> None:
        seq = run.seqs[b]
        seq.generated += new
        seq.committed += new
        seq.cached = len(seq.committed) - 1     # the cache holds committed[:-1] once advanced
        run.stats.new_tokens += len(new)
        if run.bar is not None:
            run.bar.update(len(new))

    def _advance_cache(self, run: "_Run", win: "_Window") -> None:
        """Every particle continues from its sequence's winner: cache rows gathered, the positions
        no sequence committed stay as masked holes, the unused tail is cropped.

        The result equals a full gather ``cache[win.select]`` then a crop, bit for bit, but copies
        far less (the full gather was 15 % of a ModChain decode at K = 4, see
        ``scripts/profile_poe_bridge.py``): the tail is cropped first, and only the rows whose
        winner is another row are rewritten, only from ``run.synced[b]`` on, since the K rows of
        sequence b are bit-identical before that position (they were copied from one winner at b's
        last selection, and the cache only grows by appending)."""
        K = run.num_particles
        valid = torch.cat([run.valid[win.select], win.new_valid], dim=1)
        used = valid.any(dim=0).nonzero()
        keep = int(used.max()) + 1 if used.numel() else 0
        self.target.crop(run.cache, keep)
        moved = win.select != torch.arange(len(win.select), device=win.select.device)
        if bool(moved.any()):
            rows = moved.nonzero().flatten()
            starts = torch.tensor(run.synced, device=rows.device)[rows // K]
            copied = True
            for start in sorted(set(starts.tolist())):
                grp = rows[starts == start]
                if start < keep and not self.target.copy_rows(run.cache, grp, win.select[grp], start):
                    copied = False
                    break
            if not copied:          # a cache the row copy does not handle: gather whole rows
                self.target.select(run.cache, win.select)
        for b in win.seqs:          # all K rows of b now hold b's winner on [0, keep)
            run.synced[b] = keep
        run.synced = [min(s, keep) for s in run.synced]
        run.valid = valid[:, :keep]


@dataclass
class _Sequence:
    """One prompt's progress."""

    committed: List[int]                      # prompt + generated tokens
    generated: List[int] = field(default_factory=list)
    cached: int = 0                           # committed tokens whose KV is in the AR cache
    done: bool = False


@dataclass
class _Run:
    """The state one ``generate`` call carries from step to step."""

    seqs: List[_Sequence]
    max_new: int
    seed: int
    eos: set
    temps: Tensor                             # [K] particle temperatures
    target_t: float
    parity: bool
    sel_gen: torch.Generator
    stats: GenerationStats
    cache: object                             # the AR model's cache, B*K rows
    valid: Tensor                             # [B*K, L] bool: cache positions holding committed tokens
    num_particles: int
    target: CausalLMTarget
    bar: object = None
    offset: int = 0                           # Philox offset: +1 per poe_draft and per poe_verify call
    #: per sequence: the K cache rows of b are bit-identical on positions [0, synced[b])
    synced: List[int] = field(default_factory=list)

    @property
    def active(self) -> List[int]:
        return [b for b, s in enumerate(self.seqs) if not s.done]

    def hook_view(self, win: "_Window") -> dict:
        return {"committed": [s.committed for s in self.seqs], "generated": [s.generated for s in self.seqs],
                "cache": self.cache, "valid": self.valid, "cached": [s.cached for s in self.seqs],
                "num_particles": self.num_particles, "target": self.target,
                "done": [s.done for s in self.seqs], "result": win.result, "draft_tokens": win.drafts,
                "window_sequences": list(win.seqs), "selected": win.chosen, "window_lengths": win.lens}


@dataclass
class _DLMForward:
    """The masked rows of one DLM forward: ``rows[b]`` [m_b, V] for the ``masks[b]`` masks of b."""

    masks: Dict[int, int]
    rows: Dict[int, Tensor]
    dtype: torch.dtype


@dataclass
class _Window:
    """One verification window: its sequences, their drafts, the AR logits, the verdict."""

    index: int                                # window number inside the DLM forward
    seqs: List[int]
    lens: Dict[int, int]                      # real rows per sequence (the last window may be short)
    dlm_logits: Tensor                        # [Ba, W, V]
    drafts: Optional[Tensor] = None           # [Ba, K, W]
    pending: Dict[int, List[int]] = field(default_factory=dict)   # committed tokens not yet in the cache
    prefix: int = 0                           # P: the longest pending list (AR input = P + W)
    ar_logits: Optional[Tensor] = None        # [Ba, K, W, V]
    result: object = None                     # diffkern.ops.PoEVerifyResult
    chosen: Dict[int, tuple] = field(default_factory=dict)          # b -> (i, k*, emitted)
    continuing: List[int] = field(default_factory=list)             # verify the next window
    select: Optional[Tensor] = None           # [B*K] cache rows of the winners
    new_valid: Optional[Tensor] = None        # [B*K, P + W]


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tok", leave=False)
