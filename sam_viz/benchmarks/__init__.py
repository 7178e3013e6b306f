"""The benchmarks that the app's Speed page and `python -m sam_viz bench` run: `kernels` (one sparse
MLP against dense and the bandwidth floor) and `decode` (greedy tokens/s of a random Llama, dense vs
sparse). Library code: they return rows and report lines and print nothing; bench/ holds thin
scripts over them."""
