#!/usr/bin/env python
"""Train the tiny PoE-Bridge model pair shipped in ``pyglue/assets/poe_bridge``.

Both models learn the letter-sorting task of :mod:`diffkern.poe_bridge.task` from freshly
sampled training problems (held-out letter sets are never seen):

* ``ar/``  GPT-2 causal LM (``AutoModelForCausalLM``), loss on the answer and EOS;
* ``dlm/`` BERT masked LM (``AutoModelForMaskedLM``) trained as a masked-diffusion LM: the
  answer region of a fixed canvas (prompt + MAX_NEW_TOKENS positions, answer then EOS padding)
  is masked at a random ratio t ~ U(0, 1) (MDLM / LLaDA style), half of the time on a random
  suffix only (the prefix-conditioned case that PoE-Bridge's drafting sees); a few canvases are
  truncated so that shorter lookaheads work. Logits are unshifted (LLaDA style).

Runs on CPU with one thread by default, in a few minutes::

    python scripts/train_poe_bridge_models.py [--ar-steps 2000] [--dlm-steps 2800] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffkern.poe_bridge import task
from diffkern.poe_bridge.models import ASSET_DIR


def ar_batch(tok, rng, batch):
    seqs, starts = [], []
    for _ in range(batch):
        p = task.sample_problem(rng, held_out=False)
        prompt = task.encode_prompt(tok, p)
        ans = tok(task.sample_answer(p, rng), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(prompt + ans)
        starts.append(len(prompt))
    L = max(map(len, seqs))
    ids = torch.full((batch, L), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((batch, L), -100, dtype=torch.long)
    attn = torch.zeros((batch, L), dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        labels[i, st: len(s)] = torch.tensor(s[st:])
    return ids, attn, labels


def dlm_batch(tok, rng, batch, new_tokens):
    rows = []
    for _ in range(batch):
        p = task.sample_problem(rng, held_out=False)
        prompt = task.encode_prompt(tok, p)
        ans = tok(task.sample_answer(p, rng), add_special_tokens=False)["input_ids"]
        region = (ans + [tok.eos_token_id] * new_tokens)[:new_tokens]
        t = rng.random()
        if rng.random() < 0.5:
            masked = [rng.random() < max(t, 0.02) for _ in range(new_tokens)]
        else:  # prefix given, suffix masked (optionally with extra random masks)
            cut = rng.randint(0, len(ans))
            masked = [j >= cut for j in range(new_tokens)]
        if not any(masked):
            masked[rng.randrange(new_tokens)] = True
        end = new_tokens
        if rng.random() < 0.15:  # truncated canvas (shorter lookahead)
            first = masked.index(True)
            end = rng.randint(first + 1, new_tokens)
        rows.append((prompt, region[:end], masked[:end]))
    L = max(len(p) + len(r) for p, r, _ in rows)
    ids = torch.full((batch, L), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((batch, L), -100, dtype=torch.long)
    attn = torch.zeros((batch, L), dtype=torch.long)
    for i, (p, r, m) in enumerate(rows):
        n = len(p) + len(r)
        full = torch.tensor(p + r)
        ids[i, :n] = full
        attn[i, :n] = 1
        for j, mk in enumerate(m):
            if mk:
                labels[i, len(p) + j] = full[len(p) + j]
                ids[i, len(p) + j] = tok.mask_token_id
    return ids, attn, labels


def train(model, make_batch, steps, lr, log_name):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    t0, run = time.time(), None
    for step in range(steps):
        ids, attn, labels = make_batch()
        logits = model(input_ids=ids, attention_mask=attn).logits
        if log_name == "ar":
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            print(f"[{log_name}] step {step:5d} loss {run:.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSET_DIR)
    ap.add_argument("--ar-steps", type=int, default=2000)
    ap.add_argument("--dlm-steps", type=int, default=2800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["ar", "dlm"], default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    tok = task.build_tokenizer()
    tok.save_pretrained(str(args.out / "tokenizer"))
    V = len(tok)
    common = dict(vocab_size=V, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)

    if args.only in (None, "ar"):
        ar = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=128, n_layer=4, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common))
        print(f"AR params: {sum(p.numel() for p in ar.parameters()) / 1e6:.2f}M", flush=True)
        train(ar, lambda: ar_batch(tok, rng, args.batch), args.ar_steps, 1e-3, "ar")
        ar.save_pretrained(str(args.out / "ar"))
        tok.save_pretrained(str(args.out / "ar"))

    if args.only in (None, "dlm"):
        dlm = BertForMaskedLM(BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=512, max_position_embeddings=64,
                                         type_vocab_size=1, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, **common))
        print(f"DLM params: {sum(p.numel() for p in dlm.parameters()) / 1e6:.2f}M", flush=True)
        train(dlm, lambda: dlm_batch(tok, rng, args.batch, task.MAX_NEW_TOKENS), args.dlm_steps, 1e-3, "dlm")
        dlm.save_pretrained(str(args.out / "dlm"))
        tok.save_pretrained(str(args.out / "dlm"))
    print("saved to", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
