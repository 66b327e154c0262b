"""Hooking a feature cache into a diffusion transformer.

The hook point is the input of the model's *output head* (``norm_out`` in diffusers DiTs): the
last transformer block's output. Per model call:

* real step: every block runs; the head's input is recorded by the cache;
* forecast step: every block returns its input untouched without running (the whole stack is
  skipped) and the head's input is replaced by the cache's prediction. Embedders, the head and
  the scheduler still run, as in the official code.

A step is one sampling step: consecutive calls with the same ``timestep`` value belong to the
same step (classifier-free guidance as separate calls: groups 0, 1, ...). The step counter
resets when a pipeline calls ``scheduler.set_timesteps`` (the schedule adapts to that step
count), when :func:`reset` is called, after ``num_steps`` steps, or when the timestep moves
backwards (a new sampling call on a bare transformer).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..forecast import FORAConfig, SpectrumConfig, TaylorSeerConfig, make_cache

__all__ = ["enable", "disable", "reset", "state", "SpectrumState", "BlockAdapter"]

_ATTR = "_diffkern_spectrum"
Config = Union[SpectrumConfig, FORAConfig, TaylorSeerConfig]


def hidden_passthrough(args: tuple, kwargs: dict):
    """Skipped block returning ``hidden_states`` (DiT / PixArt / most single-stream blocks)."""
    if args:
        return args[0]
    for name in ("hidden_states", "x", "hidden"):
        if name in kwargs:
            return kwargs[name]
    raise RuntimeError("diffkern.spectrum: cannot find the hidden state of a skipped block call; "
                       "pass passthrough= to enable()")


def dual_passthrough(args: tuple, kwargs: dict):
    """Skipped MMDiT block returning ``(encoder_hidden_states, hidden_states)`` (FLUX, SD3)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    context = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (
        args[1] if len(args) > 1 else None)
    return context, hidden


# class name -> (block-list attributes, head attribute, passthrough)
KNOWN_MODELS: Dict[str, Tuple[Tuple[str, ...], str, Callable]] = {
    "FluxTransformer2DModel": (("transformer_blocks", "single_transformer_blocks"), "norm_out", dual_passthrough),
    "SD3Transformer2DModel": (("transformer_blocks",), "norm_out", dual_passthrough),
    "DiTTransformer2DModel": (("transformer_blocks",), "norm_out", hidden_passthrough),
    "PixArtTransformer2DModel": (("transformer_blocks",), "norm_out", hidden_passthrough),
}


@dataclasses.dataclass
class BlockAdapter:
    """Where to hook a model: its blocks, the head consuming the last block's output (as its
    first positional argument), how a skipped block answers, and the timestep argument name."""

    blocks: List[nn.Module]
    head: nn.Module
    passthrough: Callable[[tuple, dict], Any] = hidden_passthrough
    timestep_arg: Optional[str] = "timestep"


def _adapter_for(model: nn.Module, blocks, head, passthrough, timestep_arg) -> BlockAdapter:
    cls = type(model).__name__
    if blocks is not None or head is not None:
        if blocks is None or head is None:
            raise ValueError(f"diffkern.spectrum.enable({cls}): the generic adapter needs both blocks= "
                             "(the transformer blocks, in order) and head= (the module that consumes "
                             "the last block's output as its first argument)")
        blocks = list(blocks)
        return BlockAdapter(blocks, head, passthrough or hidden_passthrough, timestep_arg)
    known = next((KNOWN_MODELS[c.__name__] for c in type(model).__mro__ if c.__name__ in KNOWN_MODELS), None)
    if known is None:
        raise ValueError(
            f"diffkern.spectrum.enable: cannot hook {cls}: it is not one of the supported diffusers "
            f"models ({', '.join(KNOWN_MODELS)}). For any other DiT pass blocks=<its transformer "
            "blocks> and head=<the module that takes the last block's output>, e.g. "
            "enable(model, config, blocks=model.blocks, head=model.final_layer)")
    block_attrs, head_attr, default_pass = known
    found: List[nn.Module] = []
    for attr in block_attrs:
        if not isinstance(getattr(model, attr, None), nn.ModuleList):
            raise ValueError(f"diffkern.spectrum.enable: cannot hook {cls}: it has no block list "
                             f"`{attr}` (nn.ModuleList)")
        found.extend(getattr(model, attr))
    if not isinstance(getattr(model, head_attr, None), nn.Module):
        raise ValueError(f"diffkern.spectrum.enable: cannot hook {cls}: it has no output head "
                         f"`{head_attr}` (the module fed by the last block)")
    return BlockAdapter(found, getattr(model, head_attr), passthrough or default_pass, timestep_arg)


