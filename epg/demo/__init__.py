"""The whole pipeline on the embedded MNIST digits, the library of `epg demo` (:mod:`epg.commands.demo`).

- :mod:`epg.demo.stages` — the demo configs, and the two training stages as `epg fit` subprocesses (skip, resume).
- :mod:`epg.demo.evaluate` — the stage-1 k-NN check and the stage-2 grid, FID and class accuracy.
- :mod:`epg.demo.pipeline` — :class:`~epg.demo.pipeline.DemoSettings` and :func:`~epg.demo.pipeline.run_demo`,
  the steps in order with their timings and the JSON summary.
"""
