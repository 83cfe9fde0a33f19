"""Evaluation (METHOD.md §8): FID, sFID, IS, KID and precision/recall with a TF-compatible Inception-v3.

- :mod:`epg.eval.inception_weights` — offline Inception weights (`ensure_inception_weights()`), no network needed.
- :mod:`epg.eval.metrics` — image sources, Inception features, the metrics, `format_comparison` for label modes.
- :mod:`epg.eval.reference` — reference statistics of a real set (`compute_reference`, `load_reference`).
- :mod:`epg.eval.reference_fid` — torchmetrics' FID against reference statistics, summed over DDP ranks.
- :mod:`epg.eval.callback` — `InLoopFID`, the in-loop FID callback.
- :mod:`epg.eval.cli` — `epg fid weights | ref | calc | gen`.

Nothing is imported here, so `import epg.eval` stays cheap.
"""
