# weft: `make demo` runs a Deployment behind a Service on a 3-node cluster lab (containerd + weft kubelet per
# node); `make test` runs every check and test.
# Both install what is missing first (scripts/setup.sh, idempotent). Run as root.

CARGO ?= cargo
WEFT := target/debug/weft
WEFT_RELEASE := target/release/weft

.PHONY: setup build demo test lint unit e2e bench clean-lab

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --all-targets

demo: setup
	$(CARGO) build
	@bash scripts/demo.sh $(WEFT)

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Tests that need root and namespaces run with everything else; each owns its namespaces and etcd.
test: setup lint
	$(CARGO) build
	@bash scripts/test.sh

bench: setup
	$(CARGO) build --release
	@bash scripts/bench.sh $(WEFT_RELEASE)

# Removes every lab left by an interrupted `weft lab up` or test run.
clean-lab:
	@for d in /run/weft/lab/*/; do [ -d "$$d" ] && $(WEFT) lab down --name "$$(basename $$d)"; done; true

# The multi-VM lab (vagrant/) on QEMU-emulated VMs with real Vagrant + libvirt: slow (tens of minutes), so not part
# of `make test`. Builds the local Debian 12 box and the release binary first.
.PHONY: test-vm
test-vm:
	@bash scripts/test-vm.sh