def _timestep_value(t) -> Optional[float]:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().reshape(-1)[0]) if t.numel() else None
    return float(t)


class SpectrumState:
    """Per-model hook state: the schedule, the step counter, the cache and counters."""

    def __init__(self, config: Config, adapter: BlockAdapter, shadow: bool = False) -> None:
        self.config = config
        self.adapter = adapter
        self.shadow = shadow
        self.num_steps = config.num_steps
        self.cache = make_cache(config, self.num_steps)
        self.kind: Optional[str] = None        # "real" / "forecast" inside a model call
        self.head_seen = False
        self.block_calls = 0                   # block forwards actually executed
        self.calls: List[Tuple[int, int, str]] = []   # (step, group, kind) of this run
        self.shadow_errors: List[Tuple[int, int, float]] = []
        self.runs = 0
        self._begin_run()

    # ---- run / step bookkeeping --------------------------------------------------------
    def _begin_run(self) -> None:
        self.cache.reset()
        self.step = -1
        self.group = 0
        self.last_t: Optional[float] = None
        self.direction = 0.0
        self.calls = []
        self.shadow_errors = []

    def new_run(self, num_steps: Optional[int] = None) -> None:
        if num_steps is not None and int(num_steps) != self.num_steps:
            self.num_steps = int(num_steps)
            self.cache = make_cache(self.config, self.num_steps)
        self._begin_run()
        self.runs += 1

    @property
    def schedule(self) -> List[int]:
        return list(self.cache.schedule)

    def begin_call(self, t: Optional[float]) -> str:
        if t is not None and self.last_t is not None and t == self.last_t:
            self.group += 1
        else:
            moved_back = (t is not None and self.last_t is not None and self.direction != 0.0
                          and (t - self.last_t) * self.direction < 0)
            if moved_back:
                if self.step + 1 < self.num_steps:
                    warnings.warn(
                        f"diffkern.spectrum: the previous sampling call ran {self.step + 1} steps but "
                        f"the schedule was built for num_steps={self.num_steps}; enable() on the "
                        "pipeline (its set_timesteps adapts the schedule) or call "
                        "diffkern.spectrum.reset(model, num_steps=...) before sampling",
                        RuntimeWarning, stacklevel=4)
                self.new_run()
            elif self.step + 1 >= self.num_steps:
                if t is not None and self.last_t is not None and self.direction != 0.0:
                    raise RuntimeError(
                        f"diffkern.spectrum: this sampling call has more steps than the schedule's "
                        f"num_steps={self.num_steps}; call diffkern.spectrum.reset(model, "
                        "num_steps=<steps>) before sampling, or enable() on the pipeline")
                self.new_run()
            if t is not None and self.last_t is not None and self.direction == 0.0:
                self.direction = 1.0 if t > self.last_t else -1.0
            self.step += 1
            self.group = 0
            self.last_t = t
        planned_real = self.step in self.cache.real_set
        self.kind = "real" if planned_real or not self.cache.ready(self.group) else "forecast"
        self.head_seen = False
        self.calls.append((self.step, self.group, self.kind))
        return self.kind

    # ---- hook bodies -------------------------------------------------------------------
    def on_head(self, feat: torch.Tensor) -> Optional[torch.Tensor]:
        if self.kind is None or self.head_seen:
            return None
        self.head_seen = True
        if self.kind == "real":
            if self.shadow and self.cache.ready(self.group) and self.step >= self._warmup():
                pred = self.cache.predict(self.group, self.step).float()
                ref = feat.detach().float()
                err = float((pred - ref).norm() / ref.norm().clamp_min(1e-30))
                self.shadow_errors.append((self.step, self.group, err))
            self.cache.record(self.group, self.step, feat)
            return None
        return self.cache.predict(self.group, self.step)

    def _warmup(self) -> int:
        return getattr(self.config, "warmup_steps", 0)

    # ---- summaries ---------------------------------------------------------------------
    @property
    def nfe(self) -> int:
        """Real (block-running) calls of the current run, per group 0."""
        return sum(1 for _, g, k in self.calls if k == "real" and g == 0)


