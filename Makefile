# megatron.c build. `make` builds the trainers and the preprocessing tool:
# with nvcc on the PATH the trainers are CUDA binaries (that also run on the CPU),
# without it they are CPU-only binaries from the host compiler.
#   make                      portable GPU code (sm_80 machine code + PTX for newer GPUs)
#   make GPU_ARCH=sm_90a      Hopper (H100/H200) machine code, with the wgmma attention kernels
#   make NO_CUDA=1            CPU-only even where nvcc exists
#   make NO_MPI=1             one process only, even where mpicxx exists
#   make NO_MHD=1             without the REST server, even where libmicrohttpd is installed
#   make NO_CUDNN=1           without cuDNN's fused attention, even where cudnn.h is found
# With MPI (OpenMPI's mpicxx found) the programs run as several ranks under mpirun/srun
# (tensor and data parallelism); with nvcc and nccl.h the GPU ranks talk over NCCL.
#   make test                 build and run the tests (CPU; GPU parts run where a GPU is found)
#   make quickstart           prepare tiny Shakespeare, train a small GPT, print a sample
#   make dev-cuda GPU_ARCH=sm_90a   the kernel ladders in dev/cuda (dev/cuda/run_all.sh runs them)
#   make build/libkernel_trace.so   the in-loop kernel timer of dev/profile_gpt.sh (CUPTI)

CXX ?= g++
NVCC ?= nvcc
GPU_ARCH ?= sm_80
CXXFLAGS ?= -O3 -march=native
BASE_FLAGS = -std=c++17 -Wall -Wno-unused-function
HOST_FLAGS = $(CXXFLAGS) $(BASE_FLAGS) -fopenmp -pthread
GPU_CODE = -gencode arch=compute_$(GPU_ARCH:sm_%=%),code=[$(GPU_ARCH),compute_$(GPU_ARCH:sm_%=%)]
NVCC_FLAGS = -O3 -std=c++17 $(GPU_CODE) -Xcompiler "-fopenmp -march=native -Wall -Wno-unused-function" -Xcudafe --diag_suppress=177
NVCC_LIBS = -lcublasLt -lcublas

ifeq ($(NO_CUDA),)
HAVE_NVCC := $(shell command -v $(NVCC) 2>/dev/null)
endif

# MPI: the include and link flags of OpenMPI's wrapper compiler (override MPI_FLAGS/MPI_LIBS for another MPI)
MPICXX ?= mpicxx
ifeq ($(NO_MPI),)
HAVE_MPI := $(shell command -v $(MPICXX) 2>/dev/null)
endif
ifneq ($(HAVE_MPI),)
MPI_FLAGS ?= -DUSE_MPI $(shell $(MPICXX) --showme:compile)
MPI_LIBS ?= $(shell $(MPICXX) --showme:link)
endif

# NCCL: next to the CUDA toolkit or in the system include directory
ifneq ($(HAVE_NVCC),)
NCCL_H := $(firstword $(wildcard $(dir $(HAVE_NVCC))../include/nccl.h /usr/include/nccl.h /usr/local/include/nccl.h))
endif
ifneq ($(NCCL_H),)
NCCL_LIB_DIR := $(firstword $(dir $(wildcard $(dir $(NCCL_H))../lib64/libnccl.so $(dir $(NCCL_H))../lib/libnccl.so /usr/lib/x86_64-linux-gnu/libnccl.so)))
NCCL_FLAGS = -DUSE_NCCL -I$(dir $(NCCL_H))
NCCL_LIBS = -L$(NCCL_LIB_DIR) -Xlinker -rpath -Xlinker $(NCCL_LIB_DIR) -lnccl
endif

# cuDNN (optional): its fused attention behind --attention-backend fused. Found next to the CUDA
# toolkit or in CUDNN_HOME (a directory with include/cudnn.h and lib/ or lib64/, such as the
# nvidia-cudnn wheel's); NO_CUDNN=1 leaves it out.
ifneq ($(HAVE_NVCC),)
ifeq ($(NO_CUDNN),)
CUDNN_H := $(firstword $(wildcard $(CUDNN_HOME)/include/cudnn.h $(dir $(HAVE_NVCC))../include/cudnn.h /usr/include/cudnn.h /usr/include/x86_64-linux-gnu/cudnn.h))
endif
endif
ifneq ($(CUDNN_H),)
CUDNN_LIB_DIR := $(firstword $(dir $(wildcard $(dir $(CUDNN_H))../lib64/libcudnn.so.9 $(dir $(CUDNN_H))../lib/libcudnn.so.9 /usr/lib/x86_64-linux-gnu/libcudnn.so.9)))
endif
ifneq ($(CUDNN_LIB_DIR),)
CUDNN_FLAGS = -DUSE_CUDNN -I$(dir $(CUDNN_H))
CUDNN_LIBS = -L$(CUDNN_LIB_DIR) -Xlinker -rpath -Xlinker $(CUDNN_LIB_DIR) -l:libcudnn.so.9
endif

# libmicrohttpd (Debian's libmicrohttpd-dev): the REST server (--port); without it --port is an error
ifeq ($(NO_MHD),)
MHD_H := $(firstword $(wildcard /usr/include/microhttpd.h /usr/local/include/microhttpd.h))
endif
ifneq ($(MHD_H),)
MHD_FLAGS = -DUSE_MHD
MHD_LIBS = -lmicrohttpd
endif

ifneq ($(HAVE_NVCC),)
COMPILE = $(NVCC) $(NVCC_FLAGS) $(MPI_FLAGS) $(NCCL_FLAGS) $(CUDNN_FLAGS) $(MHD_FLAGS)
LIBS = $(NVCC_LIBS) $(MPI_LIBS) $(NCCL_LIBS) $(CUDNN_LIBS) $(MHD_LIBS)
else
COMPILE = $(CXX) $(HOST_FLAGS) $(MPI_FLAGS) $(MHD_FLAGS) -x c++
LIBS = -lm $(MPI_LIBS) $(MHD_LIBS)
endif

HEADERS = megatron.h prepro/tokenizer.h prepro/unicode_tables.h
TESTS = $(patsubst test/%.cu,build/%,$(wildcard test/test_*.cu))

.PHONY: all test quickstart dev-cuda clean

all: train_gpt prepro/preprocess_data

train_gpt: train_gpt.cu $(HEADERS)
	$(COMPILE) -o $@ $< $(LIBS)

prepro/preprocess_data: prepro/preprocess_data.cpp $(HEADERS)
	$(CXX) $(HOST_FLAGS) -o $@ $< -lm

build/%: test/%.cu $(HEADERS) test/test.h train_gpt.cu
	@mkdir -p build
	$(COMPILE) -o $@ $< $(LIBS)

test: all $(TESTS)
	./test/run_tests.sh

quickstart: all
	./prepro/prepare_tinyshakespeare.sh data
	./dev/quickstart.sh

dev-cuda:
	$(MAKE) -C dev/cuda GPU_ARCH=$(GPU_ARCH)

# CUPTI kernel timer loaded into a running program (dev/kernel_trace.c, dev/profile_gpt.sh)
CUDA_HOME ?= $(abspath $(dir $(HAVE_NVCC))..)
build/libkernel_trace.so: dev/kernel_trace.c
	@mkdir -p build
	$(CC) -O2 -Wall -shared -fPIC -o $@ $< -I$(CUDA_HOME)/include -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcupti -lstdc++

clean:
	rm -rf build train_gpt prepro/preprocess_data
	$(MAKE) -C dev/cuda clean
