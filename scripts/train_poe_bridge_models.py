#!/usr/bin/env python
"""Train a tiny PoE-Bridge model pair shipped in ``pyglue/assets/poe_bridge``.

Both models learn one task of :mod:`diffkern.poe_bridge.tasks` (``--task``: ``letter-sort``,
the first pair; ``modchain``, the main study task; ``reorganize``, the stress task) from freshly
sampled training problems (held-out problems are never seen). The AR model learns the task's
``"ar"``-style corpus, the DLM its ``"dlm"``-style corpus (they differ only in harmless style):

* ``ar/``  GPT-2 causal LM (``AutoModelForCausalLM``), loss on the answer and EOS;
* ``dlm/`` BERT masked LM (``AutoModelForMaskedLM``) trained as a masked-diffusion LM: the
  answer region of a fixed canvas (prompt + MAX_NEW_TOKENS positions, answer then EOS padding)
  is masked at a random ratio t ~ U(0, 1) (MDLM / LLaDA style), half of the time on a random
  suffix only (the prefix-conditioned case that PoE-Bridge's drafting sees); a few canvases are
  truncated so that shorter lookaheads work. Logits are unshifted (LLaDA style).

Calibration (``modchain``): the study needs an AR model that is good but not perfect, so AR
training stops at the first evaluation (every ``--eval-every`` steps, ``--eval-problems`` problems
of the *validation* split, T = 0.2) whose accuracy reaches ``--ar-stop-accuracy``; the test split
the demo reports on plays no part.

The two models draw from separate seeds (the DLM's is ``--seed`` + 1), so each is the same
whether it is trained alone (``--only``), after the other, or beside it (``--parallel``: two
processes of one thread each, the 2-core recipe). Runs on CPU, in a few minutes per model::

    python scripts/train_poe_bridge_models.py --task modchain [--parallel] [--ar-steps N] [--dlm-steps N] [--out DIR]
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

from diffkern.poe_bridge import task, tasks

#: Per task: (AR steps, DLM steps, AR stop accuracy on the validation split or None).
#: (ModChain's AR cap was 2000 steps until calibration attempt 4, where the stop rule had not fired by
#: step 2000; with the cap at 3000 it stopped at step 1800, a jump from 0.855 to 0.940 that overshot
#: the gate on the test split. Attempt 5 evaluates every 100 steps on 400 problems and stops at 0.85.
#: See docs/poe_bridge_study.md.)
DEFAULTS = {"letter-sort": (2000, 2800, None), "modchain": (3000, 1600, 0.85), "reorganize": (700, 750, None)}


def ar_batch(spec, tok, rng, batch):
    seqs, starts = [], []
    for _ in range(batch):
        p = spec.train_problem(rng)
        prompt = tok(p.prompt)["input_ids"]
        ans = tok(spec.answer(p, rng, "ar"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
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


def dlm_batch(spec, tok, rng, batch, new_tokens):
    rows = []
    for _ in range(batch):
        p = spec.train_problem(rng)
        prompt = tok(p.prompt)["input_ids"]
        ans = tok(spec.answer(p, rng, "dlm"), add_special_tokens=False)["input_ids"]
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


def validation_accuracy(spec, tok, model, n):
    """AR accuracy on ``n`` validation-split problems (T = 0.2, top-p 0.95, one sample each)."""
    from diffkern.poe_bridge import ar_generate
    problems = spec.problems(n, 99, "validation")
    prompts = [tok(p.prompt)["input_ids"] for p in problems]
    out = ar_generate(model, prompts, max_new_tokens=spec.max_new_tokens, temperature=0.2, top_p=0.95,
                      seed=0, eos_token_id=tok.eos_token_id)
    return sum(spec.score(tok, problems, out.sequences)) / n


def stop_rule(spec, tok, save_dir, stop_acc, n_problems):
    """``stop(model, step)``: save a checkpoint (it survives an interrupt), then stop once the
    validation accuracy on ``n_problems`` problems reaches ``stop_acc``. The evaluation draws
    from its own seeded streams, so it leaves the training trajectory unchanged."""
    def stop(model, step):
        model.save_pretrained(str(save_dir))
        acc = validation_accuracy(spec, tok, model, n_problems)
        print(f"[ar] step {step:5d} validation accuracy {acc:.3f} (stop at >= {stop_acc})", flush=True)
        return acc >= stop_acc
    return stop


def train(model, make_batch, steps, lr, log_name, stop=None, eval_every=250):
    """AdamW with warm-up and cosine decay over ``steps``; ``stop(model) -> bool`` is asked every
    ``eval_every`` steps and ends training early when it says so."""
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
        if stop is not None and step > 0 and step % eval_every == 0:
            model.eval()
            if stop(model, step):
                break
            model.train()
    print(f"[{log_name}] trained {step + 1} steps in {time.time() - t0:.0f}s", flush=True)
    model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(tasks.TASKS), default="letter-sort")
    ap.add_argument("--out", type=Path, default=None, help="default: the task's asset folder")
    ap.add_argument("--ar-steps", type=int, default=None, help="default: per task (see DEFAULTS)")
    ap.add_argument("--dlm-steps", type=int, default=None, help="default: per task")
    ap.add_argument("--ar-stop-accuracy", type=float, default=None,
                    help="stop AR training once validation accuracy reaches this (default: per task; <= 0: never)")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between AR stop-rule evaluations")
    ap.add_argument("--eval-problems", type=int, default=400, help="validation problems per evaluation")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["ar", "dlm"], default=None)
    ap.add_argument("--parallel", action="store_true",
                    help="train the two models at once, in two processes of --threads threads each")
    ap.add_argument("--shared-tokenizer-written", action="store_true", help=argparse.SUPPRESS)  # --parallel's children
    args = ap.parse_args(argv)
    for name in ("eval_every", "eval_problems", "batch", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.parallel and args.only is not None:
        ap.error("--parallel trains both models; it cannot be combined with --only")
    spec = tasks.get(args.task)
    out_dir = args.out or spec.asset_dir
    tok = task.build_tokenizer(spec.vocab)
    if not args.shared_tokenizer_written:    # one writer when --parallel's two children share the folder
        tok.save_pretrained(str(out_dir / "tokenizer"))
    if args.parallel:
        return train_in_parallel(argv if argv is not None else sys.argv[1:])
    ar_steps, dlm_steps, stop_acc = DEFAULTS[args.task]
    ar_steps = args.ar_steps or ar_steps
    dlm_steps = args.dlm_steps or dlm_steps
    stop_acc = stop_acc if args.ar_stop_accuracy is None else (args.ar_stop_accuracy if args.ar_stop_accuracy > 0
                                                                else None)
    torch.set_num_threads(args.threads)

    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    V = len(tok)
    common = dict(vocab_size=V, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)

    if args.only in (None, "ar"):
        torch.manual_seed(args.seed)
        rng = random.Random(args.seed)
        ar = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=128, n_layer=4, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common))
        print(f"AR params: {sum(p.numel() for p in ar.parameters()) / 1e6:.2f}M", flush=True)
        stop = None if stop_acc is None else stop_rule(spec, tok, out_dir / "ar", stop_acc, args.eval_problems)
        train(ar, lambda: ar_batch(spec, tok, rng, args.batch), ar_steps, 1e-3, "ar", stop, args.eval_every)
        ar.save_pretrained(str(out_dir / "ar"))
        tok.save_pretrained(str(out_dir / "ar"))

    if args.only in (None, "dlm"):
        torch.manual_seed(args.seed + 1)  # its own streams: the AR's stopping step does not move them
        rng = random.Random(args.seed + 1)
        dlm = BertForMaskedLM(BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=512, max_position_embeddings=64,
                                         type_vocab_size=1, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, **common))
        print(f"DLM params: {sum(p.numel() for p in dlm.parameters()) / 1e6:.2f}M", flush=True)
        train(dlm, lambda: dlm_batch(spec, tok, rng, args.batch, spec.max_new_tokens), dlm_steps, 1e-3, "dlm")
        dlm.save_pretrained(str(out_dir / "dlm"))
        tok.save_pretrained(str(out_dir / "dlm"))
    print("saved to", out_dir)
    return 0


def train_in_parallel(argv):
    """Run this script twice at once, ``--only ar`` and ``--only dlm``, and wait for both; output
    lines keep their ``[ar]`` / ``[dlm]`` prefixes. Fails if either fails."""
    import subprocess
    rest = [a for a in argv if a != "--parallel"]
    t0 = time.time()
    procs = {name: subprocess.Popen([sys.executable, __file__, *rest, "--only", name, "--shared-tokenizer-written"])
             for name in ("ar", "dlm")}
    try:
        codes = {name: p.wait() for name, p in procs.items()}
    except KeyboardInterrupt:
        for p in procs.values():
            p.terminate()
        raise
    print(f"both models trained in {time.time() - t0:.0f}s of wall time (exit codes {codes})", flush=True)
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
