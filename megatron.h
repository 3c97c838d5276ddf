/*
megatron.h: the shared library of megatron.c, in one header.

Everything GPT, BERT and T5 share lives here, in sections read top to bottom:
  0. basics       errors, memory, devices, dtypes, random numbers, timers
  1. arguments    Megatron-LM's flag names, parsed and checked
  2. data         Megatron's mmap .bin/.idx datasets, splits, GPT samples, blending
  3. layers       each layer's forward and backward: a CPU reference (OpenMP) and
                  its CUDA kernels side by side, behind one dispatching function
  4. optimizer    AdamW, global gradient norm and clipping, fp16 loss scaling
  5. checkpoint   safetensors files, written under temporary names and renamed
  6. training     learning-rate schedules, batch ramp-up, FLOPs and the log line

Conventions. Activations are rows of C features; a batch is laid out as Megatron
lays it, [s, b, h]: row r = t*B + b. Letters: B batch, T sequence length, C hidden
size, NH heads, HS head size (C/NH), V vocabulary, Vp padded vocabulary, N rows
(B*T). CPU references are templates over `real` (float in the model, double in the
gradient checks). On a GPU, parameters and activations have the run's dtype (bf16,
fp16 or fp32); parameter gradients, optimizer state and statistics are always fp32.

Compiled as CUDA C++ by nvcc, or as C++ by the host compiler when there is no CUDA
toolkit: every CUDA part sits behind #ifdef __CUDACC__.
*/
#ifndef MEGATRON_H
#define MEGATRON_H

// >>> basics
// ----------------------------------------------------------------------------
// 0. basics: errors, memory, devices, dtypes, random numbers, timers

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __CUDACC__
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define HD __host__ __device__
#else
#define HD
#endif

