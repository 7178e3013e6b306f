"""The kernel benchmark (sam_viz.benchmarks.kernels), as a script: `python -m bench.kernels [--quick] [--json]`,
the same as `python -m sam_viz bench kernels`; with --input, the input kernel's (sam_viz.benchmarks.input_kernels)."""
import sys

from sam_viz.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", *sys.argv[1:]]))