def _unwrap(obj) -> Tuple[nn.Module, Any]:
    """(transformer, scheduler or None) of a pipeline or a bare model."""
    if isinstance(obj, nn.Module):
        return obj, None
    model = getattr(obj, "transformer", None)
    if isinstance(model, nn.Module):
        return model, getattr(obj, "scheduler", None)
    raise ValueError(f"diffkern.spectrum: expected a diffusers pipeline with a `.transformer` or a "
                     f"torch.nn.Module, got {type(obj).__name__} (no `transformer` attribute)")


def enable(transformer_or_pipeline, config: Optional[Config] = None, *,
           blocks: Optional[Sequence[nn.Module]] = None, head: Optional[nn.Module] = None,
           passthrough: Optional[Callable[[tuple, dict], Any]] = None,
           timestep_arg: Optional[str] = "timestep", shadow: bool = False) -> SpectrumState:
    """Install Spectrum (or a FORA/TaylorSeer baseline config) on a transformer or pipeline.

    Args:
        transformer_or_pipeline: a supported diffusers transformer (``FluxTransformer2DModel``,
            ``SD3Transformer2DModel``, ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``), a
            pipeline holding one as ``.transformer``, or any ``nn.Module`` with ``blocks``/``head``.
        config: :class:`SpectrumConfig` (default), :class:`FORAConfig` or :class:`TaylorSeerConfig`.
        blocks, head, passthrough: generic adapter: the blocks in call order, the module that
            receives the last block's output as first argument, and ``passthrough(args, kwargs)``
            giving a skipped block's return value (default: its first argument).
        timestep_arg: name of the model's timestep argument, used to group calls into steps
            (``None``: every call is a step).
        shadow: on real steps, also forecast first and log the relative L2 error.

    Returns the :class:`SpectrumState` (also available as :func:`state`).
    """
    model, scheduler = _unwrap(transformer_or_pipeline)
    config = _checked_config(config)
    if getattr(model, _ATTR, None) is not None:
        disable(transformer_or_pipeline)
    st = SpectrumState(config, _checked_adapter(model, blocks, head, passthrough, timestep_arg), shadow=shadow)
    st._undo = [_wrap_forward(model, st), *_skip_blocks(st), _hook_head(st)]   # disable() undoes in reverse
    if scheduler is not None and hasattr(scheduler, "set_timesteps"):
        st._undo.append(_follow_scheduler(scheduler, st))
    setattr(model, _ATTR, st)
    return st


# ---- the steps of enable(); each patch returns its undo ------------------------------------

def _checked_config(config: Optional[Config]) -> Config:
    config = SpectrumConfig() if config is None else config
    if not isinstance(config, (SpectrumConfig, FORAConfig, TaylorSeerConfig)):
        raise TypeError(f"config: expected SpectrumConfig, FORAConfig or TaylorSeerConfig, got {type(config).__name__}")
    return config


def _checked_adapter(model: nn.Module, blocks, head, passthrough, timestep_arg) -> BlockAdapter:
    adapter = _adapter_for(model, blocks, head, passthrough, timestep_arg)
    if not adapter.blocks:
        raise ValueError(f"diffkern.spectrum.enable: {type(model).__name__} has an empty block list")
    for b in adapter.blocks:
        if not isinstance(b, nn.Module):
            raise TypeError(f"blocks: expected nn.Module entries, got {type(b).__name__}")
    if not isinstance(adapter.head, nn.Module):
        raise TypeError(f"head: expected an nn.Module, got {type(adapter.head).__name__}")
    return adapter


