"""The command front ends of `epg`: the LightningCLI of ``fit``, ``validate``, ``predict`` (:mod:`epg.commands.train`,
its config checks :mod:`epg.commands.config_checks`) and the argparse tools, each a thin ``main(argv)`` that parses
its command line and calls library code; the dispatcher is :mod:`epg.cli`.

``prepare`` (:mod:`epg.data.prepare`), ``sample`` (:class:`epg.sampling.run.SampleRun`), ``fid`` and ``fid sweep``
(:mod:`epg.eval`, :class:`epg.eval.sweep.Sweep`), ``convert`` (:mod:`epg.nn.official`), ``bench``
(:mod:`epg.bench`), ``demo`` (:mod:`epg.demo`) and ``ema`` (:mod:`epg.posthoc`). The library never imports this
package.
"""