// A clear one-line error and a non-zero exit: every user mistake ends here.
static void die(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static void* xmalloc(size_t bytes) {
    void* p = malloc(bytes ? bytes : 1);
    if (!p) die("out of host memory allocating %zu bytes", bytes);
    return p;
}

static void* xcalloc(size_t count, size_t size) {
    void* p = calloc(count ? count : 1, size ? size : 1);
    if (!p) die("out of host memory allocating %zu x %zu bytes", count, size);
    return p;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

// Storage types of parameters and activations on a GPU (the CPU path is fp32).
typedef enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 } DType;

static size_t dtype_size(DType dt) { return dt == DT_F32 ? 4 : 2; }
static const char* dtype_name(DType dt) { return dt == DT_F32 ? "fp32" : dt == DT_BF16 ? "bf16" : "fp16"; }

// Host-side conversions, for tests and checkpoints. Round to nearest even.
static float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  // keep NaN a NaN
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
    if (exp == 0x1f) u = sign | 0x7f800000 | (mant << 13);
    else if (exp) u = sign | ((exp + 112) << 23) | (mant << 13);
    else if (!mant) u = sign;
    else {  // subnormal: normalise
        exp = 113;
        while (!(mant & 0x400)) { mant <<= 1; exp--; }
        u = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t float_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000, exp = (u >> 23) & 0xff, mant = u & 0x7fffff;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {  // subnormal or zero
        if (e < -10) return (uint16_t)sign;
        mant |= 0x800000;
        int shift = 14 - e;
        uint32_t half = mant >> shift, rest = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rest > mid || (rest == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)e << 10) | (mant >> 13), rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++;
    return (uint16_t)half;
}

// Convert n host floats to dtype storage (and back).
static void floats_to_dtype(void* dst, const float* src, size_t n, DType dt) {
    for (size_t i = 0; i < n; i++) {
        if (dt == DT_F32) ((float*)dst)[i] = src[i];
        else if (dt == DT_BF16) ((uint16_t*)dst)[i] = float_to_bf16(src[i]);
        else ((uint16_t*)dst)[i] = float_to_f16(src[i]);
    }
}

static void dtype_to_floats(float* dst, const void* src, size_t n, DType dt) {
    for (size_t i = 0; i < n; i++) {
        if (dt == DT_F32) dst[i] = ((const float*)src)[i];
        else if (dt == DT_BF16) dst[i] = bf16_to_float(((const uint16_t*)src)[i]);
        else dst[i] = f16_to_float(((const uint16_t*)src)[i]);
    }
}

// MT19937, as numpy's legacy RandomState and C++'s std::mt19937 define it: Megatron's
// sample indices depend on its exact stream. Also our weight initialisation.
typedef struct {
    uint32_t state[624];
    int index;
} MT19937;

static void mt_seed(MT19937* mt, uint32_t seed) {
    mt->state[0] = seed;
    for (int i = 1; i < 624; i++)
        mt->state[i] = 1812433253u * (mt->state[i - 1] ^ (mt->state[i - 1] >> 30)) + (uint32_t)i;
    mt->index = 624;
}

static uint32_t mt_u32(MT19937* mt) {
    if (mt->index >= 624) {
        for (int i = 0; i < 624; i++) {
            uint32_t y = (mt->state[i] & 0x80000000u) | (mt->state[(i + 1) % 624] & 0x7fffffffu);
            mt->state[i] = mt->state[(i + 397) % 624] ^ (y >> 1) ^ ((y & 1) ? 0x9908b0dfu : 0);
        }
        mt->index = 0;
    }
    uint32_t y = mt->state[mt->index++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

// A double in [0, 1) with 53 random bits (numpy's random_sample).
static double mt_uniform(MT19937* mt) {
    uint32_t a = mt_u32(mt) >> 5, b = mt_u32(mt) >> 6;
    return (a * 67108864.0 + b) / 9007199254740992.0;
}

// A standard normal draw (Box-Muller on two uniforms; the second value is discarded).
static double mt_normal(MT19937* mt) {
    double u1 = mt_uniform(mt), u2 = mt_uniform(mt);
    return sqrt(-2.0 * log(1.0 - u1)) * cos(2.0 * M_PI * u2);
}

// Dropout masks come from a counter-based hash, identical on CPU and GPU: element i
// of a tensor with stream `seed` is kept iff dropout_keep(seed, i, p). The CPU
// reference and the CUDA kernels therefore drop exactly the same elements, and a
// backward pass regenerates the forward's mask instead of storing it.
HD static inline uint32_t hash_u32(uint64_t seed, uint64_t i) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + i * 0xD1B54A32D192ED03ull + 0x2545F4914F6CDD1Dull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (uint32_t)(z >> 32);
}

HD static inline int dropout_keep(uint64_t seed, uint64_t i, float p) {
    return (float)hash_u32(seed, i) * 2.3283064365386963e-10f >= p;
}

#ifdef __CUDACC__
static void cuda_check(cudaError_t err, const char* file, int line) {
    if (err != cudaSuccess) die("CUDA error at %s:%d: %s", file, line, cudaGetErrorString(err));
}
#define cudaCheck(err) cuda_check((err), __FILE__, __LINE__)

static void cublas_check(cublasStatus_t status, const char* file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) die("cuBLAS error %d at %s:%d", (int)status, file, line);
}
#define cublasCheck(status) cublas_check((status), __FILE__, __LINE__)

// Kernels compute in fp32 whatever the storage type.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Run a statement with `T` bound to the storage type named by a DType.
#define DTYPE_SWITCH(dt, T, ...)                                                           \
    switch (dt) {                                                                          \
        case DT_F32: { typedef float T; __VA_ARGS__; } break;                              \
        case DT_BF16: { typedef __nv_bfloat16 T; __VA_ARGS__; } break;                     \
        case DT_F16: { typedef __half T; __VA_ARGS__; } break;                             \
    }
#endif

// Where a run computes: the CPU (fp32, OpenMP) or one CUDA GPU (dtype storage).
typedef struct {
    int is_gpu;
    DType dtype;  // storage of parameters and activations (fp32 on the CPU)
    char name[256];
#ifdef __CUDACC__
    int device_id;
    int sm_count;
    cudaStream_t stream;
    cublasLtHandle_t cublaslt;
    void* cublaslt_workspace;
    size_t cublaslt_workspace_size;
#endif
} Device;

// want: "auto" (a GPU when one is found), "cpu" or "cuda".
static void device_init(Device* d, const char* want, DType dtype) {
    memset(d, 0, sizeof(*d));
    d->dtype = DT_F32;
    snprintf(d->name, sizeof(d->name), "CPU");
#ifdef __CUDACC__
    int count = 0;
    if (strcmp(want, "cpu") != 0 && cudaGetDeviceCount(&count) == cudaSuccess && count > 0) {
        cudaDeviceProp prop;
        cudaCheck(cudaGetDevice(&d->device_id));
        cudaCheck(cudaGetDeviceProperties(&prop, d->device_id));
        d->is_gpu = 1;
        d->dtype = dtype;
        d->sm_count = prop.multiProcessorCount;
        snprintf(d->name, sizeof(d->name), "%s", prop.name);
        cudaCheck(cudaStreamCreate(&d->stream));
        cublasCheck(cublasLtCreate(&d->cublaslt));
        d->cublaslt_workspace_size = 32 << 20;
        cudaCheck(cudaMalloc(&d->cublaslt_workspace, d->cublaslt_workspace_size));
        return;
    }
    cudaGetLastError();  // clear the "no device" error
#endif
    (void)dtype;
    if (strcmp(want, "cuda") == 0) die("--device cuda: no CUDA GPU found%s",
#ifdef __CUDACC__
                                        ""
#else
                                        " (this binary was built without CUDA)"
#endif
    );
}

static void device_free(Device* d) {
#ifdef __CUDACC__
    if (d->is_gpu) {
        cudaCheck(cudaFree(d->cublaslt_workspace));
        cublasCheck(cublasLtDestroy(d->cublaslt));
        cudaCheck(cudaStreamDestroy(d->stream));
    }
#endif
    (void)d;
}

// Memory on the run's device: cudaMalloc on a GPU, malloc on the CPU.
static void* dev_malloc(const Device* d, size_t bytes) {
#ifdef __CUDACC__
    if (d->is_gpu) {
        void* p = NULL;
        cudaError_t err = cudaMalloc(&p, bytes ? bytes : 1);
        if (err != cudaSuccess) {
            size_t free_b = 0, total_b = 0;
            cudaMemGetInfo(&free_b, &total_b);
            die("GPU out of memory: asked for %.1f MiB with %.1f MiB free of %.1f MiB (try a smaller --micro-batch-size)",
                bytes / 1048576.0, free_b / 1048576.0, total_b / 1048576.0);
        }
        return p;
    }
#endif
    (void)d;
    return xmalloc(bytes);
}

static void dev_free(const Device* d, void* p) {
#ifdef __CUDACC__
    if (d->is_gpu) { cudaCheck(cudaFree(p)); return; }
#endif
    (void)d;
    free(p);
}

static void dev_zero(const Device* d, void* p, size_t bytes) {
#ifdef __CUDACC__
    if (d->is_gpu) { cudaCheck(cudaMemsetAsync(p, 0, bytes, d->stream)); return; }
#endif
    (void)d;
    memset(p, 0, bytes);
}

static void dev_upload(const Device* d, void* dst, const void* src, size_t bytes) {
#ifdef __CUDACC__
    if (d->is_gpu) { cudaCheck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, d->stream)); cudaCheck(cudaStreamSynchronize(d->stream)); return; }
#endif
    (void)d;
    memcpy(dst, src, bytes);
}

static void dev_download(const Device* d, void* dst, const void* src, size_t bytes) {
#ifdef __CUDACC__
    if (d->is_gpu) { cudaCheck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, d->stream)); cudaCheck(cudaStreamSynchronize(d->stream)); return; }
#endif
    (void)d;
    memcpy(dst, src, bytes);
}

static void dev_sync(const Device* d) {
#ifdef __CUDACC__
    if (d->is_gpu) cudaCheck(cudaStreamSynchronize(d->stream));
#endif
    (void)d;
}
// <<< basics

// >>> arguments
// <<< arguments

// >>> data
// <<< data

// >>> layers-matmul
// <<< layers-matmul

// >>> layers-embedding
// <<< layers-embedding

// >>> layers-layernorm
// <<< layers-layernorm

// >>> layers-attention
// <<< layers-attention

// >>> layers-gelu
// <<< layers-gelu

// >>> layers-residual
// <<< layers-residual

// >>> layers-crossentropy
// <<< layers-crossentropy

// >>> optimizer
// <<< optimizer

// >>> checkpoint
// <<< checkpoint

// >>> training
// <<< training

#endif  // MEGATRON_H