def _wrap_forward(model: nn.Module, st: SpectrumState) -> Callable[[], None]:
    """Step bookkeeping around the model's forward: which step and group a call is, real or
    forecast; a forecast call must have fed the head."""
    orig_forward = model.forward
    timestep_arg, head = st.adapter.timestep_arg, st.adapter.head
    t_index = None
    if timestep_arg is not None:
        params = list(inspect.signature(orig_forward).parameters)
        t_index = params.index(timestep_arg) if timestep_arg in params else None

    def forward(*args, **kwargs):
        t = None
        if timestep_arg is not None:
            if timestep_arg in kwargs:
                t = kwargs[timestep_arg]
            elif t_index is not None and t_index < len(args):
                t = args[t_index]
        kind = st.begin_call(_timestep_value(t))
        try:
            out = orig_forward(*args, **kwargs)
        finally:
            st.kind = None
        if kind == "forecast" and not st.head_seen:
            raise RuntimeError(f"diffkern.spectrum: the head {type(head).__name__} was not called "
                               "during a forecast step, so the skipped blocks were not replaced; the "
                               "adapter's head= is wrong for this model")
        return out

    model.forward = forward
    return lambda: model.__dict__.pop("forward", None)


def _skip_blocks(st: SpectrumState) -> List[Callable[[], None]]:
    """On forecast calls every block returns its input untouched (the adapter's passthrough)."""
    undo = []
    for block in st.adapter.blocks:
        block_forward = block.forward

        def patched(*args, __orig=block_forward, **kwargs):
            if st.kind == "forecast":
                return st.adapter.passthrough(args, kwargs)
            st.block_calls += 1
            return __orig(*args, **kwargs)

        block.forward = patched
        undo.append(lambda b=block: b.__dict__.pop("forward", None))
    return undo


def _hook_head(st: SpectrumState) -> Callable[[], None]:
    """The head's input is recorded on real calls and replaced by the forecast on the others."""
    def head_hook(module, args, kwargs):
        if args:
            feat = args[0]
            new = st.on_head(feat)
            return None if new is None else ((new,) + tuple(args[1:]), kwargs)
        name = next((k for k in ("hidden_states", "x", "input") if k in kwargs), None)
        if name is None:
            return None
        new = st.on_head(kwargs[name])
        return None if new is None else (args, {**kwargs, name: new})

    return st.adapter.head.register_forward_pre_hook(head_hook, with_kwargs=True).remove


def _follow_scheduler(scheduler, st: SpectrumState) -> Callable[[], None]:
    """A pipeline's ``set_timesteps`` starts a new run whose schedule fits its step count."""
    orig_set = scheduler.set_timesteps

    def set_timesteps(*args, **kwargs):
        result = orig_set(*args, **kwargs)
        timesteps = getattr(scheduler, "timesteps", None)
        st.new_run(len(timesteps) if timesteps is not None else None)
        return result

    scheduler.set_timesteps = set_timesteps
    return lambda: scheduler.__dict__.pop("set_timesteps", None)


def disable(transformer_or_pipeline) -> None:
    """Remove the hooks installed by :func:`enable` (no-op if none)."""
    model, _ = _unwrap(transformer_or_pipeline)
    st = getattr(model, _ATTR, None)
    if st is None:
        return
    for fn in reversed(st._undo):
        fn()
    delattr(model, _ATTR)


def state(transformer_or_pipeline) -> SpectrumState:
    model, _ = _unwrap(transformer_or_pipeline)
    st = getattr(model, _ATTR, None)
    if st is None:
        raise RuntimeError(f"diffkern.spectrum is not enabled on {type(model).__name__}")
    return st


def reset(transformer_or_pipeline, num_steps: Optional[int] = None) -> None:
    """Start a new sampling run (optionally with another step count: the schedule adapts)."""
    state(transformer_or_pipeline).new_run(num_steps)
