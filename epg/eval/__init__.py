"""Evaluation (method.md §8): FID, sFID, IS, KID and precision/recall with a TF-compatible Inception-v3.

Modules, each importing only from those above it:

- :mod:`epg.eval.errors` — `EvalInputError`, `LogitsUnavailableError`.
- :mod:`epg.eval.inception_weights` — offline Inception weights (`ensure_inception_weights()`), no network needed.
- :mod:`epg.eval.readers` — image sources (arrays, folders, ADM .npz, WebDataset shards) as uint8 batches.
- :mod:`epg.eval.inception` — `InceptionFeatures` (IEEE convolutions on CUDA), `extract_features`, `pool_features`.
- :mod:`epg.eval.distances` — the metric math on features/statistics: Fréchet distance, IS, KID, precision/recall.
- :mod:`epg.eval.reference` — reference statistics of a real set (`compute_reference`, `load_reference`,
  `cached_reference`).
- :mod:`epg.eval.metrics` — `compute_metrics`/`score` of sample features against a reference.
- :mod:`epg.eval.tables` — result tables.
- :mod:`epg.eval.reference_fid` — torchmetrics' FID against reference statistics, summed over DDP ranks.
- :mod:`epg.eval.sweep` — in-memory sampling split over ranks, sweep rows and results, `Sweep` (`epg fid sweep`).
- :mod:`epg.eval.callback` — `InLoopFID`, the in-loop FID callback.
- :mod:`epg.eval.knn` — the k-NN accuracy of stage-1 CLS features (`knn_accuracy`, `eval_loader`, `bank_shards`).

The command lines `epg fid weights | ref | calc | sweep | gen` are :mod:`epg.commands.fid` and
:mod:`epg.commands.fid_sweep`.

Nothing is imported here, so `import epg.eval` stays cheap.
"""
