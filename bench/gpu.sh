#!/usr/bin/env bash
# The CUDA tests and the GPU benchmarks in one go, on a lent GPU machine that reaches no network, in
# under 8 minutes (bench/README.md, "On a lent GPU"):
#   bash bench/gpu-wheels.sh      # here, first: the wheels that machine lacks, into .whl/
#   bash bench/gpu.sh [OUT_DIR]   # there, with .whl carried; OUT_DIR: $OUT, else bench/results
#   GPU_SH_SMOKE=1 GPU_SH_WHEELS=/tmp/whl bash bench/gpu.sh /tmp/smoke   # here: every step, tiny, on the CPU
# Builds the project's wheel there from the tree, installs it and the carried wheels into /tmp/site,
# checks CUDA, then runs: the tests marked `gpu`, while a 2.9B-shaped random RWKV-7 (32 x 2560,
# text-safe, no newline tokens) is written; the engine benchmark on it in fp16 at 1, 32, 128 and 256
# streams with 4096-token prefills, the CUDA allocator's peak per level and the snapshot cache's use;
# the serving benchmark at 1, 32, 128 and 256 users in both dialects; a summary table last. Each step
# runs under its own time limit, all within GPU_SH_BUDGET_S (450 s, and 20 more for the summary); a
# step that fails or runs out of time does not stop the next ones, and the exit status is 1 if any
# did. Writes 7 files to OUT_DIR: gpu-TAG.log (everything printed), gpu-TAG-tests.xml,
# engine-TAG.json/.png, serving-TAG.json/.png and gpu-TAG-summary.md (TAG: 32x2560-cuda-fp16).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:-${OUT:-bench/results}}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1
start=$SECONDS
budget=${GPU_SH_BUDGET_S:-450}
py=${GPU_SH_PYTHON:-python3}
wheels=${GPU_SH_WHEELS:-.whl}
site=${GPU_SH_SITE:-/tmp/site}
models=${GPU_SH_MODELS:-/tmp/bench-gpu}

if [ "${GPU_SH_SMOKE:-0}" = 1 ]; then
  # The same steps on a tiny model on the CPU: proves the install, the imports and every command line.
  shape=2x128 strategy="cpu fp32" levels=1,2 tokens=8 prefill=4096 prefill_levels=1 reply=8
else
  shape=32x2560 strategy="cuda fp16" levels=1,32,128,256 tokens=64 prefill=4096 prefill_levels=1,32 reply=128
fi
tag="$shape-${strategy// /-}"
exec > >(tee "$out/gpu-$tag.log") 2>&1
tee_pid=$!
# On every way out: close the log and let tee write its last lines before the files are collected.
trap 'exec >&- 2>&-; wait "$tee_pid"' EXIT
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1

