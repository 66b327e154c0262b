"""Model adapters: a masked-diffusion LM draft interface and a causal-LM target with a KV cache.

* :class:`DraftModel` - the interface PoE-Bridge needs from a diffusion LM: logits for every
  position of ``input_ids`` (which contain ``mask_token_id`` at positions to fill), aligned so
  that ``logits[:, i]`` predicts the token *at* position ``i``.
  :class:`MaskedLMDraft` implements it over any transformers masked LM
  (``AutoModelForMaskedLM``); ``shifted=True`` handles Dream-style models whose logits at
  ``i - 1`` predict position ``i``, ``shifted=False`` LLaDA-style unshifted logits.
* :class:`CausalLMTarget` wraps any transformers causal LM (``AutoModelForCausalLM``) and
  its ``DynamicCache``: padded/ragged rows are expressed with a 2-D attention mask and explicit
  position ids, so the cache may hold masked-out "holes".
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _vocab_of(model) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


class DraftModel:
    """Interface: ``vocab_size``, ``mask_token_id``, ``device`` and
    ``logits(input_ids [B, L], attention_mask [B, L]) -> [B, L, V]`` (row ``i`` predicts
    position ``i``). Subclass it to plug in a custom diffusion LM."""

    vocab_size: int
    mask_token_id: int

    @property
    def device(self) -> torch.device:  # pragma: no cover - interface
        raise NotImplementedError

    def logits(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class MaskedLMDraft(DraftModel):
    """A transformers masked LM used as a masked-diffusion LM.

    Args:
        model: an ``AutoModelForMaskedLM``-style module (``model(input_ids, attention_mask).logits``).
        mask_token_id: the mask id; default ``model.config.mask_token_id`` or the tokenizer's.
        shifted: True for Dream-style logits (row ``i - 1`` predicts position ``i``).
        tokenizer: optional, only used to find the mask token id.
    """

    def __init__(self, model, mask_token_id: Optional[int] = None, *, shifted: bool = False, tokenizer=None):
        if not callable(model):
            raise TypeError(f"MaskedLMDraft: model must be a callable torch module, got {type(model).__name__}")
        if mask_token_id is None:
            mask_token_id = getattr(model.config, "mask_token_id", None)
        if mask_token_id is None and tokenizer is not None:
            mask_token_id = tokenizer.mask_token_id
        if mask_token_id is None:
            raise ValueError("MaskedLMDraft: mask_token_id is None and neither model.config.mask_token_id "
                             "nor tokenizer.mask_token_id is set; pass mask_token_id=")
        self.model = model
        self.mask_token_id = int(mask_token_id)
        self.shifted = bool(shifted)
        self.vocab_size = _vocab_of(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        if self.shifted:
            out = torch.cat([out[:, :1], out[:, :-1]], dim=1)
        return out


class CausalLMTarget:
    """A transformers causal LM with a ``DynamicCache``.

    ``forward(input_ids, attention_mask, position_ids, cache)`` runs new tokens on top of the cache;
    ``attention_mask`` covers cache + new tokens (0 = padding or a cache hole).
    """

    def __init__(self, model):
        if not callable(model):
            raise TypeError(f"CausalLMTarget: model must be a callable torch module, got {type(model).__name__}")
        self.model = model
        self.vocab_size = _vocab_of(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_cache(self):
        from transformers import DynamicCache
        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older signature
            return DynamicCache()

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache) -> Tuple[Tensor, object]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    @staticmethod
    def cache_length(cache) -> int:
        return 0 if cache is None else int(cache.get_seq_length())

    @staticmethod
    def select(cache, indices: Tensor) -> None:
        """Keep rows ``indices`` of the cache (gather; duplicates allowed)."""
        cache.batch_select_indices(indices)

    #: False forces :meth:`copy_rows` to decline, so the decoder gathers whole rows with
    #: :meth:`select` (the old path; used by tests and ``scripts/profile_poe_bridge.py``)
    row_copy: bool = True

    def copy_rows(self, cache, dst: Tensor, src: Tensor, start: int) -> bool:
        """In place, set cache row ``dst[i]`` to row ``src[i]`` over positions ``start:`` (every
        layer, keys and values). Returns False, changing nothing, unless every layer is a plain
        ``DynamicLayer`` (appended to by ``torch.cat``, never rewritten in place); the caller
        then falls back to :meth:`select`."""
        if not self.row_copy:
            return False
        try:
            from transformers.cache_utils import DynamicLayer
        except ImportError:  # older transformers: no cache layers
            return False
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
            return False
        if any(t.dim() != 4 for layer in layers for t in (layer.keys, layer.values)):
            return False
        for layer in layers:
            for t in (layer.keys, layer.values):
                region = t[:, :, start:]
                region.index_copy_(0, dst.to(t.device), region.index_select(0, src.to(t.device)))
        return True

    @staticmethod
    def crop(cache, length: int) -> None:
        """Crop the cache to its first ``length`` positions."""
        remove = CausalLMTarget.cache_length(cache) - int(length)
        if remove > 0:
            cache.crop(-remove)


def as_draft(model, tokenizer=None) -> DraftModel:
    if isinstance(model, DraftModel):
        return model
    return MaskedLMDraft(model, tokenizer=tokenizer)


def as_target(model) -> CausalLMTarget:
    if isinstance(model, CausalLMTarget):
        return model
    return CausalLMTarget(model)


def check_vocab(draft: DraftModel, target: CausalLMTarget, vocab_size: Optional[int] = None) -> int:
    """The common vocabulary size, or a ValueError when the two models' vocabularies differ.

    ``vocab_size`` (like the official ``DLM_TOKENIZER_LEN``) slices both models' logits to a shared
    leading vocabulary when one model only pads its embedding matrix."""
    dv, tv = int(draft.vocab_size), int(target.vocab_size)
    if vocab_size is not None:
        if vocab_size <= 0 or vocab_size > min(dv, tv):
            raise ValueError(f"vocab_size={vocab_size} must be in [1, min(draft {dv}, target {tv})]")
        return int(vocab_size)
    if dv != tv:
        raise ValueError(
            f"PoE-Bridge needs one shared vocabulary: draft_model has {dv} logits per position but "
            f"target_model has {tv}. Use models trained with the same tokenizer; if one model only pads "
            f"its vocabulary, pass PoEBridgeConfig(vocab_size=<shared size>) to slice both.")
    return dv
