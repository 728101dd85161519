# Fault injection and power-cut walks (tests/fault): the walker, linked with
# the library's internals and the unit tests' helpers. The shell drivers
# tests/fault/*.sh, registered by CMakeLists.txt as fault/<name>, make the
# starting images with qemu-img and run it. chain-walk: the same for
# qk_commit and qk_rebase, over a chain of images.
add_executable(fault-walk tests/fault/fault-walk.c)
target_include_directories(fault-walk PRIVATE lib tests/unit)
target_link_libraries(fault-walk PRIVATE qk_testsupport)
add_executable(chain-walk tests/fault/chain-walk.c)
target_include_directories(chain-walk PRIVATE lib tests/unit)
target_link_libraries(chain-walk PRIVATE qk_testsupport)
