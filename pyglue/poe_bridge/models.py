"""The tiny model pair shipped with diffkern (trained by ``scripts/train_poe_bridge_models.py``).

``pyglue/assets/poe_bridge/`` holds ``tokenizer/`` (shared), ``ar/`` (a GPT-2 causal LM) and
``dlm/`` (a BERT masked LM trained as a masked-diffusion LM) of the letter-sort pair, and one
such folder per further task (``modchain/``, ``reorganize/``; see :mod:`.tasks`), all written with
``save_pretrained`` and read with ``from_pretrained`` without network access.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

from .._optional import require

_NEEDED_BY = "diffkern.poe_bridge's shipped models"

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "poe_bridge"
TOKENIZER_DIR = ASSET_DIR / "tokenizer"
AR_DIR = ASSET_DIR / "ar"
DLM_DIR = ASSET_DIR / "dlm"


def _require(path: Path) -> Path:
    if not (path / "config.json").exists() and not (path / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"diffkern.poe_bridge: shipped model files are missing at {path}; "
            "run `python scripts/train_poe_bridge_models.py` in a source checkout")
    return path


def load_tokenizer(root: Path = ASSET_DIR):
    transformers = require("transformers", _NEEDED_BY)
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(_require(root / "tokenizer")),
                                                                local_files_only=True)


def load_ar_model(dtype=None, root: Path = ASSET_DIR):
    transformers = require("transformers", _NEEDED_BY)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(_require(root / "ar")), local_files_only=True,
                                                 attn_implementation="eager", dtype=dtype)
    return model.eval()


def load_dlm_model(dtype=None, root: Path = ASSET_DIR):
    transformers = require("transformers", _NEEDED_BY)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForMaskedLM.from_pretrained(str(_require(root / "dlm")), local_files_only=True,
                                                 attn_implementation="eager", dtype=dtype)
    return model.eval()


def load_pair(task: str = "letter-sort") -> Tuple[object, object, object]:
    """``(tokenizer, draft_model, target_model)`` of ``task``'s shipped pair (see :mod:`.tasks`):
    the raw transformers models; wrap them with :class:`diffkern.poe_bridge.MaskedLMDraft` /
    :class:`diffkern.poe_bridge.CausalLMTarget` (or use :func:`diffkern.poe_bridge.load_shipped`)."""
    from .tasks import get
    root = get(task).asset_dir
    return load_tokenizer(root), load_dlm_model(root=root), load_ar_model(root=root)
