# keyd — see README.md. `make run` starts keyd on its embedded default;
# `make test` installs what the tests need and runs every test.

GO        ?= go
BIN       := bin/keyd
GOTOOL    := $(GO) tool -modfile=tools/go.mod
FUZZTIME  ?= 8s
# Fuzz targets as package:Target. `make test` runs each for FUZZTIME,
# `make fuzz` for FUZZ_LONG.
FUZZ_TARGETS := \
	./internal/policy:FuzzPrepare \
	./internal/policy:FuzzNormalizeHTU \
	./internal/jws:FuzzEncodeSignature \
	./internal/jws:FuzzSplitSigningInput \
	./internal/jws:FuzzJWKUnmarshal \
	./internal/server:FuzzSign \
	./internal/audit:FuzzAppendString
FUZZ_LONG ?= 60s

.PHONY: all build run test unit fuzz-short fuzz bench generate lint check-generated clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/keyd

## run: build and start keyd on the embedded default (soft keystore, key set "dpop")
run: build
	./$(BIN) serve

## test: everything CI runs
test: lint unit fuzz-short

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

unit:
	$(GO) test -race -count=1 ./...

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

clean:
	rm -rf bin
