"""Argparse front ends of the `epg` tools (registered in :data:`epg.cli.TOOLS`)."""
