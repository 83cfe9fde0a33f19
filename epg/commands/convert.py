"""`epg convert`: an official EPG checkpoint → an EPG network file that `epg sample`/`epg fid` accept."""

from __future__ import annotations

import argparse
import sys

from epg.checkpoint import save_network_file
from epg.method.denoiser import PARAMETERIZATIONS
from epg.nn.official import CheckpointMismatchError, load_official_network
from epg.nn.presets import PRESETS


def main(argv: list[str] | None = None) -> int:
    """Convert a released checkpoint; exit 2 with a one-line message on bad input."""
    parser = argparse.ArgumentParser(prog="epg convert", description=__doc__)
    parser.add_argument("source", help="official checkpoint (.pth/.pt; may wrap 'nnet_ema'/'state_dict'/'model')")
    parser.add_argument("output", help="where to write the EPG network file")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="architecture of the checkpoint")
    parser.add_argument("--parameterization", default="x0", choices=PARAMETERIZATIONS, help="x0: DM, edm: CM")
    parser.add_argument("--normalization", default="imagenet", choices=("imagenet", "simple"))
    args = parser.parse_args(argv)
    try:
        network = load_official_network(args.source, args.preset)
    except (FileNotFoundError, CheckpointMismatchError) as err:
        print(f"epg convert: {err}", file=sys.stderr)
        return 2
    save_network_file(args.output, network, args.parameterization, args.normalization)
    n = sum(p.numel() for p in network.parameters())
    print(f"wrote {args.output}: {args.preset}, {n / 1e6:.1f}M parameters, parameterization {args.parameterization}")
    return 0
