# Thin driver over CMake. `make` builds into build/, `make test` installs what
# is missing, builds, and runs every test (plain and sanitized builds).
BUILD     ?= build
SAN_BUILD ?= build-san
TSAN_BUILD ?= build-tsan
JOBS      ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_FLAGS ?=

.PHONY: all deps test test-plain test-san test-tsan run install clean bench fuzz

all: $(BUILD)/Makefile
	cmake --build $(BUILD) -j $(JOBS)

$(BUILD)/Makefile: CMakeLists.txt
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)

$(SAN_BUILD)/Makefile: CMakeLists.txt
	cmake -S . -B $(SAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DQK_SANITIZE=ON $(CMAKE_FLAGS)

deps:
	scripts/install-deps.sh

# Every test, through ctest: first the release build, then the whole suite
# again under AddressSanitizer + UndefinedBehaviorSanitizer, then the
# multi-threaded tests (ctest label `threads`) under ThreadSanitizer.
test: deps
	$(MAKE) test-plain
	$(MAKE) test-san
	$(MAKE) test-tsan

test-plain: all
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

test-san: $(SAN_BUILD)/Makefile
	cmake --build $(SAN_BUILD) -j $(JOBS)
	cd $(SAN_BUILD) && ctest --output-on-failure -j $(JOBS)

$(TSAN_BUILD)/Makefile: CMakeLists.txt
	cmake -S . -B $(TSAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQK_TSAN=ON $(CMAKE_FLAGS)

test-tsan: $(TSAN_BUILD)/Makefile
	cmake --build $(TSAN_BUILD) -j $(JOBS)
	cd $(TSAN_BUILD) && ctest --output-on-failure -j $(JOBS) -L threads

run: deps all
	scripts/demo.sh $(BUILD)/qcowkit

# PREFIX (default /usr/local) is configured in, so qcowkit.pc names it.
PREFIX ?= /usr/local
install: $(BUILD)/Makefile
	cmake -S . -B $(BUILD) -DCMAKE_INSTALL_PREFIX=$(PREFIX)
	cmake --build $(BUILD) -j $(JOBS)
	cmake --install $(BUILD)

bench: all
	bench/read.sh $(BUILD)/qcowkit

# libFuzzer targets (tests/fuzz) with ASan+UBSan, FUZZ_TIME seconds each,
# in build-fuzz/ (clang and its libFuzzer runtime are installed if missing).
FUZZ_BUILD ?= build-fuzz
FUZZ_TIME  ?= 60
fuzz:
	QK_FUZZ_DEPS=1 scripts/install-deps.sh
	CC=clang cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
		-DQK_SANITIZE=ON -DQK_FUZZ=ON $(CMAKE_FLAGS)
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target fuzzers fuzz-seeds
	tests/fuzz/run.sh $(FUZZ_BUILD) $(FUZZ_TIME)

clean:
	rm -rf $(BUILD) $(SAN_BUILD) $(TSAN_BUILD)
