# Two entry points, both from a fresh clone:
#   make demo   create .venv, install Smalti, run the governed Shakespeare demo (keys, signed
#               taxonomy, tagged shards, verification, training, sampling)
#   make demo-finetune  the same governance on a Hugging Face Llama: BPE tokenizer, pretrain,
#               fine-tune with Hamlet in its own LoRA adapter, audit and deletion across the lineage
#   make test   create .venv, install Smalti with test extras, run the whole suite
# torch is pinned through constraints.txt to the CPU wheel on the build machines'
# local disk; pyproject.toml keeps the wide range users need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=
# The suite runs in two processes (pytest-xdist), one file per process at a time: nearly every test is
# single-threaded (bitwise comparisons pin one intra-op thread), so a second process uses the second core
# (three read no faster on 2 cores: docs/benchmarks.md, "The test suite").
# `make test PYTEST_WORKERS=0` runs it in one process.
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist loadfile)

.PHONY: demo demo-finetune install test test-fast lint bench browser go-interop softhsm clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files: reinstall only when the package metadata or the pins change.
$(VENV)/.core-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e .
	touch $@

# A team's own project: everything (README, "Use it on your own data").
install: | $(BIN)/python
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e ".[all]"
	@echo "installed; put it on your PATH: export PATH=\"$$PWD/$(BIN):\$$PATH\""

$(VENV)/.test-installed: $(VENV)/.core-installed
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,mlflow,vision,hf]"
	touch $@ $(VENV)/.hf-installed

# The governed demo, step by step as a user would do it. Each step is a file target, so a
# second `make demo` reuses what exists (and training resumes). `rm -rf demo` starts over.
DEMO := demo
T := $(BIN)/smalti

$(DEMO)/keys/trainer.pub: | $(VENV)/.core-installed
	@echo "== 1. one Ed25519 key pair per authority"
	for name in data-governance gutenberg-tagger model-risk trainer auditor; do \
		$(T) keys new $$name --dir $(DEMO)/keys || exit 1; done

$(DEMO)/taxonomy.yaml.sig: $(DEMO)/keys/trainer.pub
	@echo "== 2. the taxonomy: one class per work under its genre, signed by data governance"
	$(T) taxonomy init $(DEMO)/taxonomy.yaml --force --name shakespeare \
		--classes-from data/shakespeare/manifest.csv --class-template 'gutenberg/{genre}/{work}' \
		--data-governance $(DEMO)/keys/data-governance.pub \
		--tagger gutenberg-tagger=$(DEMO)/keys/gutenberg-tagger.pub:gutenberg \
		--model-risk $(DEMO)/keys/model-risk.pub --trainer $(DEMO)/keys/trainer.pub \
		--auditor auditor=$(DEMO)/keys/auditor.pub \
		--deletable gutenberg/tragedy/hamlet
	$(T) sign $(DEMO)/taxonomy.yaml --key $(DEMO)/keys/data-governance.key

$(DEMO)/dataset/manifest.json: $(DEMO)/taxonomy.yaml.sig
	@echo "== 3. tag every example and write signed shards"
	$(T) data prepare --source data/shakespeare --class-template 'gutenberg/{genre}/{work}' \
		--taxonomy $(DEMO)/taxonomy.yaml --trust $(DEMO)/keys/data-governance.pub \
		--key $(DEMO)/keys/gutenberg-tagger.key --out $(DEMO)/dataset --name shakespeare --overwrite

$(DEMO)/policy.yaml.sig: $(DEMO)/dataset/manifest.json recipes/governance/shakespeare-policy.yaml
	@echo "== 4. bind the routing policy to this taxonomy and model (prints who may update what, when); model risk signs it"
	$(T) policy check recipes/governance/shakespeare-policy.yaml --recipe recipes/shakespeare.yaml --bind $(DEMO)/policy.yaml
	$(T) sign $(DEMO)/policy.yaml --key $(DEMO)/keys/model-risk.key

