# The two commands a fresh machine needs: `make demo` (set up, then run the main job on a
# tiny local MoE model) and `make test`.
.PHONY: setup demo test

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup scripts/build-llama
	scripts/setup
	touch $@

demo: setup
	.venv/bin/moeprep demo --out demo

test: setup
	scripts/test
