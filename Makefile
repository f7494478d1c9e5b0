# keyd — see README.md. `make run` starts keyd on its embedded default;
# `make test` installs what the tests need and runs every test.

GO        ?= go
BIN       := bin/keyd
GOTOOL    := $(GO) tool -modfile=tools/go.mod
# make test fuzzes each target for a number of inputs, not a time: a
# time-bounded run can end in a spurious "context deadline exceeded" when the
# deadline falls during the engine's own bookkeeping on a loaded machine.
FUZZTIME  ?= 100000x
# Fuzz targets as package:Target. `make test` runs each for FUZZTIME,
# `make fuzz` for FUZZ_LONG.
FUZZ_TARGETS := \
	./internal/policy:FuzzPrepare \
	./internal/policy:FuzzNormalizeHTU \
	./internal/policy:FuzzParseObjectDifferential \
	./internal/jws:FuzzEncodeSignature \
	./internal/jws:FuzzSplitSigningInput \
	./internal/jws:FuzzJWKUnmarshal \
	./internal/ecdsasig:FuzzRaw \
	./internal/ecdsasig:FuzzDER \
	./internal/server:FuzzSign \
	./internal/jsonstr:FuzzAppend \
	./keystore/pkcs11:FuzzParseURI \
	./keystore/tpm:FuzzDecodeKey \
	./keystore/tpm:FuzzSignResponse \
	./internal/config:FuzzParse
FUZZ_LONG ?= 60s

.PHONY: all build run run-softhsm run-swtpm deps e2e-deps test unit fuzz-short fuzz bench generate lint check-generated clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/keyd

## run: build and start keyd on the embedded default (soft keystore, key set "dpop")
run: build
	./$(BIN) serve

## run-softhsm / run-swtpm: keyd on a fresh SoftHSM2 token / a fresh swtpm
run-softhsm: build
	./softhsm-test/run-keyd.sh softhsm

run-swtpm: build
	./softhsm-test/run-keyd.sh swtpm

## test: everything CI runs. The backends' suites need a real SoftHSM2 token
## and a real swtpm: deps installs them (Debian packages, idempotent) and
## KEYD_REQUIRE_HW=1 makes a missing one fail the run instead of skipping.
## The end-to-end suite (e2e/) needs Node.js and the authorization server's
## npm packages: e2e-deps installs them from the lockfile, and
## KEYD_REQUIRE_E2E=1 makes a missing Node fail the run.
test: deps lint unit fuzz-short

deps: e2e-deps
	./softhsm-test/install-softhsm.sh
	./softhsm-test/install-swtpm.sh

## e2e-deps: e2e/node_modules from e2e/package-lock.json (npm ci), skipped
## when it was installed from this very lockfile.
E2E_STAMP := e2e/node_modules/.keyd-package-lock.json
e2e-deps:
	@command -v npm >/dev/null || { echo "e2e-deps: npm not found: the end-to-end tests need Node.js >= 20.19 and npm"; exit 1; }
	@if cmp -s e2e/package-lock.json $(E2E_STAMP); then \
	  echo "e2e/node_modules is up to date with e2e/package-lock.json"; \
	else \
	  cd e2e && npm ci --no-audit --no-fund && cp package-lock.json node_modules/.keyd-package-lock.json; \
	fi

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

unit:
	KEYD_REQUIRE_HW=1 KEYD_REQUIRE_E2E=1 $(GO) test -race -count=1 ./...

fuzz-short:
	@set -e; for t in $(FUZZ_TARGETS); do \
	  pkg=$${t%%:*}; name=$${t##*:}; \
	  echo "fuzz $$pkg $$name for $(FUZZTIME)"; \
	  $(GO) test -run='^$$' -fuzz="^$$name$$" -fuzztime=$(FUZZTIME) $$pkg; \
	done

fuzz:
	$(MAKE) fuzz-short FUZZTIME=$(FUZZ_LONG)

## bench: keyd vs. in-process signing vs. bare gRPC, in one run
bench: build
	$(GO) run ./bench

## generate: regenerate the protobuf code with the pinned tools
generate:
	$(GOTOOL) buf lint
	$(GOTOOL) buf generate

## check-generated: fail if the committed protobuf code differs from what generate makes
check-generated: generate
	@git diff --exit-code -- proto || { echo "the generated protobuf code is out of date: run make generate and commit"; exit 1; }

clean:
	rm -rf bin
