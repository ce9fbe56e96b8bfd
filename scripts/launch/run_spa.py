"""Entry point for `accelerate launch ... scripts/launch/run_spa.py RECIPE [--key value ...]`."""

import sys

from selfie.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
