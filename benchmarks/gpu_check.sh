#!/usr/bin/env bash
# The GPU check of issue 9, for a machine lent for minutes: the gpu-marked tests (the triton
# recurrence compiled on CUDA against eager, its CUDA-graph fallback, CUDA vs CPU layers), then
# per-step times at N=512, B=128 and B=32 of KRU (triton, eager) next to cuDNN nn.RNN/nn.LSTM,
# with the card named. Run from the repository root: benchmarks/gpu_check.sh
#   PYTHON=...      the interpreter (default: .venv/bin/python, else python3)
#   STEPS=100 REPS=10   timing sequence length and repetitions
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
# The compiled kernels, not Triton's interpreter.
unset TRITON_INTERPRET
"$python" - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device"
import triton
print("card:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
PY
status=0
timeout 420 "$python" -m pytest -q -m gpu -p no:cacheprovider \
  tests/core/test_recurrence_triton.py tests/core/test_kru.py || status=$?
timeout 300 "$python" benchmarks/gpu_recurrence.py --hidden 512 --batches 128 32 \
  --steps "${STEPS:-100}" --reps "${REPS:-10}" || status=$?
exit $status
