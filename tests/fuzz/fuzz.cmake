# Fuzz targets (tests/fuzz/fuzz-*.c, each defining LLVMFuzzerTestOneInput),
# included from CMakeLists.txt.
#
# Always, with any compiler: each target is also linked with replay.c into
# <target>-replay, and ctest `fuzz/<target>` replays its kept corpus
# (tests/fuzz/corpus/<target>/), the crashers found and fixed
# (tests/fuzz/crashes/<target>/) and, for the image targets, the seeds
# mkseeds.sh makes with qemu-img at build time (<build>/fuzz-seeds/).
#
# With -DQK_FUZZ=ON and clang (`make fuzz` configures build-fuzz so): the
# library and the targets get the fuzzer's coverage instrumentation, ASan
# and UBSan, and each target is also built as a libFuzzer binary <target>.

option(QK_FUZZ "Build the libFuzzer targets (clang; implies QK_SANITIZE)" OFF)

set(QK_FUZZ_DIR ${CMAKE_CURRENT_SOURCE_DIR}/tests/fuzz)
set(QK_FUZZ_SEEDS ${CMAKE_CURRENT_BINARY_DIR}/fuzz-seeds)
# Targets whose input is a QCOW2 image, so the qemu-img seeds fit them.
set(QK_FUZZ_IMAGE_TARGETS fuzz-read fuzz-check fuzz-write)

if(QK_FUZZ)
	if(NOT CMAKE_C_COMPILER_ID MATCHES "Clang")
		message(FATAL_ERROR "QK_FUZZ needs clang (CC=clang)")
	endif()
	if(NOT QK_SANITIZE)
		message(FATAL_ERROR "QK_FUZZ needs -DQK_SANITIZE=ON")
	endif()
	# Coverage for the fuzzer in the code under test; the runtime comes
	# with -fsanitize=fuzzer at the link of each fuzz binary (and the
	# sanitizer runtime of the other programs has weak stand-ins).
	target_compile_options(qk_objs PRIVATE -fsanitize=fuzzer-no-link)
endif()

add_custom_command(OUTPUT ${QK_FUZZ_SEEDS}/.stamp
	COMMAND rm -rf ${QK_FUZZ_SEEDS}
	COMMAND bash ${QK_FUZZ_DIR}/mkseeds.sh ${QK_FUZZ_SEEDS}
	COMMAND touch ${QK_FUZZ_SEEDS}/.stamp
	DEPENDS ${QK_FUZZ_DIR}/mkseeds.sh
	COMMENT "Making fuzz seed images with qemu-img")
add_custom_target(fuzz-seeds ALL DEPENDS ${QK_FUZZ_SEEDS}/.stamp)

# The NBD server's sources, for the targets that are not image targets
# (fuzz-nbd feeds it a request stream); the image targets do not need it.
add_library(qk_fuzz_nbd STATIC EXCLUDE_FROM_ALL ${QK_NBD_SOURCES})
target_include_directories(qk_fuzz_nbd PUBLIC nbd)
target_link_libraries(qk_fuzz_nbd PUBLIC qk_testsupport)
if(QK_FUZZ)
	target_compile_options(qk_fuzz_nbd PRIVATE -fsanitize=fuzzer-no-link)
endif()

add_custom_target(fuzzers)
file(GLOB QK_FUZZ_TARGETS CONFIGURE_DEPENDS tests/fuzz/fuzz-*.c)
foreach(src ${QK_FUZZ_TARGETS})
	get_filename_component(name ${src} NAME_WE)
	set(variants ${name}-replay)
	if(QK_FUZZ)
		list(APPEND variants ${name})
	endif()
	foreach(t ${variants})
		add_executable(${t} ${src})
		target_include_directories(${t} PRIVATE lib tests/fuzz)
		if(NOT name IN_LIST QK_FUZZ_IMAGE_TARGETS)
			target_link_libraries(${t} PRIVATE qk_fuzz_nbd)
		endif()
		target_link_libraries(${t} PRIVATE qk_testsupport)
		if(QK_FUZZ)
			target_compile_options(${t} PRIVATE -fsanitize=fuzzer-no-link)
		endif()
	endforeach()
	target_sources(${name}-replay PRIVATE tests/fuzz/replay.c)
	if(QK_FUZZ)
		target_link_options(${name} PRIVATE -fsanitize=fuzzer)
		add_dependencies(fuzzers ${name})
	endif()

	set(inputs ${QK_FUZZ_DIR}/corpus/${name} ${QK_FUZZ_DIR}/crashes/${name})
	if(name IN_LIST QK_FUZZ_IMAGE_TARGETS)
		list(APPEND inputs ${QK_FUZZ_SEEDS})
	endif()
	add_test(NAME fuzz/${name} COMMAND ${name}-replay ${inputs})
	set_tests_properties(fuzz/${name} PROPERTIES ENVIRONMENT "${QK_TEST_ENV}" TIMEOUT 300)
endforeach()
