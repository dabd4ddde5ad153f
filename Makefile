# minivmm: the two commands a user needs are `make run` and `make test`.
#
#   make guest   build the guest images (test kernel, initramfs) into build/
#   make build   build minivmm (release)
#   make vp      build the static minivmm-vp endpoint (the guest image gets it at /bin/minivmm-vp)
#   make run     boot the test kernel with a busybox shell on this terminal
#   make test    build what is missing, then run every test (unit, property, integration)
#   make pyenv   build/pyenv: a Python venv with QEMU's qemu.qmp library for the QMP tests
#   make soak    the chaos soak: SOAK_S seconds of faults (600 unless set; make test runs 180),
#                SOAK_SEED=N replays a failed run's choices
#   make fuzz    fuzz campaigns, 10 M inputs per target unless FUZZ_RUNS says otherwise, and a table
#   make bench   tables: boot time, UART pacing, virtio-console and vsock throughput, vproxy, the event loop's
#                cost against open fds, QMP latency (beside QEMU where it applies)
#   make lint    rustfmt --check and clippy -D warnings
#   make stock   the Debian cloud kernel + an initramfs with its virtio modules (for hardware KVM)

SHELL   := /bin/bash
BUILD   := build
KERNEL  := $(BUILD)/guest/vmlinux
INITRD  := $(BUILD)/initramfs.cpio
# The same image plus /bin/minivmm-vp (1.5 MB of static binary costs seconds of every boot
# here, so only the guests that use vproxy, and `make run`, carry it).
INITRD_VP := $(BUILD)/initramfs-vp.cpio
MINIVMM := target/release/minivmm
PYENV   := $(BUILD)/pyenv
# QEMU's Python QMP library, pinned: tests/qmp_client.py drives minivmm through it.
QEMU_QMP_VERSION := 0.0.6
# The vproxy endpoint, static so that it runs in the busybox initramfs.
VP_TARGET := x86_64-unknown-linux-gnu
VP      := target/$(VP_TARGET)/vp/minivmm-vp
# The options the test kernel needs on this machine's nested KVM; see resources/README.md.
GUEST_CMDLINE := console=ttyS0 reboot=k noxsave clearcpuid=smap,popcnt rodata=off

export MINIVMM_KERNEL := $(abspath $(KERNEL))
export MINIVMM_INITRD := $(abspath $(INITRD))
export MINIVMM_INITRD_VP := $(abspath $(INITRD_VP))
export MINIVMM_BIN    := $(abspath $(MINIVMM))
export MINIVMM_VP     := $(abspath $(VP))

.PHONY: all guest build vp run test soak fuzz bench lint stock deps pyenv clean FORCE

all: build

deps:
	@bash resources/deps.sh

guest: $(KERNEL) $(INITRD) $(INITRD_VP)

# The kernel script caches by source version, fragment and patches: cheap when nothing changed.
$(KERNEL): FORCE
	@bash resources/guest/build-kernel.sh $(BUILD)/guest >/dev/null

$(INITRD): FORCE
	@bash resources/initramfs/build.sh $(INITRD)

$(INITRD_VP): vp FORCE
	@VP=$(VP) bash resources/initramfs/build.sh $(INITRD_VP)

build:
	cargo build --release -p vmm

# Stripped: the initramfs is unpacked by emulated ring-0 code, every MB costs seconds.
vp:
	@RUSTFLAGS='-C target-feature=+crt-static' \
	    cargo build --profile vp -p vproxy --bin minivmm-vp --target $(VP_TARGET)
	@echo $(VP)

run: guest build
	@echo "minivmm: Ctrl-C goes to the guest; Ctrl-A x quits, Ctrl-A h for help; poweroff ends the VM"
	$(MINIVMM) --kernel $(KERNEL) --initrd $(INITRD_VP) --append "$(GUEST_CMDLINE)" --memory 256M --serial mon:stdio

pyenv: $(PYENV)/.qemu.qmp-$(QEMU_QMP_VERSION)

$(PYENV)/.qemu.qmp-$(QEMU_QMP_VERSION): | deps
	rm -rf $(PYENV)
	python3 -m venv $(PYENV)
	$(PYENV)/bin/pip install --quiet --disable-pip-version-check qemu.qmp==$(QEMU_QMP_VERSION)
	touch $@

test: deps guest stock build pyenv
	@if cargo nextest --version >/dev/null 2>&1; then \
	    cargo nextest run --workspace --no-fail-fast; \
	else \
	    cargo test --workspace --no-fail-fast; \
	fi
	cargo test --manifest-path fuzz/Cargo.toml --test replay

# The chaos soak alone, longer than make test's pass (tests/tests/soak.rs).
SOAK_S ?= 600
soak: guest build vp
	SOAK_S=$(SOAK_S) cargo nextest run -p tests --test soak --no-capture

# Fuzz campaigns (resources/fuzz.sh, fuzz/README.md): FUZZ_RUNS inputs per target (10 M),
# FUZZ_TARGETS (every target), FUZZ_PARALLEL campaigns at once (1), FUZZ_SAN none|address.
fuzz:
	@bash resources/fuzz.sh

bench: guest build
	@bash resources/bench-boot.sh
	@bash resources/bench-serial.sh
	@bash resources/bench-virtio.sh
	@bash resources/bench-vsock.sh
	@bash resources/bench-vproxy.sh
	@bash resources/bench-eventloop.sh
	@bash resources/bench-qmp.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

stock: deps vp
	@VP=$(VP) bash resources/stock/build.sh $(BUILD)/stock

clean:
	cargo clean
	rm -rf $(BUILD)