steps=()
failed=0
# step NAME LIMIT_S COMMAND...: run COMMAND under `timeout`, within what is left of the budget.
step() {
  local name=$1 limit=$2 rc t0=$SECONDS
  shift 2
  local left=$((budget - (SECONDS - start)))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    echo "== $name: skipped, the time budget is spent"
    steps+=("$name=skipped:0")
    failed=1
    return
  fi
  local command="$*"
  command=${command//$'\n'/ }
  echo "== $name (at most ${limit} s, $((SECONDS - start)) s in): ${command:0:300}"
  timeout -k 10 "$limit" "$@"
  rc=$?
  ((rc == 124 || rc == 137)) && echo "== $name: stopped at its limit of $limit s"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  steps+=("$name=$rc:$((SECONDS - t0))")
  ((rc == 0)) || failed=1
}

# The project as a wheel, built from a clean copy of the build's inputs (tests/test_packaging.py names
# them) by the machine's own setuptools, offline: the wheel maps migrations/ to rwkv_gateway.migrations,
# which src/ on the path alone does not.
build=$site.build
rm -rf "$build" && mkdir -p "$build/source"
tar --exclude=__pycache__ --exclude='*.egg-info' -cf - pyproject.toml README.md src migrations |
  tar -xf - -C "$build/source"
step build 120 "$py" -m pip wheel -q --no-deps --no-index --no-build-isolation -w "$build/dist" \
  "$build/source"
shopt -s nullglob
carried=("$wheels"/*.whl)
((${#carried[@]})) ||
  echo "no wheels in $wheels (bash bench/gpu-wheels.sh makes them): the rest must be on $py already"
step install 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" "$build"/dist/*.whl "${carried[@]}"
# Only the installed copies: where the image has an older one (typing-extensions, anyio), ours wins.
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$site/bin:$PATH"

# What runs: versions (the image's included, for the record), the GPU, and every module the server
# imports.
step environment 60 "$py" -c '
import importlib.metadata as md, sys, torch
print(f"python {sys.version.split()[0]} at {sys.executable}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
names = """numpy tokenizers rwkv fastapi starlette pydantic pydantic-core anyio typing-extensions sqlalchemy
    uvicorn httpx click h11 typer prometheus-client pytest pytest-asyncio pytest-timeout matplotlib"""
print("; ".join(f"{n} {md.version(n)}" for n in names.split()))
import rwkv_gateway.app, rwkv_gateway.cli
'
# The carried wheels' requirements that the image meets at the wrong version, if any (other lines of
# `pip check` are the image's own business).
names=$(printf '%s\n' "${carried[@]##*/}" rwkv_gateway | cut -d- -f1 | sed 's/[-_.]/[-_.]/g' | paste -sd'|')
timeout 60 "$py" -m pip check 2>&1 | grep -iE "(^| )($names)([^a-z0-9_-]|$)" ||
  echo "pip check: nothing wrong with the carried wheels' requirements"
if [ "${GPU_SH_SMOKE:-0}" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if ! "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA device: the GPU steps cannot run"
    exit 1
  fi
fi

# The model, on the CPU, while the tests use the GPU; no newline tokens (bench/spawn.py), so role-play
# replies run their full length and N users stay N decoding rows.
mkdir -p "$models"
rm -f "$models/$shape.path"
step model 200 "$py" -c '
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from spawn import write_model
path = write_model(sys.argv[1], Path(sys.argv[2]), newlines=False)
Path(sys.argv[2], sys.argv[1] + ".path").write_text(str(path))
print(f"model: {path} ({path.stat().st_size / 2**30:.2f} GiB)")
' "$shape" "$models" &
model_job=$!

# The tests marked `gpu` (skipped without CUDA), with pyproject's pytest settings and only the plugins
# those settings need (the image has others).
mapfile -t gpu_tests < <(grep -rlE 'pytest\.mark\.gpu' tests --include='test_*.py' | sort)
step tests 150 env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$py" -m pytest -q -p no:cacheprovider \
  -p pytest_asyncio.plugin -p pytest_timeout -m gpu --junitxml="$out/gpu-$tag-tests.xml" "${gpu_tests[@]}"
wait "$model_job"
# `step model` ran in a subshell of its own: its status line is in the log, its result is the file.
if model=$(cat "$models/$shape.path" 2>/dev/null); then
  steps+=("model=0:-")
else
  steps+=("model=1:-")
  failed=1
fi

step engine 150 "$py" bench/engine.py --model "$model" --strategy "$strategy" --concurrency "$levels" \
  --tokens "$tokens" --prefill-tokens "$prefill" --prefill-concurrency "$prefill_levels" \
  --state-cache-mb 1024 --report-memory --no-package-baseline --out "$out/engine-$tag.json"

step serving 270 "$py" bench/serving.py --model "$model" --strategy "$strategy" --users "$levels" \
  --dialects openai,roleplay --reply-tokens "$reply" --forward-seconds 2 --out "$out/serving-$tag.json"

budget=$((budget + 20)) # the summary may use a little past the budget
step summary 20 "$py" bench/gpu_summary.py "$out" "$tag" "${steps[@]}"
outcome="every step passed"
[ "$failed" = 0 ] || outcome="a step failed"
echo "gpu.sh: $((SECONDS - start)) s; $outcome"
exit "$failed"
