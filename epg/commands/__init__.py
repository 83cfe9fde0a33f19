"""The argparse front ends of the `epg` tools: each module is a thin ``main(argv)`` that parses its command line and
calls library code (the LightningCLI subcommands are :mod:`epg.lightning.cli`; the dispatcher is :mod:`epg.cli`).

``prepare`` (:mod:`epg.data.prepare`), ``sample`` (:class:`epg.sampling.run.SampleRun`), ``fid`` and ``fid sweep``
(:mod:`epg.eval`, :class:`epg.eval.sweep.Sweep`), ``convert`` (:mod:`epg.nn.official`), ``bench``
(:mod:`epg.bench`), ``demo`` (:mod:`epg.demo`) and ``ema`` (:mod:`epg.posthoc`). The library never imports this
package.
"""