demo: $(DEMO)/policy.yaml.sig
	@echo "== 5. verify every signature, shard and example"
	$(T) data verify $(DEMO)/dataset --taxonomy $(DEMO)/taxonomy.yaml --trust $(DEMO)/keys/data-governance.pub
	@echo "== 6. train from the signed dataset under the signed policy (rerun to resume)"
	$(T) train recipes/shakespeare.yaml --run-dir $(DEMO)/run
	@echo "== 7. sample: the shared model, then with Hamlet's adapter switched on"
	$(T) sample $(DEMO)/run --prompt "ROMEO:" --tokens 300
	$(T) sample $(DEMO)/run --prompt "HAMLET." --tokens 300 --adapter gutenberg/tragedy/hamlet
	@echo "== 8. audit: verify the ledger against the trainer key; who reached the embedding; the HTML report"
	$(T) ledger verify $(DEMO)/run --pubkey $(DEMO)/keys/trainer.pub
	$(T) audit $(DEMO)/run --layer tok_emb --pubkey $(DEMO)/keys/trainer.pub
	$(T) audit $(DEMO)/run --class gutenberg/tragedy/hamlet --pubkey $(DEMO)/keys/trainer.pub
	$(T) audit $(DEMO)/run --report $(DEMO)/report.html --pubkey $(DEMO)/keys/trainer.pub
	@echo "== 9. forget Hamlet: the plan from the ledger, then ablation of its confined adapter, a signed certificate, per-class losses"
	$(T) forget $(DEMO)/run --class gutenberg/tragedy/hamlet --dry-run
	rm -rf $(DEMO)/run-without-hamlet
	$(T) forget $(DEMO)/run --class gutenberg/tragedy/hamlet --mode ablate --out $(DEMO)/run-without-hamlet --eval-samples 2000
	$(T) ledger verify $(DEMO)/run-without-hamlet --pubkey $(DEMO)/keys/trainer.pub
	@echo "== 10. an auditor reads it: serve the demo's runs read-only (docs/auditing.md), then sign in to the web UI"
	@echo "   with a one-time code signed on the auditor's machine (the key never enters the browser):"
	@echo "   $(PIP) install -e '.[serve]' && $(T) serve $(DEMO) --taxonomy $(DEMO)/taxonomy.yaml --trust $(DEMO)/keys/data-governance.pub"
	@echo "   $(T) auditor sign-in http://127.0.0.1:8700 --key $(DEMO)/keys/auditor.key --open"

$(VENV)/.hf-installed: $(VENV)/.core-installed
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e ".[hf]"
	touch $@

# The fine-tuning demo: a Hugging Face Llama-architecture model, a BPE tokenizer, a pretrain and a
# governed fine-tune linked by lineage, then deletion by ablation and by exact replay.
# `rm -rf demo-finetune` starts over.
FT := demo-finetune
HAMLET := gutenberg/tragedy/hamlet
MACBETH := gutenberg/tragedy/macbeth

$(FT)/keys/trainer.pub: | $(VENV)/.hf-installed
	@echo "== 1. one Ed25519 key pair per authority"
	for name in data-governance gutenberg-tagger model-risk trainer; do \
		$(T) keys new $$name --dir $(FT)/keys || exit 1; done

$(FT)/taxonomy.yaml.sig: $(FT)/keys/trainer.pub
	@echo "== 2. the taxonomy: one class per work under its genre, signed by data governance"
	$(T) taxonomy init $(FT)/taxonomy.yaml --force --name shakespeare \
		--classes-from data/shakespeare/manifest.csv --class-template 'gutenberg/{genre}/{work}' \
		--data-governance $(FT)/keys/data-governance.pub \
		--tagger gutenberg-tagger=$(FT)/keys/gutenberg-tagger.pub:gutenberg \
		--model-risk $(FT)/keys/model-risk.pub --trainer $(FT)/keys/trainer.pub
	$(T) sign $(FT)/taxonomy.yaml --key $(FT)/keys/data-governance.key

$(FT)/tokenizer/tokenizer.json: $(FT)/taxonomy.yaml.sig
	@echo "== 3. a byte-level BPE tokenizer (Hugging Face tokenizers) trained on the corpus"
	$(T) tokenizer train --source data/shakespeare --class-template 'gutenberg/{genre}/{work}' \
		--vocab-size 2048 --out $(FT)/tokenizer

$(FT)/dataset/manifest.json: $(FT)/tokenizer/tokenizer.json
	@echo "== 4. tokenize, pack each class's documents into rows, tag and sign the shards"
	$(T) data prepare --source data/shakespeare --class-template 'gutenberg/{genre}/{work}' \
		--taxonomy $(FT)/taxonomy.yaml --trust $(FT)/keys/data-governance.pub \
		--key $(FT)/keys/gutenberg-tagger.key --out $(FT)/dataset --name shakespeare-bpe \
		--tokenizer $(FT)/tokenizer --seq-len 128 --overwrite

