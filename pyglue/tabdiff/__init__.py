"""TabDiff (Shi et al., ICLR 2025): mixed-type tabular diffusion with learnable per-column
schedules, a stochastic sampler and classifier-free-guided imputation, behind a pandas API.

    from diffkern.tabdiff import TabDiffSynthesizer, datasets
    train, test = datasets.load_adult()
    synth = TabDiffSynthesizer().fit(train, target="income")
    fake = synth.sample(len(train), seed=0)
    filled = synth.impute(test.assign(income=None))

Several processes: ``fit(train, nproc=4)``, ``sample(n, nproc=4, batch_size=n // 4)``, or
``diffkern tabdiff fit train.csv -o m.tabdiff --nproc 4`` (the same as
``torchrun --nproc_per_node=4 -m diffkern.tabdiff fit train.csv -o m.tabdiff``): DDP over gloo,
the loss trajectory of one process to float rounding, the sampled table bit for bit
(:mod:`~diffkern.tabdiff.distributed`).

Layout: ``schema`` / ``transforms`` (pandas <-> tensors) -> ``diffusion`` (schedules, loss) and
``network`` (the denoiser) -> ``training`` (loop, EMA, checkpoints) and ``sampler`` (the loop
around the ``tabdiff_*`` operators of :mod:`diffkern.ops.tabdiff`) -> ``synthesizer`` (the API);
``distributed`` (process groups, DDP, sharding), ``evaluate``, ``datasets``, ``demo`` and ``cli``
around them. ``forecasting``: ``sample(..., forecast=SpectrumConfig())`` skips the denoiser's trunk
on forecast steps (Spectrum, TaylorSeer, FORA from :mod:`diffkern.forecast`).

Deviations from the official code (MinkaiXu/TabDiff), each deliberate:

* **CPU default config.** ``TabDiffConfig()`` is dim_t 256 (official 1024), batch 1024 (4096),
  300 epochs (8000), EMA after every optimiser step (official: once per epoch) with the usual
  warm-up ``min(decay, (1 + u) / (10 + u))`` (official: none); without it a short run keeps most of
  the random initialisation and the categorical marginals come out flattened toward uniform.
  ``TabDiffConfig.paper()`` restores the official sizes, epochs and per-epoch EMA (the warm-up
  stays: after 3,000 updates it equals the official decay).
* **No best-checkpoint selection.** The official trainer saves the EMA weights with the best
  full-training-set loss after epoch 4000; here the final EMA weights are used, so a resumed run and an uninterrupted one end identical.
* **Missing values are modelled.** Official: numerical NaN mean-filled, categorical NaN a level.
  Here a numerical NaN becomes a "<name> (missing)" categorical companion plus a fill drawn from
  the column's quantiles, so NaN rates come back; imputed cells never take the missing value.
* **Types come back.** Integer columns are rounded and every numerical column clipped to its
  training range (``round_integers`` / ``clip``); datetimes go through an epoch and come back at
  their resolution; official TabDiff leaves integers fractional and has no datetimes.
* **No [CLS] token** in the tokenizer: the official builds one and drops it (identical outputs).
* **Counter-based randomness.** The sampler draws from Philox keyed by (seed, step, row, column),
  so a table depends on (model, seed, rows, steps) only, not on the batch size (up to float
  rounding: the CPU kernels round a row differently in batches of different shapes; splitting
  the rows among processes along the batches is bit-exact); the sampler tables
  (noise levels, masking rates per step) are computed in float64.
* **Quantile transform** reimplemented (sklearn's algorithm, all rows, no subsampling): sklearn is
  not needed at run time and the fitted quantiles live in the artifact.
* **One artifact** (safetensors + JSON metadata) holds weights, schedules, transforms and schema;
  the official code pickles a config and re-fits its preprocessors from the data.
"""

from .config import TabDiffConfig
from .schema import ColumnSpec, SchemaError, detect_schema
from .synthesizer import TabDiffSynthesizer
from .shipped import load_shipped

__all__ = ["ColumnSpec", "SchemaError", "TabDiffConfig", "TabDiffSynthesizer", "detect_schema", "load_shipped"]
