"""``python -m sp_pipeline.collector``: the same as ``sp-pipeline collector``."""

import argparse
import sys

from . import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m sp_pipeline.collector")
add_arguments(parser)
sys.exit(main(parser.parse_args()))
