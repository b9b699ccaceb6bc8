# cpeft: build the command-line tool, the static library and the tests.
#
#   make                  ./cpeft and libcpeft.a
#   make test             build and run every test (prints "N passed, N failed")
#   make test SANITIZE=1  the same under AddressSanitizer + UBSan (in build-san/)
#   make demo             the main job on a default model
#
# Tests read shared models and data from $(SHARED).

SHARED ?= ../shared
CC ?= gcc
ARCH ?= native
DEPS := gcc make libopenblas-dev libcjson-dev

CFLAGS ?= -O2 -g
CFLAGS += -std=c11 -D_GNU_SOURCE -Wall -Wextra -fopenmp -march=$(ARCH) \
          -Iinclude -Isrc -I/usr/include/cjson
LDLIBS := -lopenblas -lcjson -lm -fopenmp

ifeq ($(SANITIZE),1)
BUILD := build-san
CFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS += -fsanitize=address,undefined
BIN := $(BUILD)/cpeft
LIB := $(BUILD)/libcpeft.a
else
BUILD := build
BIN := cpeft
LIB := libcpeft.a
endif

LIB_SRC := $(wildcard src/core/*.c src/io/*.c src/tokenizer/*.c src/ops/*.c \
                      src/model/*.c src/peft/*.c src/train/*.c src/tasks/*.c)
CLI_SRC := $(wildcard src/cli/*.c)
TEST_SRC := $(wildcard tests/*.c)

LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/%.o)
CLI_OBJ := $(CLI_SRC:%.c=$(BUILD)/%.o)
TEST_OBJ := $(TEST_SRC:%.c=$(BUILD)/%.o)
DEPS_STAMP := $(BUILD)/.deps-ok

.PHONY: all test demo clean deps
all: $(BIN) $(LIB)

deps: $(DEPS_STAMP)
$(DEPS_STAMP):
	@sh tools/ensure-deps.sh $(DEPS)
	@mkdir -p $(BUILD) && touch $@

$(BUILD)/%.o: %.c $(DEPS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(LIB): $(LIB_OBJ)
	rm -f $@
	ar rcs $@ $^

$(BIN): $(CLI_OBJ) $(LIB)
	$(CC) $(LDFLAGS) -o $@ $(CLI_OBJ) $(LIB) $(LDLIBS)

$(BUILD)/run-tests: $(TEST_OBJ) $(LIB)
	$(CC) $(LDFLAGS) -o $@ $(TEST_OBJ) $(LIB) $(LDLIBS)

# OpenBLAS and OpenMP threads would multiply; one BLAS thread per caller.
# Under ASan, an impossible allocation returns NULL as it does without it, so
# the tests of out-of-memory messages run in both builds.
test: $(BIN) $(BUILD)/run-tests
	@CPEFT_SHARED=$(SHARED) CPEFT_BIN=$(abspath $(BIN)) OPENBLAS_NUM_THREADS=1 \
	  ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 ./$(BUILD)/run-tests $(T)

demo: $(BIN)
	@sh tools/demo.sh $(SHARED)

clean:
	rm -rf build build-san cpeft libcpeft.a

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d) $(TEST_OBJ:.o=.d)
