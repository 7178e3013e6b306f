"""The decode benchmark (sam_viz.benchmarks.decode), as a script: `python -m bench.decode [--quick] [--json]`,
the same as `python -m sam_viz bench decode`."""
import sys

from sam_viz.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
