"""diffkern.poe_bridge: PoE-Bridge decoding (a diffusion LM drafts, an autoregressive LM
verifies through a Product-of-Experts bridge), its baselines, and a shipped tiny model pair.

    from diffkern.poe_bridge import PoEBridgeConfig, PoEBridgeDecoder, load_shipped
    tok, draft, target = load_shipped()
    dec = PoEBridgeDecoder(draft, target, PoEBridgeConfig(window=8, max_lookahead=16, max_new_tokens=16))
    out = dec.generate(tok(["c a e b ="])["input_ids"], seed=0)
    out.sequences, out.stats.as_dict()

All hot math runs through ``diffkern.ops.poe_draft`` / ``diffkern.ops.poe_verify``, so
``with diffkern.use_backend("reference"):`` swaps the fused kernels out.
"""

from .adapters import CausalLMTarget, DraftModel, MaskedLMDraft, check_vocab
from .baselines import ar_generate, dlm_generate, is_only_generate, speculative_generate
from .config import PoEBridgeConfig
from .decoder import GenerationOutput, GenerationStats, PoEBridgeDecoder


def load_shipped(task: str = "letter-sort"):
    """``(tokenizer, draft, target)`` for a shipped pair (``"letter-sort"``, ``"modchain"`` or
    ``"reorganize"``, see :mod:`.tasks`): a :class:`MaskedLMDraft` over the BERT diffusion LM and
    the GPT-2 causal LM."""
    from . import models
    tok, dlm, ar = models.load_pair(task)
    return tok, MaskedLMDraft(dlm, mask_token_id=tok.mask_token_id), ar


__all__ = ["CausalLMTarget", "DraftModel", "GenerationOutput", "GenerationStats", "MaskedLMDraft",
           "PoEBridgeConfig", "PoEBridgeDecoder", "ar_generate", "check_vocab", "dlm_generate", "is_only_generate",
           "load_shipped", "speculative_generate"]