$(FT)/policy.yaml.sig: $(FT)/dataset/manifest.json recipes/governance/finetune-policy.yaml
	@echo "== 5. bind the fine-tune's policy (Hamlet only in its LoRA adapter) to the model; model risk signs it"
	$(T) policy check recipes/governance/finetune-policy.yaml --recipe recipes/finetune-tragedies.yaml --bind $(FT)/policy.yaml
	$(T) sign $(FT)/policy.yaml --key $(FT)/keys/model-risk.key

demo-finetune: $(FT)/policy.yaml.sig
	@echo "== 6. pretrain a small Llama on the comedies and histories (ledger on)"
	$(T) train recipes/finetune-base.yaml --run-dir $(FT)/base
	@echo "== 7. fine-tune it on the tragedies from its signed final weights, Hamlet confined to its LoRA adapter"
	$(T) train recipes/finetune-tragedies.yaml --run-dir $(FT)/tragedies --init-from $(FT)/base
	$(T) sample $(FT)/tragedies --prompt "HAMLET." --tokens 60 --adapter $(HAMLET)
	@echo "== 8. audit across the chain: both ledgers and the link; what the comedies taught, inherited from the base"
	$(T) ledger verify $(FT)/tragedies --pubkey $(FT)/keys/trainer.pub
	$(T) audit $(FT)/tragedies --class $(HAMLET) --pubkey $(FT)/keys/trainer.pub
	$(T) audit $(FT)/tragedies --class gutenberg/comedy/twelfth_night --pubkey $(FT)/keys/trainer.pub
	@echo "== 9. forget Hamlet by ablation (its adapter), Macbeth exactly (replay of the fine-tune); verify both"
	rm -rf $(FT)/without-hamlet $(FT)/without-macbeth $(FT)/without-macbeth.lineage
	$(T) forget $(FT)/tragedies --class $(HAMLET) --mode ablate --out $(FT)/without-hamlet
	$(T) ledger verify $(FT)/without-hamlet --pubkey $(FT)/keys/trainer.pub
	$(T) forget $(FT)/tragedies --class $(MACBETH) --dry-run
	$(T) forget $(FT)/tragedies --class $(MACBETH) --mode exact --out $(FT)/without-macbeth
	$(T) ledger verify $(FT)/without-macbeth --pubkey $(FT)/keys/trainer.pub
	rm -rf $(FT)/export
	$(T) export $(FT)/without-macbeth --out $(FT)/export

# The audit report's test renders it in headless Chromium (Debian's package; installed here when
# apt-get can, as CI's root can). Without it that one test fails in `make test` rather than skipping.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) \
		|| echo "warning: could not install chromium"; }

# The transparency-log interop tests check Smalti's checkpoints, tiles and proofs with the Go project's own
# code (golang.org/x/mod/sumdb/note and sumdb/tlog: Debian's golang-go and golang-golang-x-mod-dev), installed
# here the same way; without them those tests fail rather than skip.
go-interop:
	@{ command -v go >/dev/null 2>&1 && test -d /usr/share/gocode/src/golang.org/x/mod/sumdb; } || { \
		command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -qq golang-go golang-golang-x-mod-dev >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq golang-go golang-golang-x-mod-dev >/dev/null)) \
		|| echo "warning: could not install Go and golang.org/x/mod"; }

# Keys in a hardware token are tested against SoftHSM2, a real PKCS#11 token (Debian's softhsm2).
softhsm:
	@command -v softhsm2-util >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -qq softhsm2 >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq softhsm2 >/dev/null)) \
		|| echo "warning: could not install softhsm2"; }

# pytest exits 5 when it collects nothing; make treats that as the failure it is. The slowest 15 tests are
# printed at the end, so the suite's cost stays in view (its budget: 18 minutes on the 2-core build machine).
test: lint browser go-interop softhsm
	SMALTI_REQUIRE_BROWSER=1 $(BIN)/python -m pytest $(XDIST) --durations=15 $(PYTEST_ARGS)

# Lint (ruff: pyflakes and a few bug patterns), formatting (ruff format) and types (mypy) of smalti/, as
# pyproject.toml configures them; `make test` runs this first.
lint: $(VENV)/.test-installed
	$(BIN)/ruff check smalti tests benchmarks
	$(BIN)/ruff format --check smalti
	$(BIN)/mypy

test-fast: $(VENV)/.test-installed
	$(BIN)/python -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs demo demo-finetune .pytest_cache
