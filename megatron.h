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
  7. generation   Megatron's sampling: greedy, temperature, top-k, top-p
  8. evaluation   Megatron's zero-shot tasks: the WikiText detokenizer and windows, LAMBADA
  9. server       Megatron's REST text-generation API (PUT /api) over libmicrohttpd

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
#include <dirent.h>
#include <ftw.h>
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
#include <sys/syscall.h>
#include <time.h>
#include <type_traits>
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

// A clear one-line error and a non-zero exit: every user mistake ends here. In a run of
// several processes the line names the rank (die_rank, set by parallel_init).
static int die_rank = -1;

static void die(const char* fmt, ...) {
    char msg[2048], rank[32] = "";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (die_rank >= 0) snprintf(rank, sizeof(rank), "rank %d: ", die_rank);
    fflush(stdout);  // what was printed before comes first in a combined log
    fprintf(stderr, "error: %s%s\n", rank, msg);  // one write: ranks' lines do not interleave
    exit(1);
}

// qsort's order for floats, ascending.
static int compare_floats(const void* a, const void* b) {
    float x = *(const float*)a, y = *(const float*)b;
    return (x > y) - (x < y);
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
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        if (dt == DT_F32) ((float*)dst)[i] = src[i];
        else if (dt == DT_BF16) ((uint16_t*)dst)[i] = float_to_bf16(src[i]);
        else ((uint16_t*)dst)[i] = float_to_f16(src[i]);
    }
}

static void dtype_to_floats(float* dst, const void* src, size_t n, DType dt) {
    #pragma omp parallel for
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
    int attention_fused;  // --attention-backend fused: attention through cuDNN (a GPU, USE_CUDNN builds)
#ifdef __CUDACC__
    int device_id;
    int sm_count;
    cudaStream_t stream;
    cublasLtHandle_t cublaslt;
    void* cublaslt_workspace;
    size_t cublaslt_workspace_size;
    unsigned* reduce_counters;  // DEVICE_REDUCE_COUNTERS zeros, for kernels whose last block finishes the job
#endif
} Device;
#define DEVICE_REDUCE_COUNTERS 8192

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
        cudaCheck(cudaMalloc(&d->reduce_counters, DEVICE_REDUCE_COUNTERS * sizeof(unsigned)));
        cudaCheck(cudaMemset(d->reduce_counters, 0, DEVICE_REDUCE_COUNTERS * sizeof(unsigned)));
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
        cudaCheck(cudaFree(d->reduce_counters));
        cublasCheck(cublasLtDestroy(d->cublaslt));
        cudaCheck(cudaStreamDestroy(d->stream));
    }
#endif
    (void)d;
}

#ifdef __CUDACC__
// One line naming the request and what the GPU has left, where an allocation failed.
static void die_gpu_out_of_memory(size_t bytes) {
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    die("GPU out of memory: asked for %zu bytes (%.1f MiB) with %.1f MiB free of %.1f MiB (try a smaller --micro-batch-size, "
        "or --recompute-granularity full)", bytes, bytes / 1048576.0, free_b / 1048576.0, total_b / 1048576.0);
}
#endif

// Memory on the run's device: cudaMalloc on a GPU, malloc on the CPU.
static void* dev_malloc(const Device* d, size_t bytes) {
#ifdef __CUDACC__
    if (d->is_gpu) {
        void* p = NULL;
        cudaError_t err = cudaMalloc(&p, bytes ? bytes : 1);
        if (err == cudaErrorMemoryAllocation) die_gpu_out_of_memory(bytes);
        cudaCheck(err);
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

// Host memory the GPU copies from without staging (page-locked) on a GPU run; malloc on the CPU.
static void* host_alloc_pinned(const Device* d, size_t bytes) {
#ifdef __CUDACC__
    if (d->is_gpu) {
        void* p = NULL;
        cudaCheck(cudaMallocHost(&p, bytes ? bytes : 1));
        return p;
    }
#endif
    (void)d;
    return xmalloc(bytes);
}

static void host_free_pinned(const Device* d, void* p) {
#ifdef __CUDACC__
    if (d->is_gpu) { cudaCheck(cudaFreeHost(p)); return; }
#endif
    (void)d;
    free(p);
}

// Upload in stream order, the host not waiting for the GPU. Pageable src is staged by the driver
// before this returns; page-locked src (host_alloc_pinned) is read later, so it must stay unchanged
// until the stream has passed this copy (a later dev_download or dev_sync).
static void dev_upload_async(const Device* d, void* dst, const void* src, size_t bytes) {
#ifdef __CUDACC__
    if (d->is_gpu) { cudaCheck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, d->stream)); return; }
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
// ----------------------------------------------------------------------------
// 1. arguments: Megatron-LM's flag names (megatron/arguments.py), so a Megatron
// user's script carries over. Unknown or invalid flags: one-line error, exit 2.

typedef struct {
    int n;
    char** values;
} ArgList;

typedef enum { ARG_INT, ARG_INT64, ARG_FLOAT, ARG_STRING, ARG_FLAG, ARG_LIST } ArgKind;

typedef struct {
    const char* name;  // "--num-layers"
    ArgKind kind;
    void* dest;        // int*, int64_t*, double*, const char**, int* (flag), ArgList*
    const char* help;
} ArgSpec;

// Under mpirun (or MEGATRON_RENDEZVOUS's RANK) every rank parses the same flags: only the first
// prints the error.
static int launcher_rank_nonzero(void) {
    const char* vars[] = {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "RANK"};
    int n = getenv("MEGATRON_RENDEZVOUS") ? 4 : 3;
    for (int i = 0; i < n; i++) {
        const char* v = getenv(vars[i]);
        if (v && *v) return atoi(v) != 0;
    }
    return 0;
}

static void arg_error(const char* fmt, ...) {
    if (launcher_rank_nonzero()) exit(2);
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "error: %s (see --help)\n", msg);
    exit(2);
}

static void args_usage(const char* program, const ArgSpec* specs, int n) {
    printf("usage: %s [flags]\n", program);
    for (int i = 0; i < n; i++) {
        const char* meta = specs[i].kind == ARG_FLAG ? "" : specs[i].kind == ARG_LIST ? " V [V ...]" : " V";
        char left[64];
        snprintf(left, sizeof(left), "%s%s", specs[i].name, meta);
        printf("  %-36s %s\n", left, specs[i].help);
    }
}

static int parse_int64(const char* s, int64_t* out) {
    char* end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end) return 0;
    *out = v;
    return 1;
}

// The flags args_parse met, so a value that would otherwise mean "not given" (0, -1) can be
// refused when it was given.
static const char* args_given[256];
static int args_given_n = 0;

static int arg_given(const char* name) {
    for (int i = 0; i < args_given_n; i++)
        if (!strcmp(args_given[i], name)) return 1;
    return 0;
}

static void args_parse(int argc, char** argv, const ArgSpec* specs, int n) {
    for (int i = 1; i < argc; i++) {
        const char* flag = argv[i];
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help")) {
            args_usage(argv[0], specs, n);
            exit(0);
        }
        const ArgSpec* s = NULL;
        for (int k = 0; k < n && !s; k++)
            if (!strcmp(flag, specs[k].name)) s = &specs[k];
        if (!s) arg_error("unknown flag '%s'", flag);
        if (args_given_n < 256) args_given[args_given_n++] = s->name;
        if (s->kind == ARG_FLAG) { *(int*)s->dest = 1; continue; }
        if (s->kind == ARG_LIST) {
            ArgList* list = (ArgList*)s->dest;
            list->values = argv + i + 1;
            list->n = 0;
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) { i++; list->n++; }
            if (list->n == 0) arg_error("%s needs at least one value", flag);
            continue;
        }
        if (i + 1 >= argc) arg_error("%s needs a value", flag);
        const char* value = argv[++i];
        int64_t iv;
        char* end;
        switch (s->kind) {
            case ARG_INT:
                if (!parse_int64(value, &iv) || iv < INT32_MIN || iv > INT32_MAX) arg_error("%s expects an integer, got '%s'", flag, value);
                *(int*)s->dest = (int)iv;
                break;
            case ARG_INT64:
                if (!parse_int64(value, &iv)) arg_error("%s expects an integer, got '%s'", flag, value);
                *(int64_t*)s->dest = iv;
                break;
            case ARG_FLOAT:
                errno = 0;
                *(double*)s->dest = strtod(value, &end);
                if (errno || end == value || *end || !isfinite(*(double*)s->dest)) arg_error("%s expects a number, got '%s'", flag, value);
                break;
            default:
                *(const char**)s->dest = value;
        }
    }
}

// The training flags the three models share. Defaults are Megatron-LM's unless noted.
typedef struct {
    // model
    int num_layers, hidden_size, ffn_hidden_size, num_attention_heads, seq_length, max_position_embeddings;
    int make_vocab_size_divisible_by, tensor_model_parallel_size;
    // parallelism (data_parallel_size is not a flag: world size / tensor-parallel size, set before args_validate)
    int data_parallel_size, use_distributed_optimizer, use_cpu_initialization, debug_hang_rank, debug_force_nccl;
    double collective_timeout, ddp_bucket_size;
    const char* debug_dump_params;
    double hidden_dropout, attention_dropout, init_method_std;
    const char* attention_backend;
    int matmul_autotune;
    // activation recomputation (Megatron-3 §5)
    const char *recompute_granularity, *recompute_method;
    int recompute_num_layers, recompute_activations, checkpoint_activations;
    // batch and schedule
    int micro_batch_size, global_batch_size;
    ArgList rampup_batch_size;
    int64_t train_iters, train_samples;
    double lr, min_lr;
    const char* lr_decay_style;
    int64_t lr_warmup_iters, lr_warmup_samples, lr_decay_iters, lr_decay_samples;
    double lr_warmup_fraction;
    // optimizer
    double weight_decay, adam_beta1, adam_beta2, adam_eps, clip_grad;
    // precision
    int bf16, fp16, fp32;
    double initial_loss_scale, min_loss_scale, loss_scale;
    int loss_scale_window, hysteresis;
    // data
    ArgList data_path;
    const char *split, *vocab_file, *merge_file, *tokenizer_type;
    int eod_mask_loss;
    // run
    int seed, log_interval, eval_interval, eval_iters;
    const char *log_file, *device;
    double peak_tflops;
    int sample_length;
} Args;

static void args_defaults(Args* a) {
    memset(a, 0, sizeof(*a));
    a->make_vocab_size_divisible_by = 128;
    a->tensor_model_parallel_size = 1;
    a->data_parallel_size = 1;
    a->collective_timeout = 600;
    a->ddp_bucket_size = 40000000;
    a->debug_hang_rank = -1;
    a->hidden_dropout = 0.1;
    a->attention_dropout = 0.1;
    a->attention_backend = "auto";
    a->init_method_std = 0.02;
    a->recompute_num_layers = -1;  // not given: 1
    a->min_lr = 0.0;
    a->lr_decay_style = "linear";
    a->weight_decay = 0.01;
    a->adam_beta1 = 0.9;
    a->adam_beta2 = 0.999;
    a->adam_eps = 1e-8;
    a->clip_grad = 1.0;
    a->initial_loss_scale = 4294967296.0;
    a->min_loss_scale = 1.0;
    a->loss_scale_window = 1000;
    a->hysteresis = 2;
    a->split = "969, 30, 1";
    a->tokenizer_type = "GPT2BPETokenizer";
    a->seed = 1234;
    a->log_interval = 100;
    a->eval_interval = 1000;
    a->eval_iters = 100;
    a->device = "auto";
    a->sample_length = 0;
}

// The flag table: name, kind, where the value goes, help text. Returns the count.
static int args_table(Args* a, ArgSpec* t) {
    int n = 0;
#define ARG(name, kind, field, help) t[n++] = ArgSpec{name, kind, &a->field, help}
    ARG("--num-layers", ARG_INT, num_layers, "transformer layers");
    ARG("--hidden-size", ARG_INT, hidden_size, "hidden size h");
    ARG("--ffn-hidden-size", ARG_INT, ffn_hidden_size, "MLP hidden size (default 4h)");
    ARG("--num-attention-heads", ARG_INT, num_attention_heads, "attention heads");
    ARG("--seq-length", ARG_INT, seq_length, "sequence length s");
    ARG("--max-position-embeddings", ARG_INT, max_position_embeddings, "position table size (default s)");
    ARG("--make-vocab-size-divisible-by", ARG_INT, make_vocab_size_divisible_by, "pad the vocabulary to a multiple of this x TP (128)");
    ARG("--tensor-model-parallel-size", ARG_INT, tensor_model_parallel_size, "tensor-parallel ranks t (data-parallel size: world size / t)");
    ARG("--use-distributed-optimizer", ARG_FLAG, use_distributed_optimizer, "shard fp32 master weights and Adam state over data-parallel ranks");
    ARG("--use-cpu-initialization", ARG_FLAG, use_cpu_initialization, "initialise on the host (always so: any t starts from the same weights)");
    ARG("--ddp-bucket-size", ARG_FLOAT, ddp_bucket_size, "gradients per data-parallel all-reduce (4e7)");
    ARG("--collective-timeout", ARG_FLOAT, collective_timeout, "seconds a collective waits for the other ranks before the run stops (600)");
    ARG("--debug-dump-params", ARG_STRING, debug_dump_params, "after training, write the full fp32 parameters (raw) here (tests)");
    ARG("--debug-hang-rank", ARG_INT, debug_hang_rank, "this rank stops before its first collective (tests the timeouts)");
    ARG("--debug-force-nccl", ARG_FLAG, debug_force_nccl, "collectives run through NCCL even in groups of one rank (checks NCCL on one GPU)");
    ARG("--hidden-dropout", ARG_FLOAT, hidden_dropout, "dropout after embedding, attention and MLP (0.1)");
    ARG("--attention-dropout", ARG_FLOAT, attention_dropout, "dropout on attention probabilities (0.1)");
    ARG("--attention-backend", ARG_STRING, attention_backend, "auto|local|flash: the hand-written flash attention here (auto); fused: cuDNN's fused attention (bf16/fp16, --attention-dropout 0; builds with cuDNN)");
    ARG("--matmul-autotune", ARG_FLAG, matmul_autotune, "GPU: time cuBLASLt's first 8 algorithms for each matmul shape at its first use and keep the fastest (runs may then differ in the last bits)");
    ARG("--init-method-std", ARG_FLOAT, init_method_std, "std of the normal initialisation (0.02)");
    ARG("--recompute-granularity", ARG_STRING, recompute_granularity, "full|selective (none). full: layers' forward runs again in the backward; selective: what every run does here (no s x s scores kept)");
    ARG("--recompute-method", ARG_STRING, recompute_method, "with full: uniform (groups of N layers) or block (the first N layers)");
    ARG("--recompute-num-layers", ARG_INT, recompute_num_layers, "N for --recompute-method (1)");
    ARG("--recompute-activations", ARG_FLAG, recompute_activations, "= --recompute-granularity selective");
    ARG("--checkpoint-activations", ARG_FLAG, checkpoint_activations, "old name of --recompute-granularity full --recompute-method uniform");
    ARG("--micro-batch-size", ARG_INT, micro_batch_size, "sequences per micro-batch");
    ARG("--global-batch-size", ARG_INT, global_batch_size, "sequences per iteration (default micro batch)");
    ARG("--rampup-batch-size", ARG_LIST, rampup_batch_size, "START INCR SAMPLES: grow the global batch");
    ARG("--train-iters", ARG_INT64, train_iters, "iterations to train");
    ARG("--train-samples", ARG_INT64, train_samples, "samples to train (instead of --train-iters)");
    ARG("--lr", ARG_FLOAT, lr, "peak learning rate");
    ARG("--min-lr", ARG_FLOAT, min_lr, "final learning rate (0)");
    ARG("--lr-decay-style", ARG_STRING, lr_decay_style, "constant|linear|cosine|inverse-square-root (linear)");
    ARG("--lr-warmup-iters", ARG_INT64, lr_warmup_iters, "warmup iterations");
    ARG("--lr-warmup-samples", ARG_INT64, lr_warmup_samples, "warmup samples");
    ARG("--lr-warmup-fraction", ARG_FLOAT, lr_warmup_fraction, "warmup as a fraction of the decay");
    ARG("--lr-decay-iters", ARG_INT64, lr_decay_iters, "iterations of decay (default: all)");
    ARG("--lr-decay-samples", ARG_INT64, lr_decay_samples, "samples of decay (default: all)");
    ARG("--weight-decay", ARG_FLOAT, weight_decay, "decoupled weight decay, not on biases and LayerNorm (0.01)");
    ARG("--adam-beta1", ARG_FLOAT, adam_beta1, "(0.9)");
    ARG("--adam-beta2", ARG_FLOAT, adam_beta2, "(0.999)");
    ARG("--adam-eps", ARG_FLOAT, adam_eps, "(1e-8)");
    ARG("--clip-grad", ARG_FLOAT, clip_grad, "clip the global gradient norm to this (1.0; 0 = off)");
    ARG("--bf16", ARG_FLAG, bf16, "bf16 parameters and activations, fp32 master weights (GPU default)");
    ARG("--fp16", ARG_FLAG, fp16, "fp16 with dynamic loss scaling");
    ARG("--fp32", ARG_FLAG, fp32, "fp32 everywhere (the CPU always is)");
    ARG("--initial-loss-scale", ARG_FLOAT, initial_loss_scale, "fp16: first loss scale (2^32)");
    ARG("--min-loss-scale", ARG_FLOAT, min_loss_scale, "fp16: smallest loss scale (1)");
    ARG("--loss-scale", ARG_FLOAT, loss_scale, "fp16: a constant loss scale instead of the dynamic one");
    ARG("--loss-scale-window", ARG_INT, loss_scale_window, "fp16: clean steps before the scale doubles (1000)");
    ARG("--hysteresis", ARG_INT, hysteresis, "fp16: overflows tolerated before the scale halves (2)");
    ARG("--data-path", ARG_LIST, data_path, "PREFIX, or W1 PREFIX1 W2 PREFIX2 ... to blend");
    ARG("--split", ARG_STRING, split, "train,valid,test proportions (969, 30, 1)");
    ARG("--vocab-file", ARG_STRING, vocab_file, "GPT-2 encoder.json (to print samples)");
    ARG("--merge-file", ARG_STRING, merge_file, "GPT-2 vocab.bpe (to print samples)");
    ARG("--tokenizer-type", ARG_STRING, tokenizer_type, "GPT2BPETokenizer");
    ARG("--eod-mask-loss", ARG_FLAG, eod_mask_loss, "no loss on end-of-document targets");
    ARG("--seed", ARG_INT, seed, "random seed (1234)");
    ARG("--log-interval", ARG_INT, log_interval, "iterations between log lines (100)");
    ARG("--eval-interval", ARG_INT, eval_interval, "iterations between validations (1000)");
    ARG("--eval-iters", ARG_INT, eval_iters, "validation iterations (100)");
    ARG("--log-file", ARG_STRING, log_file, "also write the log as JSONL (.jsonl) or CSV (.csv)");
    ARG("--device", ARG_STRING, device, "auto|cpu|cuda (auto: a GPU when one is found)");
    ARG("--peak-tflops", ARG_FLOAT, peak_tflops, "device peak for MFU (default: from a table)");
    ARG("--sample-length", ARG_INT, sample_length, "tokens of text to generate after training (0)");
#undef ARG
    return n;
}


#define MAX_ARGS 96

static void require_flag(int ok, const char* flag) {
    if (!ok) arg_error("%s is required", flag);
}

// Activation recomputation as Megatron's arguments.py and TransformerConfig check it; the two
// old switches become the granularity/method pair they stand for.
static void recompute_args_validate(Args* a) {
    if (a->checkpoint_activations || a->recompute_activations) {
        const char* old = a->checkpoint_activations ? "--checkpoint-activations" : "--recompute-activations";
        if (a->checkpoint_activations && a->recompute_activations) arg_error("--checkpoint-activations and --recompute-activations are exclusive");
        if (a->recompute_granularity || a->recompute_method) arg_error("%s is an old name for a --recompute-granularity: give one or the other", old);
        a->recompute_granularity = a->checkpoint_activations ? "full" : "selective";
        a->recompute_method = a->checkpoint_activations ? "uniform" : NULL;
    }
    const char *granularity = a->recompute_granularity, *method = a->recompute_method;
    if (granularity && strcmp(granularity, "full") && strcmp(granularity, "selective"))
        arg_error("--recompute-granularity '%s' is not one of full, selective", granularity);
    if (method && strcmp(method, "uniform") && strcmp(method, "block")) arg_error("--recompute-method '%s' is not one of uniform, block", method);
    int full = granularity && !strcmp(granularity, "full");
    if (method && !full) arg_error("--recompute-method %s needs --recompute-granularity full", method);
    if (full && !method) arg_error("--recompute-granularity full needs --recompute-method uniform or block");
    if (a->recompute_num_layers != -1 && !full) arg_error("--recompute-num-layers needs --recompute-granularity full");
    if (a->recompute_num_layers == -1) a->recompute_num_layers = 1;
    if (a->recompute_num_layers < 1 || a->recompute_num_layers > a->num_layers)
        arg_error("--recompute-num-layers %d is not in [1, --num-layers %d]", a->recompute_num_layers, a->num_layers);
}

// Checks Megatron would make (megatron/arguments.py), each naming its flag: first those of
// the model, its layout and precision, which every mode (training, evaluation) needs.
static void args_validate_model(Args* a) {
    require_flag(a->num_layers > 0, "--num-layers (a positive integer)");
    require_flag(a->hidden_size > 0, "--hidden-size (a positive integer)");
    require_flag(a->num_attention_heads > 0, "--num-attention-heads (a positive integer)");
    require_flag(a->seq_length > 0, "--seq-length (a positive integer)");
    require_flag(a->micro_batch_size > 0, "--micro-batch-size (a positive integer)");
    if (a->hidden_size % a->num_attention_heads)
        arg_error("--num-attention-heads %d does not divide --hidden-size %d", a->num_attention_heads, a->hidden_size);
    if (arg_given("--ffn-hidden-size") && a->ffn_hidden_size <= 0) arg_error("--ffn-hidden-size must be positive");
    if (a->ffn_hidden_size == 0) a->ffn_hidden_size = 4 * a->hidden_size;
    if (arg_given("--max-position-embeddings") && a->max_position_embeddings <= 0) arg_error("--max-position-embeddings must be positive");
    if (a->max_position_embeddings == 0) a->max_position_embeddings = a->seq_length;
    if (a->seq_length > a->max_position_embeddings)
        arg_error("--seq-length %d is above --max-position-embeddings %d", a->seq_length, a->max_position_embeddings);
    int t = a->tensor_model_parallel_size;
    if (t < 1) arg_error("--tensor-model-parallel-size must be positive");
    if (a->num_attention_heads % t)
        arg_error("--tensor-model-parallel-size %d does not divide --num-attention-heads %d", t, a->num_attention_heads);
    if (a->ffn_hidden_size % t) arg_error("--tensor-model-parallel-size %d does not divide --ffn-hidden-size %d", t, a->ffn_hidden_size);
    if (a->make_vocab_size_divisible_by <= 0) arg_error("--make-vocab-size-divisible-by must be positive");
    if (a->bf16 + a->fp16 + a->fp32 > 1) arg_error("--bf16, --fp16 and --fp32 are exclusive");
    if (strcmp(a->device, "auto") && strcmp(a->device, "cpu") && strcmp(a->device, "cuda"))
        arg_error("--device '%s' is not one of auto, cpu, cuda", a->device);
    if (a->log_interval <= 0) arg_error("--log-interval must be positive");
    if (a->init_method_std <= 0) arg_error("--init-method-std must be positive");
    if (a->seed < 0) arg_error("--seed must be >= 0");
    if (a->peak_tflops < 0) arg_error("--peak-tflops must be >= 0 (0: from a table)");
    const char* backend = a->attention_backend;
    if (strcmp(backend, "auto") && strcmp(backend, "local") && strcmp(backend, "flash") && strcmp(backend, "fused"))
        arg_error("--attention-backend '%s' is not one of auto, local, flash, fused", backend);
#if !(defined(__CUDACC__) && defined(USE_CUDNN))
    if (!strcmp(backend, "fused")) arg_error("--attention-backend fused needs cuDNN, and this binary was built without it (see the Makefile)");
#endif
}

static int64_t train_iterations_for_samples(const Args* a, int64_t samples);  // (training section: the batch ramp)

// The model's checks, then training's.
static void args_validate(Args* a) {
    args_validate_model(a);
    require_flag(a->lr > 0, "--lr (a positive number)");
    if (a->ddp_bucket_size < 1) arg_error("--ddp-bucket-size must be at least 1");
    if (a->global_batch_size == 0) a->global_batch_size = a->micro_batch_size;
    int dp = a->data_parallel_size;
    if (a->global_batch_size <= 0 || a->global_batch_size % (a->micro_batch_size * dp))
        arg_error("--global-batch-size %d is not a multiple of --micro-batch-size %d x data-parallel size %d",
                  a->global_batch_size, a->micro_batch_size, dp);
    if ((a->train_iters > 0) == (a->train_samples > 0)) arg_error("give exactly one of --train-iters and --train-samples");
    if (a->train_iters < 0 || a->train_samples < 0) arg_error("--train-iters/--train-samples must be positive");
    if (a->train_iters > INT32_MAX) arg_error("--train-iters %lld: more than 2^31 iterations", (long long)a->train_iters);
    if (a->lr_warmup_iters < 0 || a->lr_warmup_samples < 0 || a->lr_decay_iters < 0 || a->lr_decay_samples < 0)
        arg_error("--lr-warmup-iters/-samples and --lr-decay-iters/-samples must be >= 0");
    if (a->lr_decay_iters > INT64_MAX / a->global_batch_size || a->lr_warmup_iters > INT64_MAX / a->global_batch_size)
        arg_error("--lr-decay-iters/--lr-warmup-iters x --global-batch-size overflow");
    if (a->rampup_batch_size.n) {
        if (a->rampup_batch_size.n != 3) arg_error("--rampup-batch-size takes 3 values: START INCR SAMPLES");
        if (!a->train_samples) arg_error("--rampup-batch-size needs --train-samples (Megatron: sample-based training only)");
        int64_t v[3];
        for (int i = 0; i < 3; i++)
            if (!parse_int64(a->rampup_batch_size.values[i], &v[i]) || v[i] <= 0 || (i < 2 && v[i] > INT32_MAX))
                arg_error("--rampup-batch-size: '%s' is not a positive integer", a->rampup_batch_size.values[i]);
        // Megatron's RampupBatchsizeNumMicroBatches: START <= global, whole increments, and every
        // batch on the way a multiple of micro-batch x data-parallel size
        int64_t start = v[0], incr = v[1];
        if (start > a->global_batch_size) arg_error("--rampup-batch-size: START %lld is above --global-batch-size %d", (long long)start, a->global_batch_size);
        if ((a->global_batch_size - start) % incr)
            arg_error("--rampup-batch-size: INCR %lld does not divide --global-batch-size %d - START %lld", (long long)incr, a->global_batch_size, (long long)start);
    }
    if (a->train_samples) train_iterations_for_samples(a, a->train_samples);  // (its checks)
    if (a->hidden_dropout < 0 || a->hidden_dropout >= 1) arg_error("--hidden-dropout must be in [0, 1)");
    if (a->attention_dropout < 0 || a->attention_dropout >= 1) arg_error("--attention-dropout must be in [0, 1)");
    if (!strcmp(a->attention_backend, "fused") && a->attention_dropout > 0)
        arg_error("--attention-backend fused runs without attention dropout: give --attention-dropout 0");
    if (a->min_lr < 0 || a->min_lr > a->lr) arg_error("--min-lr must be in [0, --lr]");
    const char* styles[] = {"constant", "linear", "cosine", "inverse-square-root"};
    int style_ok = 0;
    for (int i = 0; i < 4; i++) style_ok |= !strcmp(a->lr_decay_style, styles[i]);
    if (!style_ok) arg_error("--lr-decay-style '%s' is not one of constant, linear, cosine, inverse-square-root", a->lr_decay_style);
    if (a->lr_warmup_fraction < 0 || a->lr_warmup_fraction > 1) arg_error("--lr-warmup-fraction must be in [0, 1]");
    if (a->lr_warmup_fraction > 0 && (a->lr_warmup_iters || a->lr_warmup_samples))
        arg_error("--lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples are exclusive");
    if (a->adam_beta1 < 0 || a->adam_beta1 >= 1 || a->adam_beta2 < 0 || a->adam_beta2 >= 1) arg_error("--adam-beta1/2 must be in [0, 1)");
    if (a->adam_eps <= 0) arg_error("--adam-eps must be positive");
    if (a->clip_grad < 0) arg_error("--clip-grad must be >= 0");
    if (a->weight_decay < 0) arg_error("--weight-decay must be >= 0");
    if (a->eval_interval <= 0) arg_error("--eval-interval must be positive");
    if (a->eval_iters < 0) arg_error("--eval-iters must be >= 0");
    if (a->loss_scale < 0 || a->initial_loss_scale <= 0 || a->min_loss_scale <= 0) arg_error("loss scales must be positive");
    if (a->min_loss_scale > a->initial_loss_scale) arg_error("--min-loss-scale %g is above --initial-loss-scale %g", a->min_loss_scale, a->initial_loss_scale);
    if (a->loss_scale_window <= 0 || a->hysteresis <= 0) arg_error("--loss-scale-window and --hysteresis must be positive");
    if (a->data_path.n == 0) arg_error("--data-path is required");
    if (a->data_path.n > 1 && a->data_path.n % 2) arg_error("--data-path takes one PREFIX or pairs W1 PREFIX1 W2 PREFIX2 ...");
    if (a->sample_length < 0) arg_error("--sample-length must be >= 0");
    if (a->log_file) {
        size_t n = strlen(a->log_file);
        if (!(n > 6 && !strcmp(a->log_file + n - 6, ".jsonl")) && !(n > 4 && !strcmp(a->log_file + n - 4, ".csv")))
            arg_error("--log-file %s: the name must end in .jsonl or .csv (the format)", a->log_file);
    }
    recompute_args_validate(a);
}

// Text generation: Megatron's text-generation flags (tools/generate_samples_gpt.py; Megatron
// spells two of them --top_k and --top_p, which are accepted too). With --prompt or
// --sample-input-file, train_gpt generates from --load instead of training; the sampling flags
// also shape the --sample-length text printed after training. --seed seeds the sampling.
typedef struct {
    const char *prompt, *sample_input_file, *sample_output_file;
    int out_seq_length, top_k, greedy;
    double temperature, top_p;
} GenerationArgs;

static int generation_args_table(GenerationArgs* g, ArgSpec* t) {
    memset(g, 0, sizeof(*g));
    g->out_seq_length = 1024;
    g->temperature = 1.0;
    int n = 0;
    t[n++] = ArgSpec{"--prompt", ARG_STRING, &g->prompt, "generate from this text (token ids without a tokenizer) instead of training; needs --load"};
    t[n++] = ArgSpec{"--sample-input-file", ARG_STRING, &g->sample_input_file, "generate from each line of this file instead of training; needs --load"};
    t[n++] = ArgSpec{"--sample-output-file", ARG_STRING, &g->sample_output_file, "write the generated samples here (default: stdout)"};
    t[n++] = ArgSpec{"--out-seq-length", ARG_INT, &g->out_seq_length, "tokens to generate per prompt (1024; fewer at end-of-document or a full position table)"};
    t[n++] = ArgSpec{"--temperature", ARG_FLOAT, &g->temperature, "sampling temperature (1.0; 0 = greedy)"};
    t[n++] = ArgSpec{"--top-k", ARG_INT, &g->top_k, "sample among the k most likely tokens (0 = off, 1 = greedy)"};
    t[n++] = ArgSpec{"--top_k", ARG_INT, &g->top_k, "Megatron's spelling of --top-k"};
    t[n++] = ArgSpec{"--top-p", ARG_FLOAT, &g->top_p, "sample among the most likely tokens holding probability p (0 = off)"};
    t[n++] = ArgSpec{"--top_p", ARG_FLOAT, &g->top_p, "Megatron's spelling of --top-p"};
    t[n++] = ArgSpec{"--greedy", ARG_FLAG, &g->greedy, "take the most likely token at every step"};
    return n;
}

static void generation_args_validate(const GenerationArgs* g) {
    if (g->prompt && g->sample_input_file) arg_error("--prompt and --sample-input-file are exclusive");
    if (g->out_seq_length < 0) arg_error("--out-seq-length must be >= 0");
    if (g->temperature < 0) arg_error("--temperature must be >= 0");
    if (g->top_k < 0) arg_error("--top-k must be >= 0");
    if (g->top_p < 0 || g->top_p > 1) arg_error("--top-p must be in [0, 1]");
    if (g->top_k > 0 && g->top_p > 0) arg_error("--top-k and --top-p are exclusive (Megatron: cannot set both)");
    if (g->greedy && (g->top_k > 1 || g->top_p > 0)) arg_error("--greedy and --top-k/--top-p are exclusive");
}

static void generation_args_check_vocab(const GenerationArgs* g, int vocab_size) {
    if (g->top_k >= vocab_size) arg_error("--top-k %d is not below the vocabulary size %d", g->top_k, vocab_size);
}
// <<< arguments

// >>> data
// ----------------------------------------------------------------------------
// 2. data: Megatron-LM's data pipeline (megatron/data/*, 2022)
//
// Bit-compatible with Megatron: its .bin/.idx files (writer and reader), the --split
// boundaries, the GPT samples (the same tokens in the same order for the same seed:
// numpy's legacy shuffle on MT19937) and dataset blending. Megatron caches its sample
// index in .npy files; we rebuild it at start-up instead (a fraction of a second for
// millions of samples).
//
// The mmap dataset of Megatron's preprocess_data.py, byte for byte. A pair of files:
//   {prefix}.bin  every sequence's tokens, concatenated, uint16 or int32, no header
//   {prefix}.idx  header and three arrays, little-endian, no alignment:
//     0  "MMIDIDX\0\0"         9 bytes of magic
//     9  uint64 version = 1
//    17  uint8  dtype code      8 = uint16, 4 = int32 (Megatron's numpy dtype codes)
//    18  uint64 N               number of sequences
//    26  uint64 D               length of doc_idx (documents + 1)
//    34  int32  sizes[N]        tokens in each sequence
//        int64  pointers[N]     byte offset of each sequence in .bin
//        int64  doc_idx[D]      first sequence of each document; doc_idx[D-1] = N
// A sequence is one sentence (--split-sentences) or one whole document.

#define IDX_MAGIC "MMIDIDX\x00\x00"
#define IDX_MAGIC_LEN 9
#define IDX_HEADER_LEN 34
#define IDX_DTYPE_INT32 4
#define IDX_DTYPE_UINT16 8

static size_t idx_dtype_itemsize(int dtype_code) {
    if (dtype_code == IDX_DTYPE_UINT16) return 2;
    if (dtype_code == IDX_DTYPE_INT32) return 4;
    return 0;  // a code Megatron knows but tokens never use (floats, int8, int64): not supported
}

// preprocess_data.py's __best_fitting_dtype: uint16 when every id fits (the unpadded vocabulary).
static int idx_dtype_code_for_vocab(int vocab_size) {
    return vocab_size < 65500 ? IDX_DTYPE_UINT16 : IDX_DTYPE_INT32;
}

// Writer (MMapIndexedDatasetBuilder). The files grow under temporary names and are
// renamed into place by idx_builder_finish, .bin first: a reader never sees a
// half-written pair under the final names.
typedef struct {
    char* bin_path;  // final names
    char* idx_path;
    char* bin_tmp;   // {path}.tmp-<pid> while writing
    char* idx_tmp;
    FILE* bin;
    int dtype_code;
    int32_t* sizes;  // tokens per sequence
    size_t num_seqs, sizes_cap;
    int64_t* doc_idx;  // first sequence of each document, starts with 0
    size_t doc_idx_len, doc_idx_cap;
    void* convert;  // add_item's buffer of tokens in the file's dtype
    size_t convert_cap;
} IndexedDatasetBuilder;

static char* idx_path_join(const char* prefix, const char* suffix) {
    size_t n = strlen(prefix) + strlen(suffix) + 1;
    char* path = (char*)xmalloc(n);
    snprintf(path, n, "%s%s", prefix, suffix);
    return path;
}

static char* idx_tmp_name(const char* path) {
    char suffix[32];
    snprintf(suffix, sizeof(suffix), ".tmp-%d", (int)getpid());
    return idx_path_join(path, suffix);
}

static void idx_builder_open(IndexedDatasetBuilder* b, const char* path_prefix, int dtype_code) {
    memset(b, 0, sizeof(*b));
    if (!idx_dtype_itemsize(dtype_code)) die("indexed dataset %s: dtype code %d is not 8 (uint16) or 4 (int32)", path_prefix, dtype_code);
    b->dtype_code = dtype_code;
    b->bin_path = idx_path_join(path_prefix, ".bin");
    b->idx_path = idx_path_join(path_prefix, ".idx");
    b->bin_tmp = idx_tmp_name(b->bin_path);
    b->idx_tmp = idx_tmp_name(b->idx_path);
    b->bin = fopen(b->bin_tmp, "wb");
    if (!b->bin) die("cannot create %s: %s", b->bin_tmp, strerror(errno));
    b->sizes_cap = 1024;
    b->sizes = (int32_t*)xmalloc(b->sizes_cap * sizeof(int32_t));
    b->doc_idx_cap = 1024;
    b->doc_idx = (int64_t*)xmalloc(b->doc_idx_cap * sizeof(int64_t));
    b->doc_idx[b->doc_idx_len++] = 0;
}

// Append one sequence (a sentence, or a whole document).
static void idx_builder_add_item(IndexedDatasetBuilder* b, const int32_t* tokens, size_t n) {
    if (n > INT32_MAX) die("%s: a sequence of %zu tokens does not fit Megatron's int32 sizes", b->bin_path, n);
    size_t itemsize = idx_dtype_itemsize(b->dtype_code);
    if (n > b->convert_cap) {
        free(b->convert);
        b->convert_cap = n;
        b->convert = xmalloc(n * itemsize);
    }
    for (size_t i = 0; i < n; i++) {
        if (b->dtype_code == IDX_DTYPE_UINT16) {
            if (tokens[i] < 0 || tokens[i] > 65535) die("%s: token id %d does not fit uint16 (dtype code 8)", b->bin_path, tokens[i]);
            ((uint16_t*)b->convert)[i] = (uint16_t)tokens[i];
        } else {
            ((int32_t*)b->convert)[i] = tokens[i];
        }
    }
    if (fwrite(b->convert, itemsize, n, b->bin) != n) die("cannot write %s: %s", b->bin_tmp, strerror(errno));
    if (b->num_seqs == b->sizes_cap) {
        b->sizes_cap *= 2;
        b->sizes = (int32_t*)realloc(b->sizes, b->sizes_cap * sizeof(int32_t));
        if (!b->sizes) die("out of host memory growing the sizes of %s", b->idx_path);
    }
    b->sizes[b->num_seqs++] = (int32_t)n;
}

// Close the current document: the sequences added since the last call form one document
// (preprocess_data.py skips documents without tokens rather than closing an empty one).
static void idx_builder_end_document(IndexedDatasetBuilder* b) {
    if (b->doc_idx_len == b->doc_idx_cap) {
        b->doc_idx_cap *= 2;
        b->doc_idx = (int64_t*)realloc(b->doc_idx, b->doc_idx_cap * sizeof(int64_t));
        if (!b->doc_idx) die("out of host memory growing the doc_idx of %s", b->idx_path);
    }
    b->doc_idx[b->doc_idx_len++] = (int64_t)b->num_seqs;
}

static void idx_write(FILE* f, const char* path, const void* data, size_t bytes) {
    if (bytes && fwrite(data, 1, bytes, f) != bytes) die("cannot write %s: %s", path, strerror(errno));
}

// An integer of `bytes` bytes, little-endian whatever the host.
static void idx_write_le(FILE* f, const char* path, uint64_t v, int bytes) {
    uint8_t le[8];
    for (int i = 0; i < bytes; i++) le[i] = (uint8_t)(v >> (8 * i));
    idx_write(f, path, le, bytes);
}

// fflush + fsync + fclose, dying on any failure (a full disk shows up here).
static void idx_close_synced(FILE* f, const char* path) {
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) die("cannot write %s: %s", path, strerror(errno));
    if (fclose(f) != 0) die("cannot close %s: %s", path, strerror(errno));
}

static void idx_builder_free(IndexedDatasetBuilder* b) {
    free(b->bin_path); free(b->idx_path); free(b->bin_tmp); free(b->idx_tmp);
    free(b->sizes); free(b->doc_idx); free(b->convert);
    memset(b, 0, sizeof(*b));
}

// Write the .idx (MMapIndexedDataset.Index.writer) and move both files into place.
static void idx_builder_finish(IndexedDatasetBuilder* b) {
    idx_close_synced(b->bin, b->bin_tmp);
    b->bin = NULL;
    FILE* f = fopen(b->idx_tmp, "wb");
    if (!f) die("cannot create %s: %s", b->idx_tmp, strerror(errno));
    uint8_t code = (uint8_t)b->dtype_code;
    idx_write(f, b->idx_tmp, IDX_MAGIC, IDX_MAGIC_LEN);
    idx_write_le(f, b->idx_tmp, 1, 8);  // version
    idx_write(f, b->idx_tmp, &code, 1);
    idx_write_le(f, b->idx_tmp, b->num_seqs, 8);
    idx_write_le(f, b->idx_tmp, b->doc_idx_len, 8);
    for (size_t i = 0; i < b->num_seqs; i++) idx_write_le(f, b->idx_tmp, (uint32_t)b->sizes[i], 4);
    size_t itemsize = idx_dtype_itemsize(b->dtype_code);
    uint64_t pointer = 0;
    for (size_t i = 0; i < b->num_seqs; i++) {
        idx_write_le(f, b->idx_tmp, pointer, 8);
        pointer += (uint64_t)b->sizes[i] * itemsize;
    }
    for (size_t i = 0; i < b->doc_idx_len; i++) idx_write_le(f, b->idx_tmp, (uint64_t)b->doc_idx[i], 8);
    idx_close_synced(f, b->idx_tmp);
    if (rename(b->bin_tmp, b->bin_path) != 0) die("cannot rename %s to %s: %s", b->bin_tmp, b->bin_path, strerror(errno));
    if (rename(b->idx_tmp, b->idx_path) != 0) die("cannot rename %s to %s: %s", b->idx_tmp, b->idx_path, strerror(errno));
    idx_builder_free(b);
}

// Give up: close and remove the temporaries (the final names are never touched).
static void idx_builder_abort(IndexedDatasetBuilder* b) {
    if (b->bin) fclose(b->bin);
    if (b->bin_tmp) unlink(b->bin_tmp);
    if (b->idx_tmp) unlink(b->idx_tmp);
    idx_builder_free(b);
}

// Reader (MMapIndexedDataset): both files mmap'ed and checked on open, so that a
// truncated, mismatched or foreign file stops the run with one line, never a crash.
typedef struct {
    char* bin_path;
    char* idx_path;
    int dtype_code;       // 8 uint16 or 4 int32
    size_t num_seqs;      // N
    size_t num_docs;      // D - 1
    int32_t* sizes;       // [num_seqs] tokens per sequence (an aligned copy)
    int64_t* doc_idx;     // [num_docs + 1] first sequence of each document (an aligned copy)
    const uint8_t* idx_map;  // the .idx file; pointers[] are read from it with memcpy
    size_t idx_bytes;
    const uint8_t* bin_map;  // the .bin file
    size_t bin_bytes;
    int refs;             // GPT sample sets sharing this dataset (gpt_build_datasets)
} IndexedDataset;

// mmap a whole file read-only (NULL for an empty file).
static const uint8_t* idx_map_file(const char* path, size_t* bytes) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("cannot stat %s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) die("%s is not a regular file", path);
    *bytes = (size_t)st.st_size;
    void* map = NULL;
    if (*bytes) {
        map = mmap(NULL, *bytes, PROT_READ, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) die("cannot mmap %s: %s", path, strerror(errno));
    }
    close(fd);
    return (const uint8_t*)map;
}

static uint64_t idx_read_le(const uint8_t* p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void indexed_dataset_open(IndexedDataset* ds, const char* prefix) {
    memset(ds, 0, sizeof(*ds));
    ds->bin_path = idx_path_join(prefix, ".bin");
    ds->idx_path = idx_path_join(prefix, ".idx");
    const char* path = ds->idx_path;
    ds->idx_map = idx_map_file(path, &ds->idx_bytes);
    const uint8_t* m = ds->idx_map;
    size_t bytes = ds->idx_bytes, magic_seen = bytes < IDX_MAGIC_LEN ? bytes : IDX_MAGIC_LEN;
    if (bytes == 0) die("%s is empty (truncated, or never finished)", path);
    if (memcmp(m, IDX_MAGIC, magic_seen) != 0) {
        if (bytes >= 8 && memcmp(m, "TNTIDX\x00\x00", 8) == 0)
            die("%s is a legacy (lazy/cached) Megatron index, not the mmap format: rebuild it with --dataset-impl mmap", path);
        die("%s is not a Megatron mmap index (bad magic; a foreign file?)", path);
    }
    if (bytes < IDX_HEADER_LEN) die("%s is truncated: %zu bytes, shorter than the %d-byte header", path, bytes, IDX_HEADER_LEN);
    uint64_t version = idx_read_le(m + 9, 8);
    if (version != 1) die("%s has version %llu; only version 1 is supported", path, (unsigned long long)version);
    ds->dtype_code = m[17];
    if (!idx_dtype_itemsize(ds->dtype_code)) die("%s has dtype code %d; token files use 8 (uint16) or 4 (int32)", path, ds->dtype_code);
    uint64_t N = idx_read_le(m + 18, 8), D = idx_read_le(m + 26, 8);
    if (D == 0) die("%s has an empty doc_idx (it needs at least the leading 0)", path);
    if (N > bytes / 12 || D > bytes / 8 || IDX_HEADER_LEN + 12 * N + 8 * D > bytes)
        die("%s is truncated: %zu bytes, but it declares %llu sequences and %llu doc_idx entries", path, bytes,
            (unsigned long long)N, (unsigned long long)D);
    if (IDX_HEADER_LEN + 12 * N + 8 * D < bytes)
        die("%s has %llu bytes after its arrays (a multimodal index or a corrupt file)", path,
            (unsigned long long)(bytes - (IDX_HEADER_LEN + 12 * N + 8 * D)));
    if (N > INT32_MAX) die("%s has %llu sequences; Megatron's int32 document ids stop at 2^31-1", path, (unsigned long long)N);
    ds->num_seqs = N;
    ds->num_docs = D - 1;
    ds->sizes = (int32_t*)xmalloc(N * sizeof(int32_t));
    ds->doc_idx = (int64_t*)xmalloc(D * sizeof(int64_t));
    memcpy(ds->sizes, m + IDX_HEADER_LEN, N * sizeof(int32_t));
    memcpy(ds->doc_idx, m + IDX_HEADER_LEN + 12 * N, D * sizeof(int64_t));
    // pointers must be the running sum of sizes (the only layout Megatron writes)
    uint64_t itemsize = idx_dtype_itemsize(ds->dtype_code), expected = 0;
    for (size_t i = 0; i < N; i++) {
        int64_t pointer;
        memcpy(&pointer, m + IDX_HEADER_LEN + 4 * N + 8 * i, 8);
        if (ds->sizes[i] < 0) die("%s: sequence %zu has negative size %d (corrupt index)", path, i, ds->sizes[i]);
        if ((uint64_t)pointer != expected)
            die("%s: sequence %zu starts at byte %lld of the .bin, expected %llu (corrupt index)", path, i, (long long)pointer,
                (unsigned long long)expected);
        expected += (uint64_t)ds->sizes[i] * itemsize;
    }
    if (ds->doc_idx[0] != 0 || (uint64_t)ds->doc_idx[D - 1] != N)
        die("%s: doc_idx runs from %lld to %lld, expected 0 to %llu (corrupt index)", path, (long long)ds->doc_idx[0],
            (long long)ds->doc_idx[D - 1], (unsigned long long)N);
    for (size_t d = 1; d < D; d++)
        if (ds->doc_idx[d] < ds->doc_idx[d - 1]) die("%s: doc_idx decreases at entry %zu (corrupt index)", path, d);
    ds->bin_map = idx_map_file(ds->bin_path, &ds->bin_bytes);
    if (ds->bin_bytes != expected)
        die("%s has %zu bytes but %s describes %llu (truncated, or not the pair of this index)", ds->bin_path, ds->bin_bytes,
            path, (unsigned long long)expected);
}

static void indexed_dataset_close(IndexedDataset* ds) {
    if (ds->idx_map) munmap((void*)ds->idx_map, ds->idx_bytes);
    if (ds->bin_map) munmap((void*)ds->bin_map, ds->bin_bytes);
    free(ds->sizes); free(ds->doc_idx); free(ds->bin_path); free(ds->idx_path);
    memset(ds, 0, sizeof(*ds));
}

// Tokens [offset, offset+n) of sequence `seq`, as int32 (MMapIndexedDataset.get).
static void indexed_dataset_read(const IndexedDataset* ds, size_t seq, size_t offset, size_t n, int32_t* out) {
    if (seq >= ds->num_seqs || offset > (size_t)ds->sizes[seq] || n > (size_t)ds->sizes[seq] - offset)
        die("%s: read of tokens [%zu, %zu) of sequence %zu is out of range", ds->bin_path, offset, offset + n, seq);
    int64_t pointer;
    memcpy(&pointer, ds->idx_map + IDX_HEADER_LEN + 4 * ds->num_seqs + 8 * seq, 8);
    const uint8_t* src = ds->bin_map + pointer;
    if (ds->dtype_code == IDX_DTYPE_UINT16) {
        for (size_t i = 0; i < n; i++) out[i] = (int32_t)idx_read_le(src + 2 * (offset + i), 2);
    } else {
        for (size_t i = 0; i < n; i++) out[i] = (int32_t)(uint32_t)idx_read_le(src + 4 * (offset + i), 4);
    }
}

// --split "969,30,1" (or "969/30/1"): the first sequence of train, valid, test and the
// end, for a dataset of `size` sequences (dataset_utils.get_train_valid_test_split_).
static void split_boundaries(const char* split, size_t size, size_t idx[4]) {
    double frac[3] = {0, 0, 0}, sum = 0;
    char sep = strchr(split, ',') ? ',' : '/';
    const char* p = split;
    for (int k = 0;; k++) {  // like Megatron, fields after the third are parsed but ignored
        char* end;
        double value = strtod(p, &end);
        while (*end == ' ' || *end == '\t') end++;
        if (end == p || (*end != sep && *end != '\0') || !isfinite(value) || value < 0)
            arg_error("--split '%s': expected non-negative numbers separated by ',' or '/' (the first three count)", split);
        if (k < 3) { frac[k] = value; sum += value; }
        if (*end == '\0') break;
        p = end + 1;
    }
    if (!(sum > 0)) arg_error("--split '%s': the parts add up to 0", split);
    int64_t bound[4] = {0, 0, 0, 0};
    for (int k = 0; k < 3; k++) bound[k + 1] = bound[k] + (int64_t)nearbyint(frac[k] / sum * (double)size);  // round half to even, as Python
    int64_t diff = bound[3] - (int64_t)size;
    for (int k = 1; k < 4; k++) bound[k] -= diff;
    if (bound[1] < 0) die("--split '%s' leaves train a negative range of the %zu sequences (Megatron's rounding)", split, size);
    for (int k = 0; k < 4; k++) idx[k] = (size_t)bound[k];
}

// numpy's legacy RandomState on MT19937: the two pieces Megatron's GPT index uses.
// random_interval(max): a uniform integer in [0, max], by masked rejection.
static uint64_t numpy_random_interval(MT19937* rng, uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max, value;
    for (int shift = 1; shift <= 32; shift *= 2) mask |= mask >> shift;  // smallest 2^k-1 >= max
    if (max <= 0xffffffffu) {
        do value = mt_u32(rng) & mask; while (value > max);
    } else {
        do {
            uint64_t high = mt_u32(rng);
            value = ((high << 32) | mt_u32(rng)) & mask;
        } while (value > max);
    }
    return value;
}

// RandomState.shuffle of a 1-D array: Fisher-Yates from the back.
template <typename T>
static void numpy_shuffle(MT19937* rng, T* x, size_t n) {
    if (n < 2) return;
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = (size_t)numpy_random_interval(rng, i);
        T tmp = x[i];
        x[i] = x[j];
        x[j] = tmp;
    }
}

// One GPTDataset (gpt_dataset.py): the documents [doc_begin, doc_end) of an indexed dataset
// (one per sequence, as preprocess_data.py writes GPT data), laid end to end over enough
// shuffled epochs and cut into samples of seq_length+1 tokens that overlap by one token.
typedef struct {
    IndexedDataset* data;  // shared with the other splits (reference-counted)
    int32_t* doc_idx;      // [doc_idx_len] the documents of every epoch, shuffled
    size_t doc_idx_len;
    int32_t* sample_idx;   // [num_samples+1][2] where sample j starts: (position in doc_idx, token offset)
    uint32_t* shuffle_idx; // [num_samples] dataset sample i is sample shuffle_idx[i] of sample_idx
    size_t num_samples;
    int num_epochs;
    int separate_last_epoch;  // the last epoch was shuffled on its own (a partial epoch)
} GPTDataset;

// Tile documents num_epochs times and shuffle them all (_build_doc_idx with separate_last_epoch false).
static void gpt_fill_doc_idx(int32_t* doc_idx, size_t doc_begin, size_t doc_end, int num_epochs, MT19937* rng) {
    size_t n_docs = doc_end - doc_begin;
    for (int e = 0; e < num_epochs; e++)
        for (size_t d = 0; d < n_docs; d++) doc_idx[e * n_docs + d] = (int32_t)(doc_begin + d);
    numpy_shuffle(rng, doc_idx, (size_t)num_epochs * n_docs);
}

// helpers.cpp build_sample_idx: walk the shuffled documents, seq_length+1 tokens at a time; the
// last token of a sample is the first of the next one.
static void gpt_build_sample_idx(GPTDataset* g, int seq_length) {
    const int32_t* sizes = g->data->sizes;
    g->sample_idx = (int32_t*)xmalloc((g->num_samples + 1) * 2 * sizeof(int32_t));
    int64_t doc_pos = 0;
    int32_t offset = 0;
    g->sample_idx[0] = 0;
    g->sample_idx[1] = 0;
    for (size_t j = 1; j <= g->num_samples; j++) {
        int64_t remaining = seq_length + 1;
        while (remaining != 0) {
            int64_t doc_length = sizes[g->doc_idx[doc_pos]] - offset;
            remaining -= doc_length;
            if (remaining <= 0) {
                offset += (int32_t)(remaining + doc_length - 1);
                remaining = 0;
            } else {
                doc_pos++;
                offset = 0;
            }
        }
        g->sample_idx[2 * j] = (int32_t)doc_pos;
        g->sample_idx[2 * j + 1] = offset;
    }
}

// gpt_dataset.py _build_index_mappings, in the same order of draws from one RandomState(seed):
// doc_idx first, then shuffle_idx. num_request = 0 still builds one epoch, as Megatron does.
static void gpt_dataset_build(GPTDataset* g, IndexedDataset* data, size_t doc_begin, size_t doc_end,
                              size_t num_request, int seq_length, uint32_t seed) {
    memset(g, 0, sizeof(*g));
    g->data = data;
    data->refs++;
    if (seq_length < 2) arg_error("--seq-length %d: GPT samples need at least 2 tokens", seq_length);
    int64_t tokens_per_epoch = 0;
    for (size_t d = doc_begin; d < doc_end; d++) tokens_per_epoch += data->sizes[d];
    if (tokens_per_epoch < 2)
        die("%s: documents [%zu, %zu) of this split hold %lld tokens, too few for any GPT sample", data->bin_path, doc_begin,
            doc_end, (long long)tokens_per_epoch);
    int64_t s = seq_length;
    if ((int64_t)num_request > (INT64_MAX - 2 * tokens_per_epoch) / s)
        die("%s: %zu samples of %d tokens overflow the sample index", data->bin_path, num_request, seq_length);
    // the fewest epochs holding num_request samples: an estimate, then exact
    int64_t num_epochs = (int64_t)num_request * s / tokens_per_epoch;
    if (num_epochs < 1) num_epochs = 1;
    while (num_epochs > 1 && ((num_epochs - 1) * tokens_per_epoch - 1) / s >= (int64_t)num_request) num_epochs--;
    while ((num_epochs * tokens_per_epoch - 1) / s < (int64_t)num_request) num_epochs++;
    int64_t samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) / s;  // only used when num_epochs > 1
    int64_t samples_per_epoch = (tokens_per_epoch - 1) / s;
    g->num_epochs = (int)num_epochs;
    g->separate_last_epoch = num_epochs > 1 && (int64_t)num_request - samples_before_last < (int64_t)(0.80 * samples_per_epoch);
    g->num_samples = (size_t)((num_epochs * tokens_per_epoch - 1) / s);
    size_t n_docs = doc_end - doc_begin;
    g->doc_idx_len = (size_t)num_epochs * n_docs;
    if (num_epochs > INT32_MAX || g->doc_idx_len > INT32_MAX || g->num_samples >= UINT32_MAX - 1)
        die("%s: %lld epochs of %zu documents (%zu samples) overflow Megatron's int32/uint32 index arrays", data->bin_path,
            (long long)num_epochs, n_docs, g->num_samples);
    MT19937 rng;
    mt_seed(&rng, seed);
    g->doc_idx = (int32_t*)xmalloc(g->doc_idx_len * sizeof(int32_t));
    if (g->separate_last_epoch) {
        gpt_fill_doc_idx(g->doc_idx, doc_begin, doc_end, g->num_epochs - 1, &rng);
        gpt_fill_doc_idx(g->doc_idx + (num_epochs - 1) * n_docs, doc_begin, doc_end, 1, &rng);
    } else {
        gpt_fill_doc_idx(g->doc_idx, doc_begin, doc_end, g->num_epochs, &rng);
    }
    gpt_build_sample_idx(g, seq_length);
    size_t num_first = g->separate_last_epoch ? (size_t)samples_before_last : g->num_samples;
    g->shuffle_idx = (uint32_t*)xmalloc((g->num_samples ? g->num_samples : 1) * sizeof(uint32_t));
    for (size_t i = 0; i < g->num_samples; i++) g->shuffle_idx[i] = (uint32_t)i;
    numpy_shuffle(&rng, g->shuffle_idx, num_first);
    numpy_shuffle(&rng, g->shuffle_idx + num_first, g->num_samples - num_first);
}

// GPTDataset.__getitem__: seq_length+1 tokens from (doc_idx[first], offset) through
// (doc_idx[last], offset) inclusive, crossing documents freely.
static void gpt_dataset_get(const GPTDataset* g, size_t i, int32_t* tokens) {
    size_t j = g->shuffle_idx[i];
    size_t pos_first = (size_t)g->sample_idx[2 * j], pos_last = (size_t)g->sample_idx[2 * j + 2];
    size_t offset_first = (size_t)g->sample_idx[2 * j + 1], offset_last = (size_t)g->sample_idx[2 * j + 3];
    for (size_t pos = pos_first; pos <= pos_last; pos++) {
        size_t doc = (size_t)g->doc_idx[pos];
        size_t begin = pos == pos_first ? offset_first : 0;
        size_t end = pos == pos_last ? offset_last + 1 : (size_t)g->data->sizes[doc];
        indexed_dataset_read(g->data, doc, begin, end - begin, tokens);
        tokens += end - begin;
    }
}

static void indexed_dataset_release(IndexedDataset* ds) {
    if (--ds->refs > 0) return;
    indexed_dataset_close(ds);
    free(ds);
}

static void gpt_dataset_free(GPTDataset* g) {
    free(g->doc_idx); free(g->sample_idx); free(g->shuffle_idx);
    indexed_dataset_release(g->data);
    memset(g, 0, sizeof(*g));
}

// Dataset blending (blendable_dataset.py, helpers.cpp build_blending_indices): sample k of the
// blend is the next unused sample of the dataset furthest behind its share,
// argmax_d weight[d]*max(k,1) - taken[d] (the first on ties). No random numbers.
static double blend_error(double weight, double x, int64_t taken) {
    // Megatron rounds the product before subtracting; under -march=native the compiler would
    // fuse the two into one FMA and pick other datasets on near-ties. volatile forbids that.
    volatile double share = weight * x;
    return share - (double)taken;
}

static void blend_build_indices(uint8_t* dataset_index, int64_t* dataset_sample_index, const double* weights,
                                int num_datasets, size_t size) {
    int64_t* taken = (int64_t*)xcalloc((size_t)num_datasets, sizeof(int64_t));
    for (size_t k = 0; k < size; k++) {
        double x = k > 1 ? (double)k : 1.0;
        int best = 0;
        double best_error = blend_error(weights[0], x, taken[0]);
        for (int d = 1; d < num_datasets; d++) {
            double error = blend_error(weights[d], x, taken[d]);
            if (error > best_error) {
                best_error = error;
                best = d;
            }
        }
        dataset_index[k] = (uint8_t)best;
        dataset_sample_index[k] = taken[best]++;
    }
    free(taken);
}

// np.sum of float64: pairwise summation, 8 accumulators per block of up to 128 values.
static double numpy_pairwise_sum(const double* a, size_t n) {
    if (n < 8) {
        double sum = 0.0;
        for (size_t i = 0; i < n; i++) sum += a[i];
        return sum;
    }
    if (n <= 128) {
        double r[8];
        for (int j = 0; j < 8; j++) r[j] = a[j];
        size_t i;
        for (i = 8; i < n - n % 8; i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        double sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) sum += a[i];
        return sum;
    }
    size_t half = n / 2;
    half -= half % 8;
    return numpy_pairwise_sum(a, half) + numpy_pairwise_sum(a + half, n - half);
}

// One split of a GPT dataset, blended or not: what the trainer draws samples from.
typedef struct {
    int num_datasets;      // 0: empty set; 1: one dataset, not blended; blended otherwise
    int blended;           // --data-path gave weights (a blend even of one dataset, as in Megatron)
    GPTDataset* datasets;  // [num_datasets]
    double* weights;       // [num_datasets] blended: normalised weights
    uint8_t* dataset_index;         // blended: sample i is sample dataset_sample_index[i]
    int64_t* dataset_sample_index;  //   of datasets[dataset_index[i]]
    size_t num_samples;
    int seq_length;
} GPTSampleSet;

// --data-path: one prefix, or "w1 p1 w2 p2 ..." (get_datasets_weights_and_num_samples).
// Returns the number of datasets; weights are normalised, NULL weights for a single prefix.
static int gpt_parse_data_path(int n_paths, char** paths, double* weights, const char** prefixes) {
    if (n_paths == 1) {
        prefixes[0] = paths[0];
        return 1;
    }
    if (n_paths < 1 || n_paths % 2 != 0)
        arg_error("--data-path: expected one prefix or pairs 'weight prefix ...', got %d values", n_paths);
    int n = n_paths / 2;
    if (n >= 255) arg_error("--data-path: %d datasets; Megatron blends at most 254", n);
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        char* end;
        weights[i] = strtod(paths[2 * i], &end);
        if (end == paths[2 * i] || *end != '\0' || !isfinite(weights[i]) || weights[i] < 0)
            arg_error("--data-path: '%s' is not a weight (expected one prefix or pairs 'weight prefix ...')", paths[2 * i]);
        prefixes[i] = paths[2 * i + 1];
        sum += weights[i];
    }
    if (!(sum > 0)) arg_error("--data-path: the weights add up to 0");
    for (int i = 0; i < n; i++) weights[i] /= sum;
    return n;
}

// Build train, valid and test (sets[0..2]) as Megatron's gpt_dataset.build_train_valid_test_datasets:
// each prefix is split by --split, each split asks for num_samples[k] samples (a blend asks each
// dataset for ceil(n * w * 1.005)). A request of 0 gives an empty set.
static void gpt_build_datasets(GPTSampleSet sets[3], int n_paths, char** paths, const char* split,
                               const size_t num_samples[3], int seq_length, uint32_t seed) {
    double* weights = (double*)xmalloc((size_t)(n_paths + 1) * sizeof(double));
    const char** prefixes = (const char**)xmalloc((size_t)(n_paths + 1) * sizeof(char*));
    int n = gpt_parse_data_path(n_paths, paths, weights, prefixes);
    IndexedDataset** data = (IndexedDataset**)xmalloc((size_t)n * sizeof(IndexedDataset*));
    size_t(*bounds)[4] = (size_t(*)[4])xmalloc((size_t)n * sizeof(size_t[4]));
    for (int i = 0; i < n; i++) {
        data[i] = (IndexedDataset*)xmalloc(sizeof(IndexedDataset));
        indexed_dataset_open(data[i], prefixes[i]);
        data[i]->refs = 1;  // held here until the splits are built
        split_boundaries(split, data[i]->num_seqs, bounds[i]);
    }
    static const char* split_names[3] = {"train", "valid", "test"};
    for (int k = 0; k < 3; k++) {
        GPTSampleSet* set = &sets[k];
        memset(set, 0, sizeof(*set));
        set->seq_length = seq_length;
        if (num_samples[k] == 0) continue;
        set->num_datasets = n;
        set->blended = n_paths > 1;
        set->datasets = (GPTDataset*)xmalloc((size_t)n * sizeof(GPTDataset));
        for (int i = 0; i < n; i++) {
            size_t begin = bounds[i][k], end = bounds[i][k + 1];
            if (end <= begin)
                die("%s: --split '%s' gives the %s split no documents (of %zu), but %zu %s samples are needed", data[i]->idx_path,
                    split, split_names[k], data[i]->num_seqs, num_samples[k], split_names[k]);
            size_t request = set->blended ? (size_t)ceil((double)num_samples[k] * weights[i] * 1.005) : num_samples[k];
            gpt_dataset_build(&set->datasets[i], data[i], begin, end, request, seq_length, seed);
            set->num_samples += set->datasets[i].num_samples;
        }
        if (!set->blended) continue;
        // BlendableDataset normalises the (already normalised) weights once more, with np.sum
        set->weights = (double*)xmalloc((size_t)n * sizeof(double));
        double sum = numpy_pairwise_sum(weights, (size_t)n);
        for (int i = 0; i < n; i++) set->weights[i] = weights[i] / sum;
        set->dataset_index = (uint8_t*)xmalloc(set->num_samples);
        set->dataset_sample_index = (int64_t*)xmalloc(set->num_samples * sizeof(int64_t));
        blend_build_indices(set->dataset_index, set->dataset_sample_index, set->weights, n, set->num_samples);
    }
    for (int i = 0; i < n; i++) indexed_dataset_release(data[i]);
    free(weights); free(prefixes); free(data); free(bounds);
}

// Sample i of the set: seq_length+1 tokens (tokens[:-1] the input, tokens[1:] the labels).
static void gpt_sample_get(const GPTSampleSet* set, size_t i, int32_t* tokens) {
    if (i >= set->num_samples) die("GPT sample %zu requested from a set of %zu samples", i, set->num_samples);
    if (!set->blended) {
        gpt_dataset_get(&set->datasets[0], i, tokens);
        return;
    }
    const GPTDataset* g = &set->datasets[set->dataset_index[i]];
    size_t j = (size_t)set->dataset_sample_index[i];
    if (j >= g->num_samples)
        die("blended sample %zu needs sample %zu of %s, which has %zu (the blend ran past its 0.5%% headroom)", i, j,
            g->data->bin_path, g->num_samples);
    gpt_dataset_get(g, j, tokens);
}

static void gpt_sampleset_free(GPTSampleSet* set) {
    for (int i = 0; i < set->num_datasets; i++) gpt_dataset_free(&set->datasets[i]);
    free(set->datasets); free(set->weights); free(set->dataset_index); free(set->dataset_sample_index);
    memset(set, 0, sizeof(*set));
}
// <<< data

// >>> layers-common
// ----------------------------------------------------------------------------
// Helpers the elementwise and row-wise layer kernels share (CUDA only)

#ifdef __CUDACC__
// W consecutive elements moved with 16-byte accesses (two of them for W floats when T is 2 bytes).
template <typename T, int W>
struct alignas(sizeof(T) * W < 16 ? sizeof(T) * W : 16) Vec {
    T v[W];
};

template <int W, typename T> __device__ __forceinline__ Vec<T, W> load_vec(const T* p) { return *(const Vec<T, W>*)p; }
template <int W, typename T> __device__ __forceinline__ void store_vec(T* p, const Vec<T, W>& x) { *(Vec<T, W>*)p = x; }

static int aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

// Run a statement with W = 16 / sizeof(T) elements per access when `vectorize` (every pointer
// 16-byte aligned, row lengths multiples of W), else with W = 1: the general fallback.
#define VEC_SWITCH(vectorize, T, W, ...)                        \
    if (vectorize) { constexpr int W = 16 / sizeof(T); __VA_ARGS__; } \
    else { constexpr int W = 1; __VA_ARGS__; }

// Threads for a block that walks a row of `vectors` vector groups: whole warps, at most `most`.
static int row_threads(int vectors, int most) {
    int threads = CEIL_DIV(vectors, 32) * 32;
    return threads < most ? threads : most;
}

// Every lane gets the sum over the warp, added in the same order every time.
template <typename V> __device__ __forceinline__ V warp_sum(V v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Scratch memory ordered on the run's stream. The device's pool is told once to keep what is
// freed (release threshold raised to the maximum), so scratch taken every step costs no cudaMalloc.
static void* pool_alloc(const Device* d, size_t bytes) {
    static int pool_kept[64];  // by device id
    if (d->device_id < 64 && !pool_kept[d->device_id]) {
        cudaMemPool_t pool;
        uint64_t keep_all = UINT64_MAX;
        cudaCheck(cudaDeviceGetDefaultMemPool(&pool, d->device_id));
        cudaCheck(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep_all));
        pool_kept[d->device_id] = 1;
    }
    void* p = NULL;
    cudaError_t err = cudaMallocAsync(&p, bytes ? bytes : 1, d->stream);
    if (err == cudaErrorMemoryAllocation) die_gpu_out_of_memory(bytes);
    cudaCheck(err);
    return p;
}

static void pool_free(const Device* d, void* p) { cudaCheck(cudaFreeAsync(p, d->stream)); }

#define LOG2E 1.4426950408889634f  // exp(x) = 2^(x log2 e)

// 2^x, flushing results below 2^-126 to zero (one MUFU instruction)
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The block's maximum (IS_MAX) or sum of v, in every thread: warp shuffles, then the warps'
// partials in order (the same bits every run). scratch: 32 floats of shared memory.
template <bool IS_MAX> __device__ float block_reduce(float v, float* scratch) {
    for (int offset = 16; offset > 0; offset /= 2) {
        float other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = IS_MAX ? fmaxf(v, other) : v + other;
    }
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < (int)blockDim.x / 32; w++) v = IS_MAX ? fmaxf(v, scratch[w]) : v + scratch[w];
    __syncthreads();  // scratch may be reused at once
    return v;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16 bytes global -> shared without passing through registers; zeros when !valid.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING)); }

// The most dynamic shared memory a block may opt in to on this GPU; a kernel above 48 KB must.
static int smem_optin_limit(const Device* d) {
    int limit = 0;
    cudaCheck(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, d->device_id));
    return limit;
}

template <typename K>
static void set_dynamic_smem(K kernel, size_t bytes) {
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}
#endif
// <<< layers-common

// >>> layers-gelu
// ----------------------------------------------------------------------------
// GELU, tanh approximation (Megatron-1 §2's MLP activation; Megatron's fused bias-GELU)

#define GELU_SQRT_2_OVER_PI 0.7978845608028654

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
template <typename real> HD static inline real gelu_value(real x) {
    real u = (real)GELU_SQRT_2_OVER_PI * x * (1 + (real)0.044715 * x * x);
    return (real)0.5 * x * (1 + tanh(u));
}

// d gelu / dx
template <typename real> HD static inline real gelu_derivative(real x) {
    real th = tanh((real)GELU_SQRT_2_OVER_PI * x * (1 + (real)0.044715 * x * x));
    return (real)0.5 * (1 + th) + (real)0.5 * x * (1 - th * th) * (real)GELU_SQRT_2_OVER_PI * (1 + 3 * (real)0.044715 * x * x);
}

template <typename real>
static void gelu_forward_cpu(real* out, const real* inp, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) out[i] = gelu_value(inp[i]);
}

// dinp = dout * gelu'(inp)  (=)
template <typename real>
static void gelu_backward_cpu(real* dinp, const real* inp, const real* dout, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) dinp[i] = dout[i] * gelu_derivative(inp[i]);
}

#ifdef __CUDACC__
// One kernel for both directions: out = f(a) (forward, b NULL) or b * f'(a) (backward).
template <typename T, int W>
__global__ void gelu_kernel(T* out, const T* a, const T* b, size_t n) {
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W;
    if (i >= n) return;
    Vec<T, W> av = load_vec<W>(a + i), bv, ov;
    if (b) bv = load_vec<W>(b + i);
    for (int k = 0; k < W; k++) {
        float x = to_float(av.v[k]);
        ov.v[k] = from_float<T>(b ? to_float(bv.v[k]) * gelu_derivative(x) : gelu_value(x));
    }
    store_vec<W>(out + i, ov);
}

static void gelu_cuda(const Device* d, void* out, const void* a, const void* b, size_t n) {
    DTYPE_SWITCH(d->dtype, T, {
        int vec = n % (16 / sizeof(T)) == 0 && aligned16(out) && aligned16(a) && aligned16(b);
        VEC_SWITCH(vec, T, W, {
            gelu_kernel<T, W><<<CEIL_DIV(n / W, 256), 256, 0, d->stream>>>((T*)out, (const T*)a, (const T*)b, n);
        });
    });
    cudaCheck(cudaGetLastError());
}
#endif

// out may be inp.
static void gelu_forward(const Device* d, void* out, const void* inp, size_t n) {
    if (n == 0) return;
#ifdef __CUDACC__
    if (d->is_gpu) { gelu_cuda(d, out, inp, NULL, n); return; }
#endif
    (void)d;
    gelu_forward_cpu<float>((float*)out, (const float*)inp, n);
}

// dinp = dout * gelu'(inp) (=); dinp may be dout.
static void gelu_backward(const Device* d, void* dinp, const void* inp, const void* dout, size_t n) {
    if (n == 0) return;
#ifdef __CUDACC__
    if (d->is_gpu) { gelu_cuda(d, dinp, inp, dout, n); return; }
#endif
    (void)d;
    gelu_backward_cpu<float>((float*)dinp, (const float*)inp, (const float*)dout, n);
}
// <<< layers-gelu

// >>> layers-matmul
// ----------------------------------------------------------------------------
// 3a. matmul: the linear layer of PyTorch and Megatron, out[N, OC] = inp[N, C] @ weight[OC, C]^T + bias
// (the building block of Megatron-1 §3's column- and row-parallel MLP and attention projections).
// Backward: dinp (=) = dout @ weight; dweight (+=, or = with GRAD_SET) dout^T @ inp; dbias (+=)
// column sums of dout.

// How a backward writes a weight gradient: added to the buffer (GRAD_ADD), or over it (GRAD_SET: a
// step's first micro-batch, so the buffer needs no zeroing and the product no read of it).
typedef enum { GRAD_ADD, GRAD_SET } GradWrite;

// CPU: one cache-blocked GEMM computes all three products,
//   c[i, j] (= or +=) sum_k A(i, k) B(k, j) (+ bias[j]),  A(i, k) = a[i*a_rs + k*a_ks],  B(k, j) = b[k*b_ks + j*b_cs],
// for row-major c[M, N]; the strides read inp, weight and dout transposed or not without copies.
// A tile of GEMM_MR x GEMM_NR outputs lives in vector registers: the compiler turns its j loop into
// FMAs on whole registers (with -O3 -march=native: 16 zmm accumulators under AVX-512). B is copied
// ("packed") into panels of GEMM_KC x GEMM_NR contiguous values, rows of A are read in place. Each
// output sums k in the same order whatever the thread count, so results are reproducible.
#if defined(__AVX512F__)
#define GEMM_MR 8
#define GEMM_NR 32
#elif defined(__AVX__)
#define GEMM_MR 6
#define GEMM_NR 16
#else
#define GEMM_MR 4
#define GEMM_NR 8
#endif
#ifdef __CUDACC__
#pragma nv_diag_suppress 1675  // "unrecognized GCC pragma": nvcc hands `GCC unroll` to the host compiler all the same
#endif
#define GEMM_KC 256   // k per packed block: a B panel (KC x NR) stays in L1/L2 while the A rows stream
#define GEMM_MC (32 * GEMM_MR)  // rows of A per pass over a B panel (MC x KC of A stays in L2)
#define GEMM_NC 4096  // columns of B packed at a time

// One MR x NR tile from mr valid rows of A and a packed B panel. `overwrite`: c = [bias +] sum, else c += sum.
template <typename real>
static inline void gemm_tile_cpu(real* c, long ldc, int mr, int nr, const real* a, long a_rs, long a_ks,
                                 const real* b_panel, int kc, int overwrite, const real* bias) {
    const real* a_row[GEMM_MR];
    for (int i = 0; i < GEMM_MR; i++) a_row[i] = a + (i < mr ? i : mr - 1) * a_rs;  // past the edge: recompute the last row
    real acc[GEMM_MR][GEMM_NR] = {};
    for (int k = 0; k < kc; k++, b_panel += GEMM_NR) {
        // A read down its columns (dweight's dout^T) takes a new page per k: no hardware prefetcher follows that
        if (a_ks != 1) __builtin_prefetch(a_row[0] + (k + 16) * a_ks);
#pragma GCC unroll 16
        for (int i = 0; i < GEMM_MR; i++) {
            real a_ik = a_row[i][k * a_ks];
#pragma omp simd
            for (int j = 0; j < GEMM_NR; j++) acc[i][j] += a_ik * b_panel[j];
        }
    }
    for (int i = 0; i < mr; i++) {
        real* c_row = c + i * ldc;
        if (!overwrite)
            for (int j = 0; j < nr; j++) c_row[j] += acc[i][j];
        else if (bias)
            for (int j = 0; j < nr; j++) c_row[j] = bias[j] + acc[i][j];
        else
            for (int j = 0; j < nr; j++) c_row[j] = acc[i][j];
    }
}

// Packs B(k, j0 .. j0+NR) for k < kc into panel[k*NR + jj], zero past column n.
template <typename real>
static void gemm_pack_cpu(real* panel, const real* b, long b_ks, long b_cs, int n, int kc) {
    if (b_ks == 1) {  // B's columns are contiguous: read along k
        for (int jj = 0; jj < GEMM_NR; jj++)
            for (int k = 0; k < kc; k++) panel[k * GEMM_NR + jj] = jj < n ? b[jj * b_cs + k] : 0;
    } else {
        for (int k = 0; k < kc; k++)
            for (int jj = 0; jj < GEMM_NR; jj++) panel[k * GEMM_NR + jj] = jj < n ? b[k * b_ks + jj * b_cs] : 0;
    }
}

template <typename real>
static void gemm_cpu(real* c, const real* a, long a_rs, long a_ks, const real* b, long b_ks, long b_cs,
                     const real* bias, int accumulate, int M, int N, int K) {
    real* packed = (real*)xmalloc(sizeof(real) * GEMM_KC * CEIL_DIV(N < GEMM_NC ? N : GEMM_NC, GEMM_NR) * GEMM_NR);
#pragma omp parallel
    for (int jc = 0; jc < N; jc += GEMM_NC) {
        int nc = N - jc < GEMM_NC ? N - jc : GEMM_NC;
        for (int pc = 0; pc < K; pc += GEMM_KC) {
            int kc = K - pc < GEMM_KC ? K - pc : GEMM_KC;
#pragma omp for
            for (int jr = 0; jr < nc; jr += GEMM_NR)
                gemm_pack_cpu(packed + (long)jr * kc, b + pc * b_ks + (jc + jr) * b_cs, b_ks, b_cs, nc - jr, kc);
#pragma omp for collapse(3)
            for (int ic = 0; ic < M; ic += GEMM_MC)
                for (int jr = 0; jr < nc; jr += GEMM_NR)
                    for (int i = 0; i < GEMM_MC; i += GEMM_MR) {
                        int ir = ic + i;
                        if (ir >= M) continue;
                        int mr = M - ir < GEMM_MR ? M - ir : GEMM_MR, nr = nc - jr < GEMM_NR ? nc - jr : GEMM_NR;
                        gemm_tile_cpu(c + ir * (long)N + jc + jr, N, mr, nr, a + ir * a_rs + pc * a_ks, a_rs, a_ks,
                                      packed + (long)jr * kc, kc, pc == 0 && !accumulate, bias ? bias + jc + jr : (const real*)NULL);
                    }
        }
    }
    free(packed);
}

// gelu_out (may be NULL): also gelu_out = gelu(out), the MLP's first linear; out keeps the pre-activation.
template <typename real>
static void matmul_forward_cpu(real* out, const real* inp, const real* weight, const real* bias, int N, int C, int OC, real* gelu_out) {
    gemm_cpu(out, inp, C, 1, weight, 1, C, bias, 0, N, OC, C);
    if (gelu_out) gelu_forward_cpu(gelu_out, out, (size_t)N * OC);
}

// out = residual + inp @ weight^T + bias (bias may be NULL; out may be residual): a linear layer
// closing a residual branch that has no dropout.
template <typename real>
static void matmul_forward_residual_cpu(real* out, const real* residual, const real* inp, const real* weight, const real* bias, int N, int C, int OC) {
    if (out != residual) memcpy(out, residual, sizeof(real) * N * OC);
    if (bias)
        for (int n = 0; n < N; n++)
            for (int o = 0; o < OC; o++) out[(size_t)n * OC + o] += bias[o];
    gemm_cpu(out, inp, C, 1, weight, 1, C, (const real*)NULL, 1, N, OC, C);
}

// dbias += column sums of dout[N, OC]
template <typename real>
static void matmul_dbias_cpu(real* dbias, const real* dout, int N, int OC) {
#pragma omp parallel for
    for (int j0 = 0; j0 < OC; j0 += 64) {
        int nj = OC - j0 < 64 ? OC - j0 : 64;
        real sum[64] = {};
        for (int n = 0; n < N; n++)
            for (int j = 0; j < nj; j++) sum[j] += dout[(long)n * OC + j0 + j];
        for (int j = 0; j < nj; j++) dbias[j0 + j] += sum[j];
    }
}

// dinp (=, skipped when NULL) = dout @ weight; dweight += dout^T @ inp; dbias (may be NULL) += column sums of dout.
template <typename real>
static void matmul_backward_cpu(real* dinp, real* dweight, real* dbias, const real* dout, const real* inp, const real* weight,
                                int N, int C, int OC, GradWrite dweight_write) {
    if (dinp) gemm_cpu(dinp, dout, OC, 1, weight, C, 1, (const real*)NULL, 0, N, C, OC);
    gemm_cpu(dweight, dout, 1, OC, inp, C, 1, (const real*)NULL, dweight_write == GRAD_ADD, OC, C, N);
    if (dbias) matmul_dbias_cpu(dbias, dout, N, OC);
}

// The MLP's second linear backward to the pre-activation of the GELU in front of it (Megatron's
// bias-GELU fusion, backward): dpre (=) = (dout @ weight) * gelu'(pre); dpre_bias += column sums
// of dpre, the first linear's bias gradient. The weight gradient is matmul_backward's (dinp NULL).
template <typename real>
static void matmul_backward_dgelu_cpu(real* dpre, real* dpre_bias, const real* dout, const real* weight, const real* pre, int N, int C, int OC) {
    gemm_cpu(dpre, dout, OC, 1, weight, C, 1, (const real*)NULL, 0, N, C, OC);
    gelu_backward_cpu(dpre, pre, dpre, (size_t)N * C);
    matmul_dbias_cpu(dpre_bias, dpre, N, C);
}

#ifdef __CUDACC__
// GPU: cuBLASLt, fp32 accumulation (CUBLAS_COMPUTE_32F: no TF32 in fp32 runs). A row-major [R, S]
// matrix is a column-major [S, R] one to cuBLAS, so out^T = weight @ inp^T etc. The heuristic's
// answer (an algorithm, or none) is remembered per problem (shape, types, epilogue, alignments).
typedef struct {
    int64_t key[15];
    int found;
    cublasLtMatmulAlgo_t algo;
} MatmulAlgo;
static MatmulAlgo matmul_algos[64];
static int matmul_algo_count = 0;

// 1: the MLP's GELU runs in cuBLASLt's epilogues where cuBLASLt has an algorithm for them (forward
// GELU_AUX after the first linear, backward DGELU after the second's input gradient); 0: plain
// matmuls and our GELU kernels (tests and benchmarks compare the two).
static int matmul_gelu_epilogue_enabled = 1;

static uint32_t matmul_alignment(const void* p) {
    uint32_t align = 256;
    while (align > 1 && (uintptr_t)p % align) align /= 2;
    return align;
}

static cudaDataType_t matmul_cuda_type(DType dt) {
    return dt == DT_F32 ? CUDA_R_32F : dt == DT_BF16 ? CUDA_R_16BF : CUDA_R_16F;
}

// The epilogues a caller can do without (a plain matmul and the GELU kernel instead).
static int matmul_optional_epilogue(int64_t epilogue) {
    return epilogue == CUBLASLT_EPILOGUE_GELU_AUX || epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS || epilogue == CUBLASLT_EPILOGUE_DGELU;
}

// 1 (--matmul-autotune): each problem's first call times the heuristic's first MATMUL_TUNE_ALGOS
// algorithms and keeps the fastest (by 3% or more over the heuristic's choice). cuBLASLt's ranking
// misses by 5-20% on some shapes (H200: the 1.7B model's input-gradient products, GPT-2's QKV and
// fc1 forward); the choice rests on timings, so two runs may pick differently and differ in the
// last bits. 0: the heuristic's first answer, the same in every run.
static int matmul_autotune_enabled = 0;
#define MATMUL_TUNE_ALGOS 8

// The time (ms) of each of `runs` runs of one algorithm, into ms[], each run alone between two
// events (back-to-back runs of the same product can overlap one's start with the previous one's end,
// which the model's products, each after a different kernel, do not get); 0 where it fails.
static int matmul_time_algo(const Device* d, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t layout_a, cublasLtMatrixLayout_t layout_b,
                            cublasLtMatrixLayout_t layout_d, const cublasLtMatmulAlgo_t* algo, const void* A, const void* B,
                            const void* C, void* D, float beta, int runs, float* ms) {
    float alpha = 1.0f;
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    int ok = 1;
    for (int r = 0; r < runs && ok; r++) {
        cudaCheck(cudaEventRecord(start, d->stream));
        ok = cublasLtMatmul(d->cublaslt, desc, &alpha, A, layout_a, B, layout_b, &beta, C, layout_d, D, layout_d, algo,
                            d->cublaslt_workspace, d->cublaslt_workspace_size, d->stream) == CUBLAS_STATUS_SUCCESS;
        cudaCheck(cudaEventRecord(stop, d->stream));
        cudaCheck(cudaEventSynchronize(stop));
        if (ok) cudaCheck(cudaEventElapsedTime(&ms[r], start, stop));
    }
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    return ok;
}

// The fastest of n candidates on this problem (index into them). After a warm-up run each
// (dropping failures and those twice as slow as the first), the candidates take turns for
// MATMUL_TUNE_ROUNDS rounds of 3 runs, so a drift of the clocks during the tuning touches them all
// alike, and each is scored by the median of its runs; another than the heuristic's first choice is
// taken only if 3% faster. Runs that accumulate into D (C == D) are timed on a scratch copy of D's
// size so the real D is left as it was. MEGATRON_TUNE_LOG=1 in the environment prints each
// problem's scores (key: its matmul_find_algo key).
#define MATMUL_TUNE_ROUNDS 5
static int matmul_tune(const Device* d, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t layout_a, cublasLtMatrixLayout_t layout_b,
                       cublasLtMatrixLayout_t layout_d, const cublasLtMatmulHeuristicResult_t* candidates, int n,
                       const void* A, const void* B, const void* C, void* D, size_t d_bytes, float beta, const int64_t* key) {
    void* scratch = NULL;
    if (C == D) {
        scratch = dev_malloc(d, d_bytes);
        dev_zero(d, scratch, d_bytes);
        C = D = scratch;
    }
    float times[MATMUL_TUNE_ALGOS][3 * MATMUL_TUNE_ROUNDS], score[MATMUL_TUNE_ALGOS];
    int alive[MATMUL_TUNE_ALGOS];
    float first = INFINITY;  // candidate 0's warm-up run
    for (int i = 0; i < n; i++) {
        float once = INFINITY;
        alive[i] = matmul_time_algo(d, desc, layout_a, layout_b, layout_d, &candidates[i].algo, A, B, C, D, beta, 1, &once);
        if (i == 0) first = alive[0] ? once : INFINITY;
        else alive[i] = alive[i] && once < 2 * first;
        score[i] = INFINITY;
    }
    for (int round = 0; round < MATMUL_TUNE_ROUNDS; round++)
        for (int i = 0; i < n; i++)
            if (alive[i]) alive[i] = matmul_time_algo(d, desc, layout_a, layout_b, layout_d, &candidates[i].algo, A, B, C, D, beta, 3, times[i] + 3 * round);
    for (int i = 0; i < n; i++)
        if (alive[i]) {
            qsort(times[i], 3 * MATMUL_TUNE_ROUNDS, sizeof(float), compare_floats);
            score[i] = times[i][3 * MATMUL_TUNE_ROUNDS / 2];
        }
    int pick = 0;
    for (int i = 1; i < n; i++)
        if (score[i] < score[pick]) pick = i;
    if (!(score[pick] < 0.97f * score[0])) pick = 0;
    if (getenv("MEGATRON_TUNE_LOG")) {
        fprintf(stderr, "matmul tune m %lld n %lld k %lld epilogue %lld add %lld, ms:", (long long)key[0], (long long)key[1], (long long)key[2],
                (long long)key[10], (long long)key[11]);
        for (int i = 0; i < n; i++) fprintf(stderr, " %.4f", score[i]);
        fprintf(stderr, " -> %d\n", pick);
    }
    if (scratch) dev_free(d, scratch);
    return pick;
}

// The heuristic's algorithm for a problem (or the fastest of its first few, when tuning), found
// once; 0 when it has none.
static int matmul_find_algo(const Device* d, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t layout_a, cublasLtMatrixLayout_t layout_b,
                            cublasLtMatrixLayout_t layout_d, const int64_t* key, const void* A, const void* B, const void* C,
                            void* D, size_t d_bytes, float beta, cublasLtMatmulAlgo_t* algo) {
    for (int i = 0; i < matmul_algo_count; i++)
        if (!memcmp(matmul_algos[i].key, key, sizeof(matmul_algos[i].key))) {
            *algo = matmul_algos[i].algo;
            return matmul_algos[i].found;
        }
    cublasLtMatmulPreference_t pref;
    uint32_t align_a = matmul_alignment(A), align_b = matmul_alignment(B), align_c = matmul_alignment(C), align_d = matmul_alignment(D);
    uint64_t workspace = d->cublaslt_workspace_size;
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));
    cublasLtMatmulHeuristicResult_t heuristic[MATMUL_TUNE_ALGOS] = {};
    int returned = 0;
    // a fused epilogue the library cannot do for these types is an error status, or no result
    cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(d->cublaslt, desc, layout_a, layout_b, layout_d, layout_d, pref, 1, heuristic, &returned);
    if (!matmul_optional_epilogue(key[10])) cublasCheck(status);
    int found = status == CUBLAS_STATUS_SUCCESS && returned > 0;
    if (found && matmul_autotune_enabled) {  // the untuned answer stays candidate 0 (a longer list may rank it elsewhere)
        cublasLtMatmulHeuristicResult_t more[MATMUL_TUNE_ALGOS];
        int more_returned = 0;
        if (cublasLtMatmulAlgoGetHeuristic(d->cublaslt, desc, layout_a, layout_b, layout_d, layout_d, pref, MATMUL_TUNE_ALGOS, more,
                                           &more_returned) == CUBLAS_STATUS_SUCCESS)
            for (int i = 0; i < more_returned && returned < MATMUL_TUNE_ALGOS; i++)
                if (memcmp(&more[i].algo, &heuristic[0].algo, sizeof(cublasLtMatmulAlgo_t))) heuristic[returned++] = more[i];
    }
    cublasCheck(cublasLtMatmulPreferenceDestroy(pref));
    int pick = found && returned > 1 ? matmul_tune(d, desc, layout_a, layout_b, layout_d, heuristic, returned, A, B, C, D, d_bytes, beta, key) : 0;
    if (found) *algo = heuristic[pick].algo;
    if (matmul_algo_count < (int)(sizeof(matmul_algos) / sizeof(matmul_algos[0]))) {
        memcpy(matmul_algos[matmul_algo_count].key, key, sizeof(matmul_algos[0].key));
        matmul_algos[matmul_algo_count].found = found;
        matmul_algos[matmul_algo_count++].algo = heuristic[pick].algo;
    }
    return found;
}

// Column-major D[m, n] (ldd) = op(A)[m, k] @ op(B)[k, n] (+ add, unless NULL: D itself to accumulate, or
// another matrix of D's type and layout); A (B) is stored [k, m] ([n, k]) when trans_a (trans_b). A and B
// have the run's dtype, D d_type.
// bias: the BIAS epilogues' input (length m, run's dtype); aux (ld = ldd, run's dtype): GELU_AUX's
// pre-activation output. Returns 0, doing nothing, where cuBLASLt has no algorithm for an optional
// epilogue (the caller does its work with a kernel); for any other problem that is an error.
static int matmul_cublaslt(const Device* d, void* D, cudaDataType_t d_type, int ldd, const void* A, int trans_a, int lda,
                           const void* B, int trans_b, int ldb, int m, int n, int k, const void* add,
                           cublasLtEpilogue_t epilogue, const void* bias, const void* aux) {
    cudaDataType_t ab_type = matmul_cuda_type(d->dtype);
    cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t layout_a, layout_b, layout_d;
    cublasCheck(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    if (bias) cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    if (aux) {
        int64_t aux_ld = ldd;
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
    }
    cublasCheck(cublasLtMatrixLayoutCreate(&layout_a, ab_type, trans_a ? k : m, trans_a ? m : k, lda));
    cublasCheck(cublasLtMatrixLayoutCreate(&layout_b, ab_type, trans_b ? n : k, trans_b ? k : n, ldb));
    cublasCheck(cublasLtMatrixLayoutCreate(&layout_d, d_type, m, n, ldd));

    const void* c = add ? add : D;
    int64_t key[15] = {m, n, k, trans_a, trans_b, lda, ldb, ldd, ab_type, d_type, epilogue, add == NULL ? 0 : add == D ? 1 : 2,
                       (int64_t)matmul_alignment(A) << 32 | matmul_alignment(B),
                       (int64_t)matmul_alignment(D) << 32 | matmul_alignment(bias ? bias : aux ? aux : D) << 16 | matmul_alignment(aux ? aux : D),
                       matmul_alignment(c)};
    cublasLtMatmulAlgo_t algo;
    float alpha = 1.0f, beta = add ? 1.0f : 0.0f;
    size_t d_bytes = (size_t)ldd * n * (d_type == CUDA_R_32F ? 4 : 2);
    int found = matmul_find_algo(d, desc, layout_a, layout_b, layout_d, key, A, B, c, D, d_bytes, beta, &algo);
    if (!found && !matmul_optional_epilogue(epilogue))
        die("cuBLASLt has no algorithm for a %s matmul m=%d n=%d k=%d (epilogue %d)", dtype_name(d->dtype), m, n, k, (int)epilogue);
    if (found) {
        cublasCheck(cublasLtMatmul(d->cublaslt, desc, &alpha, A, layout_a, B, layout_b, &beta, c, layout_d, D, layout_d, &algo,
                                   d->cublaslt_workspace, d->cublaslt_workspace_size, d->stream));
    }
    cublasCheck(cublasLtMatmulDescDestroy(desc));
    cublasCheck(cublasLtMatrixLayoutDestroy(layout_a));
    cublasCheck(cublasLtMatrixLayoutDestroy(layout_b));
    cublasCheck(cublasLtMatrixLayoutDestroy(layout_d));
    return found;
}

static void matmul_forward_cuda(const Device* d, void* out, const void* inp, const void* weight, const void* bias, int N, int C, int OC, void* gelu_out) {
    cudaDataType_t type = matmul_cuda_type(d->dtype);
    cublasLtEpilogue_t plain = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    if (gelu_out && matmul_gelu_epilogue_enabled && OC % 8 == 0 &&  // the pre-activation (aux) rows must be 16-byte multiples
        matmul_cublaslt(d, gelu_out, type, OC, weight, 1, C, inp, 0, C, OC, N, C, NULL,
                        bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX, bias, out))
        return;
    matmul_cublaslt(d, out, type, OC, weight, 1, C, inp, 0, C, OC, N, C, NULL, plain, bias, NULL);
    if (gelu_out) gelu_cuda(d, gelu_out, out, NULL, (size_t)N * OC);
}

// The residual joins in cuBLASLt's epilogue (its C matrix), in fp32 before the one rounding: no
// pass of its own over the three [N, OC] tensors, as the bias-dropout-add kernel would make.
static void matmul_forward_residual_cuda(const Device* d, void* out, const void* residual, const void* inp, const void* weight, const void* bias,
                                         int N, int C, int OC) {
    matmul_cublaslt(d, out, matmul_cuda_type(d->dtype), OC, weight, 1, C, inp, 0, C, OC, N, C, residual,
                    bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT, bias, NULL);
}

// Which columns of a row-major matrix (leading dimension ld) a column sum covers: logical column c
// is physical column c + (c / group) * (stride - group), i.e. the first `group` of every `stride`
// columns (each head's q in the QKV product's [q k v] per head: group HS, stride 3 HS); group =
// stride = cols: all of them.
typedef struct {
    int cols, ld, group, stride;
} ColumnMap;

static ColumnMap all_columns(int cols) {
    ColumnMap m = {cols, cols, cols, cols};
    return m;
}

HD static inline size_t column_at(ColumnMap m, int c) { return c + (size_t)(c / m.group) * (m.stride - m.group); }

// out[column_at(out_map, c)] (+)= the sum over rows r of x[r, column_at(in, c)], times row_weight[r]
// where given, in a fixed order with no float atomics: blocks of 32 x W columns x rows_per_block
// rows write partial sums; the last block of a strip of columns to finish (the strip's counter in
// done[] tells it) adds the strip's partials in row-block order and resets the counter. With
// gelu_pre, x is first replaced by x * gelu'(gelu_pre) (the MLP's backward through its GELU, in the
// same pass) and the sums are of the new values. Each thread walks W adjacent columns down every
// 8th row of its block.
template <typename T, int W>
__global__ void column_sums_kernel(float* out, ColumnMap out_map, int accumulate, float* partial, unsigned* done, T* x,
                                   const T* gelu_pre, const float* row_weight, ColumnMap in, int N, int rows_per_block) {
    __shared__ float sums[8][W][33];
    __shared__ int last;
    int col = (blockIdx.x * 32 + threadIdx.x) * W, row0 = blockIdx.y * rows_per_block;
    int row_end = min(N, row0 + rows_per_block);
    float acc[W] = {};
    if (col < in.cols) {
        size_t c = column_at(in, col);
#pragma unroll 4  // four rows' loads in flight where x is only read (no gelu_pre)
        for (int r = row0 + threadIdx.y; r < row_end; r += 8) {
            size_t i = (size_t)r * in.ld + c;
            Vec<T, W> g = load_vec<W>(x + i);
            if (gelu_pre) {
                Vec<T, W> pre = load_vec<W>(gelu_pre + i);
#pragma unroll
                for (int k = 0; k < W; k++) g.v[k] = from_float<T>(to_float(g.v[k]) * gelu_derivative(to_float(pre.v[k])));
                store_vec<W>(x + i, g);
            }
            float w = row_weight ? row_weight[r] : 1.0f;
#pragma unroll
            for (int k = 0; k < W; k++) acc[k] += w * to_float(g.v[k]);
        }
    }
#pragma unroll
    for (int k = 0; k < W; k++) sums[threadIdx.y][k][threadIdx.x] = acc[k];
    __syncthreads();
    if (threadIdx.y == 0 && col < in.cols)
#pragma unroll
        for (int k = 0; k < W; k++) {
            for (int y = 1; y < 8; y++) acc[k] += sums[y][k][threadIdx.x];
            partial[(size_t)blockIdx.y * in.cols + col + k] = acc[k];
        }
    __threadfence();  // this block's partials are visible before its count
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) last = atomicAdd(&done[blockIdx.x], 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();  // (acquire: the other blocks' partials, made visible before their counts)
    for (int j = threadIdx.y * 32 + threadIdx.x; j < 32 * W; j += 256) {
        int c = blockIdx.x * 32 * W + j;
        if (c >= in.cols) break;
        float sum = 0.0f;
        for (int p = 0; p < (int)gridDim.y; p++) sum += __ldcg(partial + (size_t)p * in.cols + c);
        size_t o = column_at(out_map, c);
        out[o] = accumulate ? out[o] + sum : sum;
    }
    if (threadIdx.x == 0 && threadIdx.y == 0) done[blockIdx.x] = 0;
}

// The launch: partial sums in the cuBLASLt workspace (same stream, so cuBLASLt is not using it
// meanwhile), rows_per_block doubled until they fit.
static void column_sums_cuda(const Device* d, float* out, ColumnMap out_map, int accumulate, void* x, const void* gelu_pre,
                             const float* row_weight, ColumnMap in, int N, int rows_per_block) {
    int parts = CEIL_DIV(N, rows_per_block);
    while ((size_t)parts * in.cols * sizeof(float) > d->cublaslt_workspace_size && parts > 1) {
        rows_per_block *= 2;
        parts = CEIL_DIV(N, rows_per_block);
    }
    if ((size_t)parts * in.cols * sizeof(float) > d->cublaslt_workspace_size) die("column sums: %d columns too many for the scratch", in.cols);
    DTYPE_SWITCH(d->dtype, T, {
        int vec = (in.group | in.stride | in.ld) % (16 / sizeof(T)) == 0 && aligned16(x) && (!gelu_pre || aligned16(gelu_pre));
        VEC_SWITCH(vec, T, W, {
            int strips = CEIL_DIV(in.cols, 32 * W);
            if (strips > DEVICE_REDUCE_COUNTERS) die("column sums: %d columns too many for the counters", in.cols);
            column_sums_kernel<T, W><<<dim3(strips, parts), dim3(32, 8), 0, d->stream>>>(
                out, out_map, accumulate, (float*)d->cublaslt_workspace, d->reduce_counters, (T*)x, (const T*)gelu_pre,
                row_weight, in, N, rows_per_block);
        });
    });
    cudaCheck(cudaGetLastError());
}

// dbias += column sums of dout [N, OC]; dout is written only with gelu_pre (see column_sums_kernel).
#define MATMUL_DBIAS_ROWS 256
static void matmul_dbias_cuda(const Device* d, float* dbias, void* dout, const void* gelu_pre, int N, int OC) {
    column_sums_cuda(d, dbias, all_columns(OC), 1, dout, gelu_pre, NULL, all_columns(OC), N, MATMUL_DBIAS_ROWS);
}

// cuBLASLt's BGRADB epilogue would fold dbias into the dweight product, but runs it as a kernel of its
// own (globalKernelBgradAB) that was slower than ours: QKV backward 0.212 against 0.199 ms on GPT-2's
// shape, 1.447 against 1.426 ms on the 1.7B model's (H200, bf16, test_matmul_ce --bench at 783c004).
static void matmul_backward_cuda(const Device* d, void* dinp, float* dweight, float* dbias, const void* dout, const void* inp,
                                 const void* weight, int N, int C, int OC, GradWrite dweight_write) {
    cudaDataType_t type = matmul_cuda_type(d->dtype);
    if (dinp) matmul_cublaslt(d, dinp, type, C, weight, 0, C, dout, 0, OC, C, N, OC, NULL, CUBLASLT_EPILOGUE_DEFAULT, NULL, NULL);
    const void* add = dweight_write == GRAD_ADD ? dweight : NULL;
    matmul_cublaslt(d, dweight, CUDA_R_32F, C, inp, 0, C, dout, 1, OC, C, OC, N, add, CUBLASLT_EPILOGUE_DEFAULT, NULL, NULL);
    if (dbias) matmul_dbias_cuda(d, dbias, (void*)dout, NULL, N, OC);  // (read only)
}

// The GELU's gradient in the DGELU epilogue (reading the pre-activation as its aux input), then a
// read-only pass for the bias gradient; without the epilogue, one pass does both, rewriting dpre.
// cuBLASLt's DGELU_BGRAD epilogue would take the bias gradient too, but runs as a generic kernel
// (cublasLt::globalKernel): with the weight-gradient product, 0.57 ms against 0.36 ms for plain
// matmuls, the GELU kernel and the bias-gradient kernels on GPT-2's shape (H200, bf16).
static void matmul_backward_dgelu_cuda(const Device* d, void* dpre, float* dpre_bias, const void* dout, const void* weight, const void* pre,
                                       int N, int C, int OC) {
    cudaDataType_t type = matmul_cuda_type(d->dtype);
    if (matmul_gelu_epilogue_enabled && C % 8 == 0 &&  // the aux rows must be 16-byte multiples
        matmul_cublaslt(d, dpre, type, C, weight, 0, C, dout, 0, OC, C, N, OC, NULL, CUBLASLT_EPILOGUE_DGELU, NULL, pre)) {
        matmul_dbias_cuda(d, dpre_bias, dpre, NULL, N, C);
        return;
    }
    matmul_cublaslt(d, dpre, type, C, weight, 0, C, dout, 0, OC, C, N, OC, NULL, CUBLASLT_EPILOGUE_DEFAULT, NULL, NULL);
    matmul_dbias_cuda(d, dpre_bias, dpre, pre, N, C);
}

// The q part as column sums of dq's columns of dqkv; the v part = dproj_bias @ proj_weight [OC, Ca]
// (see qkv_bias_backward).
static void qkv_bias_backward_cuda(const Device* d, float* dqkv_bias, void* dqkv, const float* dproj_bias, const void* proj_weight,
                                   int N, int NH, int HS, int OC) {
    int Ca = NH * HS;
    ColumnMap q = {Ca, 3 * Ca, HS, 3 * HS}, v = {Ca, 0, HS, 3 * HS};
    column_sums_cuda(d, dqkv_bias, q, 1, dqkv, NULL, NULL, q, N, MATMUL_DBIAS_ROWS);
    column_sums_cuda(d, dqkv_bias + 2 * HS, v, 0, (void*)proj_weight, NULL, dproj_bias, all_columns(Ca), OC, 64);
}
#endif

// What the model calls. Tensors in the run's dtype are void*; dweight and dbias are fp32 and accumulate.
static void matmul_forward(const Device* d, void* out, const void* inp, const void* weight, const void* bias, int N, int C, int OC,
                           void* gelu_out) {
#ifdef __CUDACC__
    if (d->is_gpu) { matmul_forward_cuda(d, out, inp, weight, bias, N, C, OC, gelu_out); return; }
#endif
    (void)d;
    matmul_forward_cpu<float>((float*)out, (const float*)inp, (const float*)weight, (const float*)bias, N, C, OC, (float*)gelu_out);
}

static void matmul_forward_residual(const Device* d, void* out, const void* residual, const void* inp, const void* weight, const void* bias,
                                    int N, int C, int OC) {
#ifdef __CUDACC__
    if (d->is_gpu) { matmul_forward_residual_cuda(d, out, residual, inp, weight, bias, N, C, OC); return; }
#endif
    (void)d;
    matmul_forward_residual_cpu<float>((float*)out, (const float*)residual, (const float*)inp, (const float*)weight, (const float*)bias, N, C, OC);
}

static void matmul_backward(const Device* d, void* dinp, float* dweight, float* dbias, const void* dout, const void* inp,
                            const void* weight, int N, int C, int OC, GradWrite dweight_write) {
#ifdef __CUDACC__
    if (d->is_gpu) { matmul_backward_cuda(d, dinp, dweight, dbias, dout, inp, weight, N, C, OC, dweight_write); return; }
#endif
    (void)d;
    matmul_backward_cpu<float>((float*)dinp, dweight, dbias, (const float*)dout, (const float*)inp, (const float*)weight, N, C, OC, dweight_write);
}

static void matmul_backward_dgelu(const Device* d, void* dpre, float* dpre_bias, const void* dout, const void* weight, const void* pre,
                                  int N, int C, int OC) {
#ifdef __CUDACC__
    if (d->is_gpu) { matmul_backward_dgelu_cuda(d, dpre, dpre_bias, dout, weight, pre, N, C, OC); return; }
#endif
    (void)d;
    matmul_backward_dgelu_cpu<float>((float*)dpre, dpre_bias, (const float*)dout, (const float*)weight, (const float*)pre, N, C, OC);
}

// The QKV bias gradient dqkv_bias [NH, 3, HS] += column sums of dqkv [N, NH * 3 * HS] (per head [q k
// v]), after the attention projection's backward (dproj_bias [OC], proj_weight [OC, NH * HS]). On
// a GPU without attention dropout only the q part is summed; k and v come from two identities:
// softmax(s + c) = softmax(s) for c constant along a row, so the k bias has no gradient (its part
// keeps the zero the step started from); the rows of P sum to one, so the column sums of dv are those
// of the attention output's gradient, dy @ proj_weight, i.e. dproj_bias @ proj_weight. That is linear
// in the micro-batches, so the v part is set from dproj_bias's running total, not added.
static void qkv_bias_backward(const Device* d, float* dqkv_bias, void* dqkv, const float* dproj_bias, const void* proj_weight, float p_attn,
                              int N, int NH, int HS, int OC) {
#ifdef __CUDACC__
    if (d->is_gpu && p_attn == 0.0f) { qkv_bias_backward_cuda(d, dqkv_bias, dqkv, dproj_bias, proj_weight, N, NH, HS, OC); return; }
    if (d->is_gpu) { matmul_dbias_cuda(d, dqkv_bias, dqkv, NULL, N, 3 * NH * HS); return; }
#endif
    (void)d, (void)dproj_bias, (void)proj_weight, (void)p_attn, (void)OC;
    matmul_dbias_cpu<float>(dqkv_bias, (const float*)dqkv, N, 3 * NH * HS);
}
// <<< layers-matmul

// >>> layers-embedding
// ----------------------------------------------------------------------------
// Token and position embedding (Megatron-1 §2, GPT-2's input layer: learned absolute
// positions; the word embedding is tied to the output layer, so dwte also receives the
// logits' gradient). Token ids must lie in [0, V): the data loader checks them.

// out[t*B+b, :] = wte[tokens[t*B+b], :] + wpe[t, :]
template <typename real>
static void embedding_forward_cpu(real* out, const int* tokens, const real* wte, const real* wpe, int B, int T, int C) {
    #pragma omp parallel for
    for (int r = 0; r < B * T; r++) {
        const real* w = wte + (size_t)tokens[r] * C;
        const real* p = wpe + (size_t)(r / B) * C;
        real* o = out + (size_t)r * C;
        for (int c = 0; c < C; c++) o[c] = w[c] + p[c];
    }
}

// dwte[v, :] += dout rows whose token is v; dwpe[t, :] += dout[t*B+b, :] over b (both +=).
template <typename real>
static void embedding_backward_cpu(real* dwte, real* dwpe, const real* dout, const int* tokens, int B, int T, int C) {
    #pragma omp parallel for
    for (int t = 0; t < T; t++)
        for (int b = 0; b < B; b++)
            for (int c = 0; c < C; c++) dwpe[(size_t)t * C + c] += dout[((size_t)t * B + b) * C + c];
    // Threads own slices of channels, so each row of dwte sums its rows in order, deterministically.
    #pragma omp parallel for
    for (int c0 = 0; c0 < C; c0 += 64)
        for (int r = 0; r < B * T; r++)
            for (int c = c0; c < c0 + 64 && c < C; c++) dwte[(size_t)tokens[r] * C + c] += dout[(size_t)r * C + c];
}

#ifdef __CUDACC__
// Blocks are (row, chunk of channels); each thread moves W channels.
template <typename T, int W>
__global__ void embedding_forward_kernel(T* out, const int* tokens, const T* wte, const T* wpe, int B, int C) {
    int r = blockIdx.x, c = (blockIdx.y * blockDim.x + threadIdx.x) * W;
    if (c >= C) return;
    Vec<T, W> w = load_vec<W>(wte + (size_t)tokens[r] * C + c), p = load_vec<W>(wpe + (size_t)(r / B) * C + c), o;
    for (int k = 0; k < W; k++) o.v[k] = from_float<T>(to_float(w.v[k]) + to_float(p.v[k]));
    store_vec<W>(out + (size_t)r * C + c, o);
}

static void embedding_forward_cuda(const Device* d, void* out, const int* tokens, const void* wte, const void* wpe, int B, int T, int C) {
    DTYPE_SWITCH(d->dtype, T_, {
        int vec = C % (16 / sizeof(T_)) == 0 && aligned16(out) && aligned16(wte) && aligned16(wpe);
        VEC_SWITCH(vec, T_, W, {
            int threads = row_threads(C / W, 256);
            dim3 grid(B * T, CEIL_DIV(C / W, threads));
            embedding_forward_kernel<T_, W><<<grid, threads, 0, d->stream>>>((T_*)out, tokens, (const T_*)wte, (const T_*)wpe, B, C);
        });
    });
    cudaCheck(cudaGetLastError());
}

// The backward groups rows by token without float atomics: sort the unique keys
// (token << 32 | row), so each token's rows come out together and in increasing order, then
// sum each token's run in a fixed order. Any correct sort of unique keys gives the same order.
// Blocks sort tiles of up to EMBEDDING_TILE keys in shared memory (bitonic); then a key's
// place in the whole order is the number of smaller keys: the sum over the tiles of its lower
// bound in each (binary searches, added as integers, so exact).
#define EMBEDDING_TILE 1024

// Compare-exchange pair `pair` at distance j within sequences sorted in direction set by bit k.
__device__ __forceinline__ void bitonic_exchange(uint64_t* keys, unsigned base, unsigned pair, unsigned j, unsigned k) {
    unsigned i = (pair / j) * 2 * j + pair % j;
    uint64_t a = keys[i], b = keys[i + j];
    int ascending = ((base + i) & k) == 0;
    if ((a > b) == ascending) { keys[i] = b; keys[i + j] = a; }
}

// Block b sorts the keys of rows b*n .. b*n+n-1, n = 2 * blockDim.x (rows past N pad: they sort last).
__global__ void embedding_sort_tiles_kernel(uint64_t* tiles, const int* tokens, int N) {
    __shared__ uint64_t tile[EMBEDDING_TILE];
    unsigned n = 2 * blockDim.x, base = blockIdx.x * n;
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x)
        tile[i] = base + i < (unsigned)N ? ((uint64_t)(uint32_t)tokens[base + i] << 32) | (base + i) : UINT64_MAX;
    __syncthreads();
    for (unsigned k = 2; k <= n; k *= 2)
        for (unsigned j = k / 2; j > 0; j /= 2) {
            bitonic_exchange(tile, 0, threadIdx.x, j, k);
            __syncthreads();
        }
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) tiles[base + i] = tile[i];
}

// How many of the n sorted keys a[] are below key.
__device__ __forceinline__ unsigned lower_bound_u64(const uint64_t* a, unsigned n, uint64_t key) {
    unsigned lo = 0, hi = n;
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (a[mid] < key) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// `lanes` consecutive threads (a power of two, at most 32) per key of the tiles: lane l adds the
// key's lower bounds in tiles l, l + lanes, ...; the group's total is the key's place in sorted.
__global__ void embedding_merge_tiles_kernel(uint64_t* sorted, const uint64_t* tiles, unsigned tile, unsigned n_tiles, unsigned lanes) {
    unsigned t = blockIdx.x * blockDim.x + threadIdx.x, lane = t % lanes, index = t / lanes;
    uint64_t key = index < n_tiles * tile ? tiles[index] : UINT64_MAX;
    unsigned place = 0;
    if (key != UINT64_MAX)
        for (unsigned u = lane; u < n_tiles; u += lanes) place += lower_bound_u64(tiles + (size_t)u * tile, tile, key);
    for (unsigned offset = lanes / 2; offset > 0; offset /= 2) place += __shfl_xor_sync(0xffffffffu, place, offset);
    if (lane == 0 && key != UINT64_MAX) sorted[place] = key;
}

// Keys per tile: a power of two, at most EMBEDDING_TILE.
static unsigned embedding_tile(int N) {
    unsigned tile = 2;
    while (tile < (unsigned)N && tile < EMBEDDING_TILE) tile *= 2;
    return tile;
}

// sorted[0 .. N) = the keys of rows 0 .. N-1 in increasing order; tiles: scratch of
// CEIL_DIV(N, tile) * tile keys.
static void embedding_sort_keys(const Device* d, uint64_t* sorted, uint64_t* tiles, const int* tokens, int N) {
    unsigned tile = embedding_tile(N), n_tiles = CEIL_DIV(N, tile), lanes = 1;
    while (lanes < n_tiles && lanes < 32) lanes *= 2;
    embedding_sort_tiles_kernel<<<n_tiles, tile / 2, 0, d->stream>>>(tiles, tokens, N);
    embedding_merge_tiles_kernel<<<CEIL_DIV(n_tiles * tile * lanes, 256), 256, 0, d->stream>>>(sorted, tiles, tile, n_tiles, lanes);
    cudaCheck(cudaGetLastError());
}

// The sorted keys are cut into segments of EMBEDDING_SEGMENT positions, so a frequent token's
// long run is shared by many blocks. Block (s, chunk) sums the pieces of runs inside segment
// s: a run that lies inside adds its sum to dwte; a piece of a run that began in an earlier
// segment (its token equals the one before the segment) goes to head[s]; the first piece of
// a run that goes on past the segment goes to tail[s]. Rows are loaded EMBEDDING_BATCH at a
// time, with the dwte rows they will add to, so the loads overlap.
#define EMBEDDING_SEGMENT 32
#define EMBEDDING_BATCH 8
#define NO_TOKEN 0xffffffffu  // token ids are below 2^31

__device__ __forceinline__ uint32_t token_at(const uint64_t* keys, int i, int N) { return i >= 0 && i < N ? (uint32_t)(keys[i] >> 32) : NO_TOKEN; }

template <typename T, int W>
__global__ void embedding_backward_wte_kernel(float* dwte, float* head, float* tail, const T* dout, const uint64_t* keys, int N, int C) {
    int s = blockIdx.x, c = (blockIdx.y * blockDim.x + threadIdx.x) * W;
    int begin = s * EMBEDDING_SEGMENT, end = min(N, begin + EMBEDDING_SEGMENT);
    if (c >= C) return;
    uint32_t before = token_at(keys, begin - 1, N), after = token_at(keys, end, N);
    float acc[W] = {0};
    for (int i0 = begin; i0 < end; i0 += EMBEDDING_BATCH) {
        Vec<T, W> g[EMBEDDING_BATCH];
        Vec<float, W> sum[EMBEDDING_BATCH];
        #pragma unroll
        for (int u = 0; u < EMBEDDING_BATCH && i0 + u < end; u++) {
            int i = i0 + u;
            uint32_t token = token_at(keys, i, N);
            g[u] = load_vec<W>(dout + (size_t)(uint32_t)keys[i] * C + c);
            int run_ends = i == end - 1 || token_at(keys, i + 1, N) != token;
            if (run_ends && token != before && token != after) sum[u] = load_vec<W>(dwte + (size_t)token * C + c);
        }
        #pragma unroll
        for (int u = 0; u < EMBEDDING_BATCH && i0 + u < end; u++) {
            int i = i0 + u;
            uint32_t token = token_at(keys, i, N);
            for (int k = 0; k < W; k++) acc[k] += to_float(g[u].v[k]);
            if (i < end - 1 && token_at(keys, i + 1, N) == token) continue;
            int to_dwte = token != before && token != after;
            for (int k = 0; k < W; k++) {
                sum[u].v[k] = (to_dwte ? sum[u].v[k] : 0.0f) + acc[k];
                acc[k] = 0.0f;
            }
            store_vec<W>(to_dwte ? dwte + (size_t)token * C + c : token == before ? head + (size_t)s * C + c : tail + (size_t)s * C + c, sum[u]);
        }
    }
}

// Block (s, chunk) finishes the run that begins in segment s and goes on past it, if there is
// one: its tail piece plus the head pieces of the following segments, in order.
template <int W>
__global__ void embedding_backward_runs_kernel(float* dwte, const float* head, const float* tail, const uint64_t* keys, int N, int C) {
    int s = blockIdx.x, c = (blockIdx.y * blockDim.x + threadIdx.x) * W;
    int begin = s * EMBEDDING_SEGMENT, last = min(N, begin + EMBEDDING_SEGMENT) - 1;
    uint32_t token = token_at(keys, last, N);
    if (c >= C || token_at(keys, last + 1, N) != token || token_at(keys, begin - 1, N) == token) return;
    Vec<float, W> sum = load_vec<W>(tail + (size_t)s * C + c), total = load_vec<W>(dwte + (size_t)token * C + c);
    for (int next = s + 1; token_at(keys, next * EMBEDDING_SEGMENT, N) == token; next++) {
        Vec<float, W> piece = load_vec<W>(head + (size_t)next * C + c);
        for (int k = 0; k < W; k++) sum.v[k] += piece.v[k];
    }
    for (int k = 0; k < W; k++) total.v[k] += sum.v[k];
    store_vec<W>(dwte + (size_t)token * C + c, total);
}

// Block x = position t: sums the B rows of position t in order.
template <typename T, int W>
__global__ void embedding_backward_wpe_kernel(float* dwpe, const T* dout, int B, int C) {
    int t = blockIdx.x, c = (blockIdx.y * blockDim.x + threadIdx.x) * W;
    if (c >= C) return;
    float acc[W] = {0};
    for (int b = 0; b < B; b++) {
        Vec<T, W> g = load_vec<W>(dout + ((size_t)t * B + b) * C + c);
        for (int k = 0; k < W; k++) acc[k] += to_float(g.v[k]);
    }
    float* dst = dwpe + (size_t)t * C + c;
    Vec<float, W> sum = load_vec<W>(dst);
    for (int k = 0; k < W; k++) sum.v[k] += acc[k];
    store_vec<W>(dst, sum);
}

// The gradients from the N sorted (token, row) keys: each segment of rows sums its runs of equal
// tokens, the runs cut by segment ends are joined, and dwpe sums over the batch.
static void embedding_backward_sorted(const Device* d, float* dwte, float* dwpe, const void* dout, const uint64_t* keys, int B, int T, int C) {
    int N = B * T, segments = CEIL_DIV(N, EMBEDDING_SEGMENT);
    float* pieces = (float*)pool_alloc(d, 2 * (size_t)segments * C * sizeof(float));  // head, then tail
    DTYPE_SWITCH(d->dtype, T_, {
        int vec = C % (16 / sizeof(T_)) == 0 && aligned16(dout) && aligned16(dwte) && aligned16(dwpe);
        VEC_SWITCH(vec, T_, W, {
            int threads = row_threads(C / W, 256), chunks = CEIL_DIV(C / W, threads);
            float *head = pieces, *tail = pieces + (size_t)segments * C;
            embedding_backward_wte_kernel<T_, W><<<dim3(segments, chunks), threads, 0, d->stream>>>(dwte, head, tail, (const T_*)dout, keys, N, C);
            embedding_backward_runs_kernel<W><<<dim3(segments, chunks), threads, 0, d->stream>>>(dwte, head, tail, keys, N, C);
            embedding_backward_wpe_kernel<T_, W><<<dim3(T, chunks), threads, 0, d->stream>>>(dwpe, (const T_*)dout, B, C);
        });
    });
    cudaCheck(cudaGetLastError());
    pool_free(d, pieces);
}

static void embedding_backward_cuda(const Device* d, float* dwte, float* dwpe, const void* dout, const int* tokens, int B, int T, int C) {
    int N = B * T;
    size_t n_tile_keys = (size_t)CEIL_DIV(N, embedding_tile(N)) * embedding_tile(N);
    uint64_t* keys = (uint64_t*)pool_alloc(d, (N + n_tile_keys) * sizeof(uint64_t));  // sorted, then the tiles
    embedding_sort_keys(d, keys, keys + N, tokens, N);
    embedding_backward_sorted(d, dwte, dwpe, dout, keys, B, T, C);
    pool_free(d, keys);
}
#endif

static void embedding_forward(const Device* d, void* out, const int* tokens, const void* wte, const void* wpe, int B, int T, int C) {
    if (B <= 0 || T <= 0 || C <= 0) die("embedding_forward: bad shape B=%d T=%d C=%d", B, T, C);
#ifdef __CUDACC__
    if (d->is_gpu) { embedding_forward_cuda(d, out, tokens, wte, wpe, B, T, C); return; }
#endif
    (void)d;
    embedding_forward_cpu<float>((float*)out, tokens, (const float*)wte, (const float*)wpe, B, T, C);
}

// dwte, dwpe: fp32, += (deterministic on the GPU too).
static void embedding_backward(const Device* d, float* dwte, float* dwpe, const void* dout, const int* tokens, int B, int T, int C) {
    if (B <= 0 || T <= 0 || C <= 0) die("embedding_backward: bad shape B=%d T=%d C=%d", B, T, C);
#ifdef __CUDACC__
    if (d->is_gpu) { embedding_backward_cuda(d, dwte, dwpe, dout, tokens, B, T, C); return; }
#endif
    (void)d;
    embedding_backward_cpu<float>(dwte, dwpe, (const float*)dout, tokens, B, T, C);
}
// <<< layers-embedding

// >>> layers-layernorm
// ----------------------------------------------------------------------------
// LayerNorm (Megatron-1 §2, Figure 2: pre-LN transformer layers and a final LayerNorm;
// eps 1e-5 and fp32 statistics, as apex's fused LayerNorm that Megatron uses)

#define LAYERNORM_EPS 1e-5

// out = (x - mean) * rstd * weight + bias per row; mean and rstd saved for the backward
// (either may be NULL when no backward follows).
template <typename real>
static void layernorm_forward_cpu(real* out, real* mean, real* rstd, const real* inp, const real* weight, const real* bias, int N, int C) {
    #pragma omp parallel for
    for (int r = 0; r < N; r++) {
        const real* x = inp + (size_t)r * C;
        real sum = 0, sq = 0;
        for (int c = 0; c < C; c++) sum += x[c];
        real m = sum / C;
        for (int c = 0; c < C; c++) sq += (x[c] - m) * (x[c] - m);
        real s = 1 / sqrt(sq / C + (real)LAYERNORM_EPS);
        real* o = out + (size_t)r * C;
        for (int c = 0; c < C; c++) o[c] = (x[c] - m) * s * weight[c] + bias[c];
        if (mean) mean[r] = m;
        if (rstd) rstd[r] = s;
    }
}

// With xhat = (x - mean) * rstd and g = dout * weight (the gradient of xhat):
// dinp += rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)); dweight += sum_r dout * xhat;
// dbias += sum_r dout. All three accumulate; so does dinp_sum (may be NULL) += sum_r dinp, the
// column sums of dinp once updated.
template <typename real>
static void layernorm_backward_cpu(real* dinp, real* dweight, real* dbias, real* dinp_sum, const real* dout, const real* inp,
                                   const real* weight, const real* mean, const real* rstd, int N, int C) {
    #pragma omp parallel for
    for (int r = 0; r < N; r++) {
        const real *x = inp + (size_t)r * C, *dy = dout + (size_t)r * C;
        real m = mean[r], s = rstd[r], sum_g = 0, sum_gx = 0;
        for (int c = 0; c < C; c++) {
            real g = dy[c] * weight[c];
            sum_g += g;
            sum_gx += g * (x[c] - m) * s;
        }
        real* dx = dinp + (size_t)r * C;
        for (int c = 0; c < C; c++) dx[c] += s * (dy[c] * weight[c] - sum_g / C - (x[c] - m) * s * sum_gx / C);
    }
    // Threads own slices of channels and add the rows in order: deterministic.
    #pragma omp parallel for
    for (int c0 = 0; c0 < C; c0 += 64)
        for (int r = 0; r < N; r++)
            for (int c = c0; c < c0 + 64 && c < C; c++) {
                real dy = dout[(size_t)r * C + c];
                dweight[c] += dy * (inp[(size_t)r * C + c] - mean[r]) * rstd[r];
                dbias[c] += dy;
                if (dinp_sum) dinp_sum[c] += dinp[(size_t)r * C + c];
            }
}

#ifdef __CUDACC__
// The rows of a block are shared among row teams: the threads with the same threadIdx.y.
// Every thread of the block calls team_sum2 (a team of one warp needs no barrier); each
// gets its team's (sum of a, sum of b), added in a fixed order.
__device__ float2 team_sum2(float a, float b, float2* scratch /* shared, one per warp of the block */) {
    a = warp_sum(a);
    b = warp_sum(b);
    if (blockDim.x == 32) return make_float2(a, b);
    int warps = blockDim.x / 32, first = threadIdx.y * warps;
    if (threadIdx.x % 32 == 0) scratch[first + threadIdx.x / 32] = make_float2(a, b);
    __syncthreads();
    float2 total = make_float2(0.0f, 0.0f);
    for (int w = 0; w < warps; w++) {
        total.x += scratch[first + w].x;
        total.y += scratch[first + w].y;
    }
    __syncthreads();  // the next call reuses scratch
    return total;
}

// LayerNorm's kernels hold whole rows in registers: a row team of whole warps takes a row, and
// thread j of the team its 16-byte channel groups j, j + team, ..., at most LN_GROUPS of them.
#define LN_GROUPS 4

// The team's threads for rows of `groups` groups (0 when that is more than `most`).
static int layernorm_team(int groups, int most) {
    int team = 32 * CEIL_DIV(groups, 32 * LN_GROUPS);
    return team <= most ? team : 0;
}

// launch(std::integral_constant<int, G>()) for the groups a thread of a `team` holds, G <= LN_GROUPS.
template <typename F>
static void layernorm_groups_switch(int groups, int team, F launch) {
    switch (CEIL_DIV(groups, team)) {
        case 1: launch(std::integral_constant<int, 1>()); break;
        case 2: launch(std::integral_constant<int, 2>()); break;
        case 3: launch(std::integral_constant<int, 3>()); break;
        default: launch(std::integral_constant<int, LN_GROUPS>()); break;
    }
    cudaCheck(cudaGetLastError());
}

// The row is loaded once, all its groups at a time, then reduced twice (mean, then variance
// about it) and normalised from registers. Row teams of several warps add through team_sum2.
template <typename T, int W, int G>
__global__ void __launch_bounds__(1024) layernorm_forward_kernel(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                                                                 const T* bias, int N, int C) {
    __shared__ float2 scratch[32];
    int r = blockIdx.x * blockDim.y + threadIdx.y, S = blockDim.x, groups = C / W;
    int mine = r < N ? groups : 0;  // threads without a row hold nothing but still meet team_sum2's barriers
    const T* x = inp + (size_t)r * C;
    Vec<T, W> xv[G];
    float sum = 0, sq = 0;
#pragma unroll
    for (int g = 0; g < G; g++)
        if (threadIdx.x + g * S < mine) xv[g] = load_vec<W>(x + (threadIdx.x + g * S) * W);
#pragma unroll
    for (int g = 0; g < G; g++)
        if (threadIdx.x + g * S < mine)
            for (int k = 0; k < W; k++) sum += to_float(xv[g].v[k]);
    float m = team_sum2(sum, 0.0f, scratch).x / C;
#pragma unroll
    for (int g = 0; g < G; g++)
        if (threadIdx.x + g * S < mine)
            for (int k = 0; k < W; k++) sq += (to_float(xv[g].v[k]) - m) * (to_float(xv[g].v[k]) - m);
    float s = 1.0f / sqrtf(team_sum2(sq, 0.0f, scratch).x / C + (float)LAYERNORM_EPS);
    if (r >= N) return;
#pragma unroll
    for (int g = 0; g < G; g++) {
        int j = threadIdx.x + g * S;
        if (j >= groups) continue;
        Vec<T, W> wv = load_vec<W>(weight + j * W), bv = load_vec<W>(bias + j * W), ov;
        for (int k = 0; k < W; k++) ov.v[k] = from_float<T>((to_float(xv[g].v[k]) - m) * s * to_float(wv.v[k]) + to_float(bv.v[k]));
        store_vec<W>(out + (size_t)r * C + j * W, ov);
    }
    if (threadIdx.x == 0 && mean) mean[r] = m;
    if (threadIdx.x == 0 && rstd) rstd[r] = s;
}

template <typename T, int W>
static void layernorm_forward_rows(const Device* d, T* out, float* mean, float* rstd, const T* inp, const T* weight, const T* bias, int N, int C) {
    int team = layernorm_team(C / W, 1024);
    if (!team) die("layernorm_forward: hidden size %d is wider than a block holds in registers (%d channels)", C, 1024 * LN_GROUPS * W);
    int rows = team < 256 ? 256 / team : 1;
    dim3 block(team, rows);
    layernorm_groups_switch(C / W, team, [&](auto G) {
        layernorm_forward_kernel<T, W, G.value><<<CEIL_DIV(N, rows), block, 0, d->stream>>>(out, mean, rstd, inp, weight, bias, N, C);
    });
}

static void layernorm_forward_cuda(const Device* d, void* out, float* mean, float* rstd, const void* inp, const void* weight, const void* bias, int N, int C) {
    DTYPE_SWITCH(d->dtype, T, {
        int vec = C % (16 / sizeof(T)) == 0 && aligned16(out) && aligned16(inp) && aligned16(weight) && aligned16(bias);
        VEC_SWITCH(vec, T, W, layernorm_forward_rows<T, W>(d, (T*)out, mean, rstd, (const T*)inp, (const T*)weight, (const T*)bias, N, C));
    });
}

// Deterministic column sums over many rows, in two stages: a fixed number of blocks
// (ROW_CHUNKS, whatever the GPU) each sum a contiguous chunk of rows into a partial row, then
// column_sum_kernel adds the partial rows in order. Same bits on every run and every GPU.
#define ROW_CHUNKS 512

static int row_chunks(int N) { return N < ROW_CHUNKS ? N : ROW_CHUNKS; }

// Up to three column sums of partial rows in one launch: out_k[c] += sum over i of
// partials[(k * rows + i) * C + c], i = 0 .. rows-1 in a fixed order, k = blockIdx.y. Blocks of 32 x
// 32 threads: x picks the column, y a strided subset of rows (loads unrolled, so several are in
// flight); the 32 subtotals are then added by y = 0 in order.
typedef struct {
    float* out[3];
} ColumnSumOutputs;

__global__ void column_sum_kernel(ColumnSumOutputs outs, const float* partials, int rows, int C) {
    __shared__ float subtotal[32][33];
    float* out = outs.out[blockIdx.y];
    partials += (size_t)blockIdx.y * rows * C;
    int c = blockIdx.x * 32 + threadIdx.x;
    float acc = 0;
    if (c < C)
#pragma unroll 8
        for (int i = threadIdx.y; i < rows; i += 32) acc += partials[(size_t)i * C + c];
    subtotal[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float sum = 0;
        for (int y = 0; y < 32; y++) sum += subtotal[y][threadIdx.x];
        out[c] += sum;
    }
}

// The first `count` of out0, out1, out2 from as many sets of `rows` partial rows.
static void column_sum(const Device* d, float* out0, float* out1, float* out2, int count, const float* partials, int rows, int C) {
    ColumnSumOutputs outs = {{out0, out1, out2}};
    column_sum_kernel<<<dim3(CEIL_DIV(C, 32), count), dim3(32, 32), 0, d->stream>>>(outs, partials, rows, C);
    cudaCheck(cudaGetLastError());
}

// Team 0 gets, in v, the sum over the block's row teams of each thread's K values: its own
// first, then team 1's, 2's, ... in order, through `stage` ((blockDim.y - 1) * K * blockDim.x
// shared floats, k-major so that neighbouring threads hit neighbouring banks). Every thread calls it.
template <int K>
__device__ void add_teams(float (&v)[K], float* stage) {
    int x = threadIdx.x, y = threadIdx.y, S = blockDim.x;
    if (blockDim.y == 1) return;
    if (y > 0)
        for (int k = 0; k < K; k++) stage[((y - 1) * K + k) * S + x] = v[k];
    __syncthreads();
    if (y == 0)
        for (int t = 1; t < (int)blockDim.y; t++)
            for (int k = 0; k < K; k++) v[k] += stage[((t - 1) * K + k) * S + x];
    __syncthreads();
}

// LayerNorm backward with each row in registers. Block i takes a contiguous chunk of rows
// (ROW_CHUNKS); its row teams of blockDim.x threads take turns at the rows, one row per team at
// a time; a thread holds G channel groups of W (j = threadIdx.x + g * blockDim.x) of x, dout
// and dinp, all loaded before the row's two sums, and keeps its channels' dweight and dbias sums
// (and with SUMS = 3 those of the updated dinp) in registers across the chunk. The teams' sums are
// added in order and go to partial rows i (dweight), gridDim.x + i (dbias) and 2 gridDim.x + i
// (dinp) for column_sum.
#define LN_BWD_THREADS 256  // most threads of a block (and of a team)
#define LN_BWD_TEAMS_THREADS 128  // threads the teams of a block add up to, when teams are small: with
                                  // ~200 registers a thread, small blocks fill the register file better

template <typename T, int W, int G, int MAX_REGS, int SUMS>
__global__ void __maxnreg__(MAX_REGS) layernorm_backward_rows_kernel(T* dinp, float* partials, const T* dout, const T* inp, const T* weight,
                                                                                const float* mean, const float* rstd, int N, int C) {
    extern __shared__ float stage[];  // for add_teams
    __shared__ float2 scratch[LN_BWD_THREADS / 32];
    int S = blockDim.x, groups = C / W;
    int r_begin = (int)((long)blockIdx.x * N / gridDim.x), r_end = (int)((long)(blockIdx.x + 1) * N / gridDim.x);
    Vec<T, W> w[G];
    float sums[G][SUMS * W];  // dweight (k < W), dbias (W <= k < 2W) and dinp of this thread's channels
#pragma unroll
    for (int g = 0; g < G; g++) {
        int j = threadIdx.x + g * S;
        if (j < groups) w[g] = load_vec<W>(weight + j * W);
        for (int k = 0; k < SUMS * W; k++) sums[g][k] = 0.0f;
    }
    for (int r0 = r_begin; r0 < r_end; r0 += blockDim.y) {  // the same trip count for every team: team_sum2 has barriers
        int r = r0 + threadIdx.y;
        bool has_row = r < r_end;
        Vec<T, W> xv[G], dyv[G], dxv[G];
        float m = 0, s = 0, sum_g = 0, sum_gx = 0;  // g = dout * weight, the gradient of xhat
        if (has_row) {
            m = mean[r];
            s = rstd[r];
#pragma unroll
            for (int g = 0; g < G; g++) {
                int j = threadIdx.x + g * S;
                if (j >= groups) continue;
                size_t at = (size_t)r * C + j * W;
                xv[g] = load_vec<W>(inp + at);
                dyv[g] = load_vec<W>(dout + at);
                dxv[g] = load_vec<W>(dinp + at);
            }
#pragma unroll
            for (int g = 0; g < G; g++) {
                if (threadIdx.x + g * S >= groups) continue;
                for (int k = 0; k < W; k++) {
                    float gk = to_float(dyv[g].v[k]) * to_float(w[g].v[k]);
                    sum_g += gk;
                    sum_gx += gk * (to_float(xv[g].v[k]) - m) * s;
                }
            }
        }
        float2 total = team_sum2(sum_g, sum_gx, scratch);
        if (!has_row) continue;
        float mean_g = total.x / C, mean_gx = total.y / C;
#pragma unroll
        for (int g = 0; g < G; g++) {
            int j = threadIdx.x + g * S;
            if (j >= groups) continue;
            for (int k = 0; k < W; k++) {
                float xhat = (to_float(xv[g].v[k]) - m) * s, dyk = to_float(dyv[g].v[k]);
                dxv[g].v[k] = from_float<T>(to_float(dxv[g].v[k]) + s * (dyk * to_float(w[g].v[k]) - mean_g - xhat * mean_gx));
                sums[g][k] += dyk * xhat;
                sums[g][W + k] += dyk;
                if (SUMS == 3) sums[g][2 * W + k] += to_float(dxv[g].v[k]);
            }
            store_vec<W>(dinp + (size_t)r * C + j * W, dxv[g]);
        }
    }
#pragma unroll
    for (int g = 0; g < G; g++) add_teams<SUMS * W>(sums[g], stage);
    if (threadIdx.y > 0) return;
#pragma unroll
    for (int g = 0; g < G; g++) {
        int j = threadIdx.x + g * S;
        if (j >= groups) continue;
        for (int set = 0; set < SUMS; set++) {
            Vec<float, W> part;
            for (int k = 0; k < W; k++) part.v[k] = sums[g][set * W + k];
            store_vec<W>(partials + ((size_t)set * gridDim.x + blockIdx.x) * C + j * W, part);
        }
    }
}

template <typename T, int W, int MAX_REGS, int SUMS>
static void layernorm_backward_rows(const Device* d, float* partials, int chunks, T* dinp, const T* dout, const T* inp,
                                    const T* weight, const float* mean, const float* rstd, int N, int C) {
    int team = layernorm_team(C / W, LN_BWD_THREADS);
    int teams = LN_BWD_TEAMS_THREADS / team, rows_per_block = CEIL_DIV(N, chunks);
    if (teams > rows_per_block) teams = rows_per_block;
    if (teams < 1) teams = 1;
    dim3 block(team, teams);
    size_t smem = (size_t)(teams - 1) * SUMS * W * team * sizeof(float);
    layernorm_groups_switch(C / W, team, [&](auto G) {
        layernorm_backward_rows_kernel<T, W, G.value, MAX_REGS, SUMS><<<chunks, block, smem, d->stream>>>(dinp, partials, dout, inp, weight, mean, rstd, N, C);
    });
}

// Rows too wide for registers: block i takes its chunk one row at a time with all its threads,
// rereading the row (from L1) after the two sums; each thread owns W-wide channel groups and
// keeps their dweight/dbias sums in shared memory (k-major, so neighbouring threads hit
// neighbouring banks). Partial rows as layernorm_backward_rows_kernel.
template <typename T, int W>
__global__ void __launch_bounds__(1024) layernorm_backward_smem_kernel(T* dinp, float* partials, const T* dout, const T* inp, const T* weight,
                                                                       const float* mean, const float* rstd, int N, int C) {
    extern __shared__ float channel_sums[];  // dweight [W][C/W], then dbias [W][C/W]
    __shared__ float2 scratch[32];
    int groups = C / W;
    float *dweight_sum = channel_sums, *dbias_sum = channel_sums + C;
    for (int j = threadIdx.x; j < groups; j += blockDim.x)
        for (int k = 0; k < W; k++) dweight_sum[k * groups + j] = dbias_sum[k * groups + j] = 0.0f;
    int r_begin = (int)((long)blockIdx.x * N / gridDim.x), r_end = (int)((long)(blockIdx.x + 1) * N / gridDim.x);
    for (int r = r_begin; r < r_end; r++) {
        const T *x = inp + (size_t)r * C, *dy = dout + (size_t)r * C;
        float m = mean[r], s = rstd[r], sum_g = 0, sum_gx = 0;  // g = dout * weight, the gradient of xhat
        for (int j = threadIdx.x; j < groups; j += blockDim.x) {
            Vec<T, W> xv = load_vec<W>(x + j * W), dyv = load_vec<W>(dy + j * W), wv = load_vec<W>(weight + j * W);
            for (int k = 0; k < W; k++) {
                float g = to_float(dyv.v[k]) * to_float(wv.v[k]);
                sum_g += g;
                sum_gx += g * (to_float(xv.v[k]) - m) * s;
            }
        }
        float2 sums = team_sum2(sum_g, sum_gx, scratch);
        float mean_g = sums.x / C, mean_gx = sums.y / C;
        T* dx = dinp + (size_t)r * C;
        for (int j = threadIdx.x; j < groups; j += blockDim.x) {
            Vec<T, W> xv = load_vec<W>(x + j * W), dyv = load_vec<W>(dy + j * W), wv = load_vec<W>(weight + j * W), dxv = load_vec<W>(dx + j * W);
            for (int k = 0; k < W; k++) {
                float xhat = (to_float(xv.v[k]) - m) * s, dyk = to_float(dyv.v[k]);
                dxv.v[k] = from_float<T>(to_float(dxv.v[k]) + s * (dyk * to_float(wv.v[k]) - mean_g - xhat * mean_gx));
                dweight_sum[k * groups + j] += dyk * xhat;
                dbias_sum[k * groups + j] += dyk;
            }
            store_vec<W>(dx + j * W, dxv);
        }
    }
    float *dweight_part = partials + (size_t)blockIdx.x * C, *dbias_part = partials + ((size_t)gridDim.x + blockIdx.x) * C;
    for (int j = threadIdx.x; j < groups; j += blockDim.x)
        for (int k = 0; k < W; k++) {
            dweight_part[j * W + k] = dweight_sum[k * groups + j];
            dbias_part[j * W + k] = dbias_sum[k * groups + j];
        }
}

template <typename T, int W>
static void layernorm_backward_smem(const Device* d, float* partials, int chunks, T* dinp, const T* dout, const T* inp, const T* weight,
                                    const float* mean, const float* rstd, int N, int C) {
    size_t smem = 2 * (size_t)C * sizeof(float);
    if (smem > 48 * 1024) {
        if (smem + 32 * sizeof(float2) > (size_t)smem_optin_limit(d)) die("layernorm_backward: hidden size %d needs more shared memory than this GPU has", C);
        set_dynamic_smem(layernorm_backward_smem_kernel<T, W>, smem);
    }
    layernorm_backward_smem_kernel<T, W><<<chunks, row_threads(C / W, 1024), smem, d->stream>>>(dinp, partials, dout, inp, weight, mean, rstd, N, C);
    cudaCheck(cudaGetLastError());
}

static void layernorm_backward_cuda(const Device* d, void* dinp, float* dweight, float* dbias, float* dinp_sum, const void* dout, const void* inp,
                                    const void* weight, const float* mean, const float* rstd, int N, int C) {
    int chunks = row_chunks(N), sums = 2;  // 3 where the rows kernel also sums dinp (the uncapped one)
    float* partials = (float*)pool_alloc(d, (dinp_sum ? 3 : 2) * (size_t)chunks * C * sizeof(float));
    DTYPE_SWITCH(d->dtype, T, {
        int vec = C % (16 / sizeof(T)) == 0 && aligned16(dinp) && aligned16(dout) && aligned16(inp) && aligned16(weight);
        VEC_SWITCH(vec, T, W, {
            // A team of several warps meets at a barrier every row; more resident blocks hide that, so
            // those kernels are capped at 168 registers (4 blocks of 96 threads per SM at hidden size
            // 2304: 62 against 77 us on an H200). One-warp teams keep every register (the cap spills:
            // 52 against 49 us at 768), and so do threads of four channel groups (it spills more).
            int team = layernorm_team(C / W, LN_BWD_THREADS);
            // dinp's sums ride in the rows kernel where it is not capped; under the 168-register cap the
            // third set spilled (LayerNorm backward ~50 us slower at hidden size 2304 on an H200, more
            // than the separate pass), so there a read-only pass sums dinp after.
            if (team > 32 && CEIL_DIV(C / W, team) < LN_GROUPS)
                layernorm_backward_rows<T, W, 168, 2>(d, partials, chunks, (T*)dinp, (const T*)dout, (const T*)inp, (const T*)weight, mean, rstd, N, C);
            else if (team && dinp_sum) {
                sums = 3;
                layernorm_backward_rows<T, W, 255, 3>(d, partials, chunks, (T*)dinp, (const T*)dout, (const T*)inp, (const T*)weight, mean, rstd, N, C);
            } else if (team)
                layernorm_backward_rows<T, W, 255, 2>(d, partials, chunks, (T*)dinp, (const T*)dout, (const T*)inp, (const T*)weight, mean, rstd, N, C);
            else
                layernorm_backward_smem<T, W>(d, partials, chunks, (T*)dinp, (const T*)dout, (const T*)inp, (const T*)weight, mean, rstd, N, C);
        });
    });
    column_sum(d, dweight, dbias, dinp_sum, sums, partials, chunks, C);
    pool_free(d, partials);
    if (dinp_sum && sums == 2) matmul_dbias_cuda(d, dinp_sum, dinp, NULL, N, C);  // (read only)
}
#endif

static void layernorm_forward(const Device* d, void* out, float* mean, float* rstd, const void* inp, const void* weight, const void* bias, int N, int C) {
    if (N < 0 || C <= 0) die("layernorm_forward: bad shape N=%d C=%d", N, C);
    if (N == 0) return;
#ifdef __CUDACC__
    if (d->is_gpu) { layernorm_forward_cuda(d, out, mean, rstd, inp, weight, bias, N, C); return; }
#endif
    (void)d;
    layernorm_forward_cpu<float>((float*)out, mean, rstd, (const float*)inp, (const float*)weight, (const float*)bias, N, C);
}

// dinp (dtype) +=, dweight and dbias (fp32) +=; deterministic on the GPU. dinp_sum (fp32, may be
// NULL) += the column sums of dinp once updated: where dinp is the residual stream's gradient, the
// bias gradient of the projection whose output joined the stream there (no hidden dropout between),
// without a pass of its own over dinp.
static void layernorm_backward(const Device* d, void* dinp, float* dweight, float* dbias, float* dinp_sum, const void* dout, const void* inp,
                               const void* weight, const float* mean, const float* rstd, int N, int C) {
    if (N < 0 || C <= 0) die("layernorm_backward: bad shape N=%d C=%d", N, C);
    if (N == 0) return;
#ifdef __CUDACC__
    if (d->is_gpu) { layernorm_backward_cuda(d, dinp, dweight, dbias, dinp_sum, dout, inp, weight, mean, rstd, N, C); return; }
#endif
    (void)d;
    layernorm_backward_cpu<float>((float*)dinp, dweight, dbias, dinp_sum, (const float*)dout, (const float*)inp, (const float*)weight, mean, rstd, N, C);
}
// <<< layers-layernorm

// >>> layers-attention
// ----------------------------------------------------------------------------
// 3. layers: causal self-attention (Megatron-1 §3), computed flash-style
//
// qkv is the QKV projection's output, [N = T*B rows, 3C], in Megatron's per-head
// interleaved order: for row r = t*B + b and head h, q = qkv[r*3C + h*3HS + 0*HS ..],
// k = .. + 1*HS, v = .. + 2*HS (so a tensor-parallel rank's heads are a contiguous
// column block). out is [N, C], head h in columns h*HS .. h*HS+HS. lse is fp32
// [B, NH, T]: the logsumexp of each query row's scaled scores, which the backward
// uses to rebuild the probabilities without storing them.
//   out_i = sum_{j<=i} drop_ij * softmax_j(q_i . k_j / sqrt(HS)) * v_j
// Attention dropout keeps prob (b,h,i,j) iff dropout_keep(seed, ((b*NH+h)*T+i)*T+j, p)
// and scales kept ones by 1/(1-p); the backward regenerates the same mask.
// Generation reads keys and values from a KV cache: attention_decode computes only the query
// rows [pos, pos+n) of the same attention over rows [0, pos+n) (the forward's first = pos).
// Backward (FlashAttention-2): with P the probabilities, M the dropout mask times
// 1/(1-p), delta_i = dout_i . out_i = sum_j P_ij M_ij (dout_i . v_j):
//   dv_j = sum_i P_ij M_ij dout_i,   dS_ij = P_ij (M_ij (dout_i . v_j) - delta_i),
//   dq_i = scale sum_j dS_ij k_j,    dk_j = scale sum_i dS_ij q_i.
// The backward also writes delta (fp32 [B, NH, T]): the CUDA backward passes it from
// its dq kernel to its dk/dv kernel, and the caller lends the space.

// The row of time step t, batch b in the [s, b, h] layout.
#define ATT_ROW(t, b, B) ((size_t)(t) * (B) + (b))

static void attention_check(float p, int B, int T, int NH, int HS) {
    if (B < 1 || T < 1 || NH < 1 || HS < 1) die("attention: bad shape B=%d T=%d NH=%d HS=%d", B, T, NH, HS);
    if (!(p >= 0.0f && p < 1.0f)) die("attention: dropout probability %g is not in [0, 1)", p);
}

// Query rows [first, T) of causal attention over qkv rows [0, T) (first = 0: all of them);
// out holds those rows as [T-first, B, C], lse as [B, NH, T-first].
template <typename real>
static void attention_forward_cpu(real* out, real* lse, const real* qkv, int first, float p, uint64_t seed,
                                  int B, int T, int NH, int HS) {
    int C = NH * HS, rows = T - first;
    size_t ld = 3 * (size_t)C;
    real scale = 1 / sqrt((real)HS), keep_scale = 1 / (1 - (real)p);
#pragma omp parallel
    {
        real* att = (real*)xmalloc(T * sizeof(real));  // one query row's scores, then weights
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                const real* head = qkv + (size_t)b * ld + h * 3 * HS;  // q of (t=0, b, h)
                size_t tstride = (size_t)B * ld;
                for (int i = first; i < T; i++) {
                    const real* q = head + i * tstride;
                    real mx = -INFINITY;
                    for (int j = 0; j <= i; j++) {
                        const real* k = head + j * tstride + HS;
                        real s = 0;
                        for (int d = 0; d < HS; d++) s += q[d] * k[d];
                        att[j] = s * scale;
                        if (att[j] > mx) mx = att[j];
                    }
                    real sum = 0;
                    for (int j = 0; j <= i; j++) { att[j] = exp(att[j] - mx); sum += att[j]; }
                    lse[((size_t)b * NH + h) * rows + i - first] = mx + log(sum);
                    real* o = out + ATT_ROW(i - first, b, B) * C + h * HS;
                    for (int d = 0; d < HS; d++) o[d] = 0;
                    uint64_t drop_row = ((uint64_t)(b * NH + h) * T + i) * T;
                    for (int j = 0; j <= i; j++) {
                        real w = att[j] / sum;
                        if (p > 0) w = dropout_keep(seed, drop_row + j, p) ? w * keep_scale : 0;
                        const real* v = head + j * tstride + 2 * HS;
                        for (int d = 0; d < HS; d++) o[d] += w * v[d];
                    }
                }
            }
        }
        free(att);
    }
}

// dqkv (=, written fully) and delta (=) from dout, the forward's out and lse.
template <typename real>
static void attention_backward_cpu(real* dqkv, real* delta, const real* dout, const real* qkv, const real* out,
                                   const real* lse, float p, uint64_t seed, int B, int T, int NH, int HS) {
    int C = NH * HS;
    size_t ld = 3 * (size_t)C, tstride = (size_t)B * ld;
    real scale = 1 / sqrt((real)HS), keep_scale = 1 / (1 - (real)p);
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            const real* head = qkv + (size_t)b * ld + h * 3 * HS;
            real* dhead = dqkv + (size_t)b * ld + h * 3 * HS;
            for (int t = 0; t < T; t++)
                for (int d = 0; d < 3 * HS; d++) dhead[t * tstride + d] = 0;
            for (int i = 0; i < T; i++) {
                const real* q = head + i * tstride;
                const real* g = dout + ATT_ROW(i, b, B) * C + h * HS;
                const real* o = out + ATT_ROW(i, b, B) * C + h * HS;
                real* dq = dhead + i * tstride;
                size_t bhi = ((size_t)b * NH + h) * T + i;
                real di = 0;
                for (int d = 0; d < HS; d++) di += g[d] * o[d];
                delta[bhi] = di;
                uint64_t drop_row = (uint64_t)bhi * T;
                for (int j = 0; j <= i; j++) {
                    const real* k = head + j * tstride + HS;
                    const real* v = k + HS;
                    real* dk = dhead + j * tstride + HS;
                    real* dv = dk + HS;
                    real s = 0, gv = 0;
                    for (int d = 0; d < HS; d++) { s += q[d] * k[d]; gv += g[d] * v[d]; }
                    real prob = exp(s * scale - lse[bhi]);
                    real m = p > 0 ? (dropout_keep(seed, drop_row + j, p) ? keep_scale : 0) : 1;
                    real ds = prob * (m * gv - di) * scale;
                    for (int d = 0; d < HS; d++) {
                        dv[d] += prob * m * g[d];
                        dq[d] += ds * k[d];
                        dk[d] += ds * q[d];
                    }
                }
            }
        }
    }
}

#ifdef __CUDACC__
// ---- CUDA. Half types (bf16, fp16) run FlashAttention-2 kernels on the tensor cores
// (mma.sync m16n8k16, fp32 accumulation); fp32 storage runs simple warp-per-row kernels.

#define ATT_WARPS 4
#define ATT_THREADS (ATT_WARPS * 32)
#define ATT_ROWS (16 * ATT_WARPS)  // rows a block owns, 16 per warp: query rows (forward, dq) or keys (dk/dv)
#define ATT_KTILE 64               // keys per step of the forward and dq loops
#define ATT_PAD 8  // shared-memory rows are HS+8 elements long: ldmatrix reads hit distinct banks
#define ATT_LN2 0.6931471805599453f

// Query rows per step of the dk/dv loop: fewer for large heads, whose dk and dv
// accumulators already fill most of the registers.
__host__ __device__ constexpr int att_qtile(int HS) { return HS > 64 ? 32 : 64; }
// dk/dv blocks per SM: on Hopper, capping small heads at 168 registers fits three instead of
// two (a few bytes spill; measured 2-3% faster at HS 64 on an H200); large heads need them all.
// Before Hopper three blocks do not fit in shared memory, so the cap would only spill.
__host__ __device__ constexpr int att_dkdv_min_blocks(int HS) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    return 1;
#else
    return HS > 64 ? 1 : 3;
#endif
}

// Four 8x8 16-bit matrices from shared memory; lane l gives the address of row l%8 of matrix l/8.
__device__ __forceinline__ void att_ldsm(uint32_t r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void att_ldsm_trans(uint32_t r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// c[16x8] += a[16x16] b[16x8]. Fragments (g = lane/4, q = lane%4): a = rows g, g+8 of
// columns 2q.. and 2q+8..; b = column g at rows 2q.., 2q+8..; c = {c0, c1} row g and
// {c2, c3} row g+8, columns 2q, 2q+1.
template <typename F> __device__ __forceinline__ void att_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void att_mma<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void att_mma<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a pair of F in one register, the first in the low half (one cvt).
template <typename F> __device__ __forceinline__ uint32_t att_pack(float lo, float hi);
template <> __device__ __forceinline__ uint32_t att_pack<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t*)&pair;
}
template <> __device__ __forceinline__ uint32_t att_pack<__half>(float lo, float hi) {
    __half2 pair = __floats2half2_rn(lo, hi);
    return *(uint32_t*)&pair;
}

// acc[16 x 8NT] += A[16 x K] B[8NT x K]^T, A and B rows in shared memory (row stride ld).
template <typename F, int K, int NT>
__device__ __forceinline__ void att_mma_abt(float acc[NT][4], const F* a, const F* b, int ld) {
    int lane = threadIdx.x % 32;
    const F* a_lane = a + (((lane >> 3) & 1) * 8 + (lane & 7)) * ld + (lane >> 4) * 8;
    const F* b_lane = b + ((lane >> 4) * 8 + (lane & 7)) * ld + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int k = 0; k < K; k += 16) {
        uint32_t af[4];
        att_ldsm(af, a_lane + k);
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
            uint32_t bf[4];
            att_ldsm(bf, b_lane + n * 8 * ld + k);
            att_mma<F>(acc[n], af, bf[0], bf[1]);
            att_mma<F>(acc[n + 1], af, bf[2], bf[3]);
        }
    }
}

// acc[16 x 8NT] += A[16 x 16KS] B[16KS x 8NT], A in registers (mma A fragments), B rows
// in shared memory (row stride ld).
template <typename F, int KS, int NT>
__device__ __forceinline__ void att_mma_ab(float acc[NT][4], const uint32_t a[KS][4], const F* b, int ld) {
    int lane = threadIdx.x % 32;
    const F* b_lane = b + (((lane >> 3) & 1) * 8 + (lane & 7)) * ld + (lane >> 4) * 8;
#pragma unroll
    for (int ks = 0; ks < KS; ks++) {
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
            uint32_t bf[4];
            att_ldsm_trans(bf, b_lane + ks * 16 * ld + n * 8);
            att_mma<F>(acc[n], a[ks], bf[0], bf[1]);
            att_mma<F>(acc[n + 1], a[ks], bf[2], bf[3]);
        }
    }
}

// An accumulator tile [16 x 16KS] (C fragments) becomes the A operand of the next product.
template <typename F, int KS>
__device__ __forceinline__ void att_c_to_a(uint32_t a[KS][4], const float c[2 * KS][4]) {
#pragma unroll
    for (int ks = 0; ks < KS; ks++) {
        a[ks][0] = att_pack<F>(c[2 * ks][0], c[2 * ks][1]);
        a[ks][1] = att_pack<F>(c[2 * ks][2], c[2 * ks][3]);
        a[ks][2] = att_pack<F>(c[2 * ks + 1][0], c[2 * ks + 1][1]);
        a[ks][3] = att_pack<F>(c[2 * ks + 1][2], c[2 * ks + 1][3]);
    }
}

// Rows t0 .. t0+R-1 of one head's q, k or v (or of out/dout) into shared memory, async;
// g points at time 0, consecutive times are tstride elements apart; rows >= T become zeros.
template <typename F, int HS, int R>
__device__ __forceinline__ void att_load_rows(F* s, const F* g, size_t tstride, int t0, int T) {
    constexpr int CHUNKS = HS / 8;  // 16-byte pieces of a row
    static_assert(R * CHUNKS % ATT_THREADS == 0, "tile rows must split evenly over the threads");
#pragma unroll
    for (int k = 0; k < R * CHUNKS / ATT_THREADS; k++) {
        int idx = threadIdx.x + k * ATT_THREADS, r = idx / CHUNKS, c = idx % CHUNKS;
        bool valid = t0 + r < T;
        cp_async16(s + r * (HS + ATT_PAD) + c * 8, valid ? g + (t0 + r) * tstride + c * 8 : g, valid);
    }
}

// A warp's accumulator tile [16 x HS] to global rows t0 .. t0+15 (rows >= T skipped),
// staged through the warp's own 16 shared-memory rows s for 16-byte stores.
template <typename F, int HS>
__device__ __forceinline__ void att_store_rows(F* g, size_t tstride, int t0, int T, const float acc[HS / 8][4], F* s) {
    constexpr int LD = HS + ATT_PAD, CHUNKS = HS / 8;
    int lane = threadIdx.x % 32, gr = lane / 4, q = lane % 4;
    __syncwarp();
#pragma unroll
    for (int n = 0; n < HS / 8; n++) {
        *(uint32_t*)(s + gr * LD + n * 8 + 2 * q) = att_pack<F>(acc[n][0], acc[n][1]);
        *(uint32_t*)(s + (gr + 8) * LD + n * 8 + 2 * q) = att_pack<F>(acc[n][2], acc[n][3]);
    }
    __syncwarp();
    for (int idx = lane; idx < 16 * CHUNKS; idx += 32) {
        int r = idx / CHUNKS, c = idx % CHUNKS;
        if (t0 + r < T) *(int4*)(g + (t0 + r) * tstride + c * 8) = *(const int4*)(s + r * LD + c * 8);
    }
}

// The dk/dv kernels' per-query-tile statistics: lse (in log2 units) and delta of rows t0 .. t0+R-1
// of head bh into shared memory (zeros past T), over the block's THREADS threads.
template <int R, int THREADS>
__device__ __forceinline__ void att_load_stats(float* lse_s, float* delta_s, const float* lse, const float* delta, int bh, int t0,
                                               int T) {
    for (int r = threadIdx.x; r < R; r += THREADS) {
        int t = t0 + r;
        lse_s[r] = t < T ? lse[(size_t)bh * T + t] * LOG2E : 0;
        delta_s[r] = t < T ? delta[(size_t)bh * T + t] : 0;
    }
}

// ---- What every half-precision kernel does per tile, on accumulators in the C fragment layout
// (att_mma): a thread holds rows rows[0], rows[1] (or keys) at columns n*8 + 2*q4 + (c&1).

// The forward's online softmax over one key tile (FlashAttention-2, Dao 2023, alg. 1): masks keys
// past the diagonal, updates the running max m (log2 units) and this thread's part of the row
// sums l, rescales the output accumulator o and leaves the (dropped) probabilities in s.
template <int BN, int HS>
__device__ __forceinline__ void att_softmax_tile(float s[BN / 8][4], float m[2], float l[2], float o[HS / 8][4], int k0, int wq0,
                                                 const int rows[2], float scale_log2, float p, uint32_t keep_min,
                                                 uint64_t seed, int bh, int T) {
    int q4 = threadIdx.x % 4;
    if (k0 + BN - 1 > wq0) {  // some key of the tile lies past some row of this warp
#pragma unroll
        for (int n = 0; n < BN / 8; n++)
#pragma unroll
            for (int c = 0; c < 4; c++)
                if (k0 + n * 8 + 2 * q4 + (c & 1) > rows[c >> 1]) s[n][c] = -INFINITY;
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < BN / 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) mx[c >> 1] = fmaxf(mx[c >> 1], s[n][c]);
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {  // key 0 is in every row's first tile, so m is finite from then on
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
        float m_new = fmaxf(m[r], mx[r] * scale_log2);
        alpha[r] = exp2_approx(m[r] - m_new);
        m[r] = m_new;
        l[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < BN / 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            s[n][c] = exp2_approx(s[n][c] * scale_log2 - m[c >> 1]);
            l[c >> 1] += s[n][c];  // the normaliser counts dropped probabilities too
            if (p > 0) {
                int key = k0 + n * 8 + 2 * q4 + (c & 1);
                if (hash_u32(seed, ((uint64_t)bh * T + rows[c >> 1]) * T + key) < keep_min) s[n][c] = 0;
            }
        }
#pragma unroll
    for (int n = 0; n < HS / 8; n++) {
        o[n][0] *= alpha[0]; o[n][1] *= alpha[0];
        o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
    }
}

// The end of the forward: row sums over the quad, lse of rows < T written, o normalised.
template <int HS>
__device__ __forceinline__ void att_softmax_finish(float o[HS / 8][4], const float m[2], float l[2], const int rows[2], float* lse,
                                                   int first, float p, int bh, int T) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
        inv[r] = 1.0f / ((1.0f - p) * l[r]);
        if (threadIdx.x % 4 == 0 && rows[r] < T) lse[(size_t)bh * (T - first) + rows[r] - first] = (m[r] + log2f(l[r])) * ATT_LN2;
    }
#pragma unroll
    for (int n = 0; n < HS / 8; n++) {
        o[n][0] *= inv[0]; o[n][1] *= inv[0];
        o[n][2] *= inv[1]; o[n][3] *= inv[1];
    }
}

// delta_i = dout_i . out_i for a warp's 16 query rows from wq0 (written to delta, rows < T); di
// gets the thread's two rows. Lanes 2r and 2r+1 each sum half of row r.
template <typename F, int HS>
__device__ __forceinline__ void att_rows_delta(float di[2], float* delta, const F* gg, const F* og, size_t ostride, int wq0, int bh,
                                               int T) {
    int lane = threadIdx.x % 32, gr = lane / 4, t = wq0 + lane / 2;
    float dsum = 0;
    if (t < T) {
        const F* grow = gg + t * ostride + (lane & 1) * (HS / 2);
        const F* orow = og + t * ostride + (lane & 1) * (HS / 2);
#pragma unroll
        for (int c = 0; c < HS / 2; c += 8) {
            int4 gv = *(const int4*)(grow + c), ov = *(const int4*)(orow + c);
            const F* ge = (const F*)&gv;
            const F* oe = (const F*)&ov;
#pragma unroll
            for (int e = 0; e < 8; e++) dsum += to_float(ge[e]) * to_float(oe[e]);
        }
    }
    dsum += __shfl_xor_sync(0xffffffff, dsum, 1);
    if (t < T && (lane & 1) == 0) delta[(size_t)bh * T + t] = dsum;
    di[0] = __shfl_sync(0xffffffff, dsum, 2 * gr);
    di[1] = __shfl_sync(0xffffffff, dsum, 2 * gr + 16);
}

// The dq kernels' tile: s (scores q.k) becomes dS = P (dropout(dp) - delta), dp = dout . v.
template <int BN>
__device__ __forceinline__ void att_dq_tile(float s[BN / 8][4], const float dp[BN / 8][4], int k0, int wq0, const int rows[2],
                                            const float lse2[2], const float di[2], float scale_log2, float p, uint32_t keep_min,
                                            float keep_scale, uint64_t seed, int bh, int T) {
    int q4 = threadIdx.x % 4;
    bool masked = k0 + BN - 1 > wq0;
#pragma unroll
    for (int n = 0; n < BN / 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int r = c >> 1, key = k0 + n * 8 + 2 * q4 + (c & 1);
            float prob = exp2_approx(s[n][c] * scale_log2 - lse2[r]);
            if (masked && key > rows[r]) prob = 0;
            float gv = dp[n][c];
            if (p > 0) gv = hash_u32(seed, ((uint64_t)bh * T + rows[r]) * T + key) >= keep_min ? gv * keep_scale : 0;
            s[n][c] = prob * (gv - di[r]);
        }
}

// The dk/dv kernels' transposed tile (rows keys, columns the queries i0..): s (k.q) becomes the
// dropped probability P M (for dv), dp (v.dout) becomes dS = P (M dp - delta) (for dk).
// lse_s (log2 units) and delta_s hold the tile's queries.
template <int BM>
__device__ __forceinline__ void att_dkdv_tile(float s[BM / 8][4], float dp[BM / 8][4], int i0, int wk0, const int keys[2],
                                              const float* lse_s, const float* delta_s, float scale_log2, float p,
                                              uint32_t keep_min, float keep_scale, uint64_t seed, int bh, int T) {
    int q4 = threadIdx.x % 4;
    bool masked = i0 < wk0 + 15 || i0 + BM > T;
#pragma unroll
    for (int n = 0; n < BM / 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int col = n * 8 + 2 * q4 + (c & 1), query = i0 + col, key = keys[c >> 1];
            float prob = exp2_approx(s[n][c] * scale_log2 - lse_s[col]);
            if (masked && (query < key || query >= T)) prob = 0;
            float mk = 1.0f;
            if (p > 0) mk = hash_u32(seed, ((uint64_t)bh * T + query) * T + key) >= keep_min ? keep_scale : 0.0f;
            s[n][c] = prob * mk;
            dp[n][c] = prob * (dp[n][c] * mk - delta_s[col]);
        }
}

// Forward: a block owns ATT_ROWS query rows of one (b, h), 16 per warp, and walks the key
// tiles up to the diagonal with an online softmax (FlashAttention-2, Dao 2023, alg. 1).
// Query rows [first, T) only; out and lse hold them from index 0 (see attention_forward_cpu).
template <typename F, int HS>
__global__ void __launch_bounds__(ATT_THREADS) attention_forward_kernel(F* out, float* lse, const F* qkv, int first, float p,
                                                                        uint32_t keep_min, uint64_t seed, int B, int T, int NH) {
    constexpr int LD = HS + ATT_PAD, BM = ATT_ROWS, BN = ATT_KTILE;
    extern __shared__ __align__(16) unsigned char att_smem[];
    F* qs = (F*)att_smem;  // [BM][LD]
    F* ks = qs + BM * LD;  // [2][BN][LD], double-buffered
    F* vs = ks + 2 * BN * LD;

    int qt = gridDim.x - 1 - blockIdx.x;  // the longest rows first
    int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4;
    int C = NH * HS;
    size_t tstride = (size_t)B * 3 * C;
    const F* qg = qkv + (size_t)b * 3 * C + h * 3 * HS;
    int q0 = first + qt * BM, wq0 = q0 + warp * 16;
    int rows[2] = {wq0 + gr, wq0 + gr + 8};
    int n_kt = CEIL_DIV(min(T, q0 + BM), BN);
    float scale_log2 = rsqrtf((float)HS) * LOG2E;

    att_load_rows<F, HS, BM>(qs, qg, tstride, q0, T);
    att_load_rows<F, HS, BN>(ks, qg + HS, tstride, 0, T);
    att_load_rows<F, HS, BN>(vs, qg + 2 * HS, tstride, 0, T);
    cp_async_commit();

    float o[HS / 8][4] = {};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};  // running max (log2 units) and this thread's part of the row sum
    for (int kt = 0; kt < n_kt; kt++) {
        int buf = kt & 1, k0 = kt * BN;
        if (kt + 1 < n_kt) {
            att_load_rows<F, HS, BN>(ks + (buf ^ 1) * BN * LD, qg + HS, tstride, k0 + BN, T);
            att_load_rows<F, HS, BN>(vs + (buf ^ 1) * BN * LD, qg + 2 * HS, tstride, k0 + BN, T);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        float s[BN / 8][4] = {};
        att_mma_abt<F, HS, BN / 8>(s, qs + warp * 16 * LD, ks + buf * BN * LD, LD);
        att_softmax_tile<BN, HS>(s, m, l, o, k0, wq0, rows, scale_log2, p, keep_min, seed, bh, T);
        uint32_t pa[BN / 16][4];
        att_c_to_a<F, BN / 16>(pa, s);
        att_mma_ab<F, BN / 16, HS / 8>(o, pa, vs + buf * BN * LD, LD);
        __syncthreads();  // the buffer is refilled next iteration
    }
    att_softmax_finish<HS>(o, m, l, rows, lse, first, p, bh, T);
    att_store_rows<F, HS>(out + (size_t)b * C + h * HS, (size_t)B * C, wq0 - first, T - first, o, qs + warp * 16 * LD);
}

// ---- Hopper (sm_90a): the kernels with wgmma, the warpgroup MMA (a warpgroup of 4 warps
// multiplies a 64-row tile, read from registers or shared memory, by a tile in shared memory,
// asynchronously). Head sizes 64 and 96: a tile keeps its columns in panels wgmma can read, 64
// columns of 128-byte rows with the 128-byte swizzle, and for 96 a last panel of 32 columns,
// 64-byte rows, 64-byte swizzle. Compiled only for sm_90a (GPU_ARCH=sm_90a); the launchers ask
// the GPU whether the loaded binary has them (att_wgmma_usable).
// A warpgroup (128 threads) owns 64 rows (queries or keys). The forward and dq blocks are one
// warpgroup: two or more blocks share an SM, so one block's softmax math runs under another's
// products (measured on an H200 against blocks of two warpgroups in lockstep: forward 0.103 vs
// 0.109 ms, backward 0.342 vs 0.382 at B16 T1024 head size 64; forward 0.321 vs 0.350 at B4 T2048
// head size 96). Three forward (head size 96) and dq blocks per SM, their registers capped at 168,
// beat two uncapped: forward 0.518 vs 0.613 ms at B8 T2048 head size 96, backward 0.329 vs 0.345
// at GPT-2's shape and 1.642 vs 1.673 at the 1.7B one.
#define ATT_WG_THREADS 128
// The dk/dv block: at head size 96 its accumulators take all 255 registers, and two warpgroups
// sharing each query tile beat one that spills (0.898 vs 1.025 ms for the backward).
HD constexpr int att_dkdv_groups(int HS) { return HS > 64 ? 2 : 1; }
HD constexpr bool att_wg_head_size(int HS) { return HS == 64 || HS == 96; }
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ATT_HAVE_WGMMA 1

// Element offset of 16-byte chunk c (columns 8c .. 8c+7) of row r in a tile of R rows and HS
// columns, swizzled as wgmma reads it: chunk c ^ r%8 in a 64-column panel, c ^ (r/2)%4 in the
// 32-column one. Tiles start 1024-byte aligned.
template <int HS, int R>
__device__ __forceinline__ int att_wg_off(int r, int c) {
    int panel = c / 8, cc = c % 8;
    if (panel < HS / 64) return panel * R * 64 + r * 64 + ((cc ^ (r & 7)) << 3);
    return HS / 64 * R * 64 + r * 32 + ((cc ^ (r >> 1 & 3)) << 3);
}

// As att_load_rows, into a swizzled tile of R rows, over the block's THREADS threads.
template <typename F, int HS, int R, int THREADS>
__device__ __forceinline__ void att_wg_load_rows(F* s, const F* g, size_t tstride, int t0, int T) {
    constexpr int CH = HS / 8;  // 16-byte chunks per row
    static_assert(R * CH % THREADS == 0, "tile rows must split evenly over the threads");
#pragma unroll
    for (int k = 0; k < R * CH / THREADS; k++) {
        int idx = threadIdx.x + k * THREADS, r = idx / CH, c = idx % CH;
        bool valid = t0 + r < T;
        cp_async16(s + att_wg_off<HS, R>(r, c), valid ? g + (t0 + r) * tstride + c * 8 : g, valid);
    }
}

// As att_store_rows, staged through the warp's own 16 rows [row0, row0 + 16) of an R-row tile.
template <typename F, int HS, int R>
__device__ __forceinline__ void att_wg_store_rows(F* g, size_t tstride, int t0, int T, const float acc[HS / 8][4], F* tile, int row0) {
    int lane = threadIdx.x % 32, gr = lane / 4, q = lane % 4;
    __syncwarp();
#pragma unroll
    for (int n = 0; n < HS / 8; n++) {
        *(uint32_t*)(tile + att_wg_off<HS, R>(row0 + gr, n) + 2 * q) = att_pack<F>(acc[n][0], acc[n][1]);
        *(uint32_t*)(tile + att_wg_off<HS, R>(row0 + gr + 8, n) + 2 * q) = att_pack<F>(acc[n][2], acc[n][3]);
    }
    __syncwarp();
    for (int idx = lane; idx < 16 * HS / 8; idx += 32) {
        int r = idx / (HS / 8), c = idx % (HS / 8);
        if (t0 + r < T) *(int4*)(g + (t0 + r) * tstride + c * 8) = *(const int4*)(tile + att_wg_off<HS, R>(row0 + r, c));
    }
}

// The shared-memory matrix descriptor of rows [r0, ...) of one panel of an R-row tile: start
// address, leading and stride byte offsets (both the distance between 8-row groups, the one step
// either operand layout takes here), swizzle mode (1: 128 bytes, 2: 64). Adding 2 moves the start
// 32 bytes (16 elements) along a row.
template <int HS, int R>
__device__ __forceinline__ uint64_t att_wg_desc(const void* tile, int panel, int r0) {
    bool wide = panel < HS / 64;
    uint64_t row_bytes = wide ? 128 : 64, group = 8 * row_bytes >> 4;
    uint64_t addr = smem_addr((const char*)tile + panel * R * 128 + r0 * row_bytes);
    return (addr >> 4 & 0x3fff) | group << 16 | group << 32 | (wide ? 1ull : 2ull) << 62;
}
// The first 1024-aligned byte of the dynamic shared memory (the launch adds 1024 bytes of room).
template <typename F>
__device__ __forceinline__ F* att_wg_tiles(unsigned char* smem) { return (F*)(smem + (1024 - smem_addr(smem) % 1024) % 1024); }
// cp.async's writes to shared memory, made visible to wgmma's reads (the async proxy).
__device__ __forceinline__ void att_fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void att_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void att_wgmma_commit_wait() {
    asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// The tensor cores write an accumulator between issue and wait: its reads must come after the wait.
template <int N>
__device__ __forceinline__ void att_wgmma_hold(float (&d)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) asm volatile("" : "+f"(d[n][c])::"memory");
}

// A 64x64 fp32 accumulator d[8][4] as the operands %0..%31 of a wgmma asm statement, and a 64x32 one
// d[4][4] as %0..%15; per warp their layout is the mma.sync C fragments' (att_mma) over 8 (4) column tiles.
#define ATT_WG_ACC16_REGS "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define ATT_WG_ACC_REGS "{" ATT_WG_ACC16_REGS ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define ATT_WG_ACC16(d) \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
    "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
#define ATT_WG_ACC(d) ATT_WG_ACC16(d), ATT_WG_ACC16((d + 4))
// d[64 x 64] (= or +=, accumulate) A[64 x 16] B[64 x 16]^T, both K-major swizzled tiles.
#define ATT_WGMMA_SS(TYPE)                                                                       \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                    \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " ATT_WG_ACC_REGS   \
                 ", %32, %33, p, 1, 1, 0, 0;\n}\n"                                                 \
                 : ATT_WG_ACC(d) : "l"(desc_a), "l"(desc_b), "r"(accumulate))
template <typename F>
__device__ __forceinline__ void att_wgmma_ss(float d[8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    if constexpr (std::is_same<F, __nv_bfloat16>::value) ATT_WGMMA_SS("bf16");
    else ATT_WGMMA_SS("f16");
}
// d[64 x N] += A[64 x 16] B[16 x N], A in registers (mma.sync A fragments per warp), B 16 rows of a
// panel (N-major: transposed as it is read); N = 64 (d[8][4]) or 32 (d[4][4], the narrow panel).
#define ATT_WGMMA_RS(TYPE)                                                                       \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                      \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " ATT_WG_ACC_REGS   \
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                   \
                 : ATT_WG_ACC(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
#define ATT_WGMMA_RS32(TYPE)                                                                     \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                      \
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " {" ATT_WG_ACC16_REGS \
                 "}, {%16, %17, %18, %19}, %20, p, 1, 1, 1;\n}\n"                                  \
                 : ATT_WG_ACC16(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
template <typename F, int N>
__device__ __forceinline__ void att_wgmma_rs(float d[N / 8][4], const uint32_t a[4], uint64_t desc_b) {
    static_assert(N == 64 || N == 32, "wgmma N is 64 or 32 here");
    if constexpr (N == 64 && std::is_same<F, __nv_bfloat16>::value) ATT_WGMMA_RS("bf16");
    else if constexpr (N == 64) ATT_WGMMA_RS("f16");
    else if constexpr (std::is_same<F, __nv_bfloat16>::value) ATT_WGMMA_RS32("bf16");
    else ATT_WGMMA_RS32("f16");
}

// d[64 x 64] (=) rows [a0, a0 + 64) of tile A (RA rows) times rows [b0, b0 + 64) of tile B (RB rows)
// transposed, over the HS columns: one product per 16 columns.
template <typename F, int HS, int RA, int RB>
__device__ __forceinline__ void att_wg_abt(float d[8][4], const F* a, int a0, const F* b, int b0) {
#pragma unroll
    for (int k = 0; k < HS / 16; k++)
        att_wgmma_ss<F>(d, att_wg_desc<HS, RA>(a, k / 4, a0) + 2 * (k % 4), att_wg_desc<HS, RB>(b, k / 4, b0) + 2 * (k % 4), k > 0);
}

// d[64 x HS] += A[64 x K] B[K x HS]: A from registers (K/16 fragments), B rows [b0, b0 + K) of tile b (RB rows).
template <typename F, int HS, int RB, int K>
__device__ __forceinline__ void att_wg_ab(float d[HS / 8][4], const uint32_t a[K / 16][4], const F* b, int b0) {
#pragma unroll
    for (int k = 0; k < K / 16; k++) {
#pragma unroll
        for (int panel = 0; panel < HS / 64; panel++) att_wgmma_rs<F, 64>(d + 8 * panel, a[k], att_wg_desc<HS, RB>(b, panel, b0 + 16 * k));
        if constexpr (HS % 64 != 0) att_wgmma_rs<F, 32>(d + HS / 64 * 8, a[k], att_wg_desc<HS, RB>(b, HS / 64, b0 + 16 * k));
    }
}
#endif

// attention_forward_kernel's algorithm on a warpgroup: the block owns 64 query rows; S = Q K^T and
// O += P V are wgmma products, the online softmax and dropout are the same per accumulator element.
template <typename F, int HS>
__global__ void __launch_bounds__(ATT_WG_THREADS, HS == 64 ? 4 : 3) attention_forward_wgmma_kernel(F* out, float* lse, const F* qkv, int first,
                                                                                                  float p, uint32_t keep_min, uint64_t seed,
                                                                                                  int B, int T, int NH) {
#ifdef ATT_HAVE_WGMMA
    constexpr int BM = 64, BN = 64, THREADS = ATT_WG_THREADS;
    extern __shared__ unsigned char att_wg_smem[];
    F* qs = att_wg_tiles<F>(att_wg_smem);  // [BM][HS]
    F* ks = qs + BM * HS;                  // [2][BN][HS], double-buffered
    F* vs = ks + 2 * BN * HS;

    int qt = gridDim.x - 1 - blockIdx.x;  // the longest rows first
    int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4;
    int C = NH * HS;
    size_t tstride = (size_t)B * 3 * C;
    const F* qg = qkv + (size_t)b * 3 * C + h * 3 * HS;
    int q0 = first + qt * BM, wq0 = q0 + warp * 16;
    int rows[2] = {wq0 + gr, wq0 + gr + 8};
    int n_kt = CEIL_DIV(min(T, q0 + BM), BN);
    float scale_log2 = rsqrtf((float)HS) * LOG2E;

    att_wg_load_rows<F, HS, BM, THREADS>(qs, qg, tstride, q0, T);
    att_wg_load_rows<F, HS, BN, THREADS>(ks, qg + HS, tstride, 0, T);
    att_wg_load_rows<F, HS, BN, THREADS>(vs, qg + 2 * HS, tstride, 0, T);
    cp_async_commit();

    float o[HS / 8][4] = {};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
    for (int kt = 0; kt < n_kt; kt++) {
        int buf = kt & 1, k0 = kt * BN;
        if (kt + 1 < n_kt) {
            att_wg_load_rows<F, HS, BN, THREADS>(ks + (buf ^ 1) * BN * HS, qg + HS, tstride, k0 + BN, T);
            att_wg_load_rows<F, HS, BN, THREADS>(vs + (buf ^ 1) * BN * HS, qg + 2 * HS, tstride, k0 + BN, T);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        att_fence_async_smem();
        __syncthreads();

        float s[BN / 8][4] = {};
        att_wgmma_fence();
        att_wg_abt<F, HS, BM, BN>(s, qs, 0, ks + buf * BN * HS, 0);
        att_wgmma_commit_wait();
        att_wgmma_hold(s);
        att_softmax_tile<BN, HS>(s, m, l, o, k0, wq0, rows, scale_log2, p, keep_min, seed, bh, T);
        uint32_t pa[BN / 16][4];
        att_c_to_a<F, BN / 16>(pa, s);
        // the softmax's rescaling of o done before the fence: sunk past it (next to o's first product,
        // the narrow panel's at head size 96), it would make ptxas add a warpgroup.arrive (C7519)
        att_wgmma_hold(o);
        att_wgmma_fence();
        att_wg_ab<F, HS, BN, BN>(o, pa, vs + buf * BN * HS, 0);
        att_wgmma_commit_wait();
        att_wgmma_hold(o);
        __syncthreads();  // the buffer is refilled next iteration
    }

    att_softmax_finish<HS>(o, m, l, rows, lse, first, p, bh, T);
    att_wg_store_rows<F, HS, BM>(out + (size_t)b * C + h * HS, (size_t)B * C, wq0 - first, T - first, o, qs, warp * 16);
#else
    __trap();  // launched only where att_wgmma_usable said the binary has sm_90a code
#endif
}

// Backward, dq, on a warpgroup (attention_backward_dq_kernel's algorithm): the block owns
// 64 query rows; S = Q K^T and dP = dout V^T are wgmma products of
// shared-memory tiles, dq += dS K takes dS from registers.
template <typename F, int HS>
__global__ void __launch_bounds__(ATT_WG_THREADS, 3) attention_backward_dq_wgmma_kernel(F* dqkv, float* delta, const F* dout,
                                                                                    const F* qkv, const F* out, const float* lse,
                                                                                    float p, uint32_t keep_min, uint64_t seed,
                                                                                    int B, int T, int NH) {
#ifdef ATT_HAVE_WGMMA
    constexpr int BM = 64, BN = 64, THREADS = ATT_WG_THREADS;
    extern __shared__ unsigned char att_wg_smem[];
    F* qs = att_wg_tiles<F>(att_wg_smem);  // [BM][HS]
    F* gs = qs + BM * HS;                  // [BM][HS] dout
    F* ks = gs + BM * HS;                  // [2][BN][HS], double-buffered
    F* vs = ks + 2 * BN * HS;

    int qt = gridDim.x - 1 - blockIdx.x;
    int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int warp = threadIdx.x / 32, gr = threadIdx.x % 32 / 4;
    int C = NH * HS;
    size_t tstride = (size_t)B * 3 * C, ostride = (size_t)B * C;
    const F* qg = qkv + (size_t)b * 3 * C + h * 3 * HS;
    const F* gg = dout + (size_t)b * C + h * HS;
    const F* og = out + (size_t)b * C + h * HS;
    int q0 = qt * BM, wq0 = q0 + warp * 16;
    int rows[2] = {wq0 + gr, wq0 + gr + 8};
    int n_kt = CEIL_DIV(min(T, q0 + BM), BN);
    float scale = rsqrtf((float)HS), scale_log2 = scale * LOG2E, keep_scale = 1.0f / (1.0f - p);

    att_wg_load_rows<F, HS, BM, THREADS>(qs, qg, tstride, q0, T);
    att_wg_load_rows<F, HS, BM, THREADS>(gs, gg, ostride, q0, T);
    att_wg_load_rows<F, HS, BN, THREADS>(ks, qg + HS, tstride, 0, T);
    att_wg_load_rows<F, HS, BN, THREADS>(vs, qg + 2 * HS, tstride, 0, T);
    cp_async_commit();
    float di[2], lse2[2];
    att_rows_delta<F, HS>(di, delta, gg, og, ostride, wq0, bh, T);
#pragma unroll
    for (int r = 0; r < 2; r++) lse2[r] = rows[r] < T ? lse[(size_t)bh * T + rows[r]] * LOG2E : 0;

    float dq[HS / 8][4] = {};
    for (int kt = 0; kt < n_kt; kt++) {
        int buf = kt & 1, k0 = kt * BN;
        if (kt + 1 < n_kt) {
            att_wg_load_rows<F, HS, BN, THREADS>(ks + (buf ^ 1) * BN * HS, qg + HS, tstride, k0 + BN, T);
            att_wg_load_rows<F, HS, BN, THREADS>(vs + (buf ^ 1) * BN * HS, qg + 2 * HS, tstride, k0 + BN, T);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        att_fence_async_smem();
        __syncthreads();

        float s[BN / 8][4] = {}, dp[BN / 8][4] = {};
        att_wgmma_fence();
        att_wg_abt<F, HS, BM, BN>(s, qs, 0, ks + buf * BN * HS, 0);
        att_wg_abt<F, HS, BM, BN>(dp, gs, 0, vs + buf * BN * HS, 0);
        att_wgmma_commit_wait();
        att_wgmma_hold(s);
        att_wgmma_hold(dp);
        att_dq_tile<BN>(s, dp, k0, wq0, rows, lse2, di, scale_log2, p, keep_min, keep_scale, seed, bh, T);
        uint32_t da[BN / 16][4];
        att_c_to_a<F, BN / 16>(da, s);
        att_wgmma_fence();
        att_wg_ab<F, HS, BN, BN>(dq, da, ks + buf * BN * HS, 0);
        att_wgmma_commit_wait();
        att_wgmma_hold(dq);
        __syncthreads();  // the buffer is refilled next iteration
    }
#pragma unroll
    for (int n = 0; n < HS / 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) dq[n][c] *= scale;
    att_wg_store_rows<F, HS, BM>(dqkv + (size_t)b * 3 * C + h * 3 * HS, tstride, wq0, T, dq, qs, warp * 16);
#else
    __trap();  // launched only where att_wgmma_usable said the binary has sm_90a code
#endif
}

// Backward, dk and dv, on att_dkdv_groups(HS) warpgroups (attention_backward_dkdv_kernel's algorithm):
// the block owns 64 keys per warpgroup, and walks 64-query tiles from the diagonal to the end.
// S^T = K Q^T and dP^T = V dout^T from shared memory; dv += (P M) dout and dk += dS^T Q from registers.
template <typename F, int HS>
__global__ void __launch_bounds__(ATT_WG_THREADS * att_dkdv_groups(HS), 3 - att_dkdv_groups(HS)) attention_backward_dkdv_wgmma_kernel(F* dqkv, const float* delta, const F* dout,
                                                                                      const F* qkv, const float* lse, float p,
                                                                                      uint32_t keep_min, uint64_t seed,
                                                                                      int B, int T, int NH) {
#ifdef ATT_HAVE_WGMMA
    constexpr int BN = 64 * att_dkdv_groups(HS), BM = 64, THREADS = ATT_WG_THREADS * att_dkdv_groups(HS);
    extern __shared__ unsigned char att_wg_smem[];
    F* ks = att_wg_tiles<F>(att_wg_smem);       // [BN][HS]
    F* vs = ks + BN * HS;                       // [BN][HS]
    F* qs = vs + BN * HS;                       // [2][BM][HS]
    F* gs = qs + 2 * BM * HS;                   // [2][BM][HS] dout
    float* lse_s = (float*)(gs + 2 * BM * HS);  // [2][BM], in log2 units
    float* delta_s = lse_s + 2 * BM;            // [2][BM]

    int kt = blockIdx.x;  // the longest key columns first
    int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int wg = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, gr = threadIdx.x % 32 / 4;
    int C = NH * HS;
    size_t tstride = (size_t)B * 3 * C, ostride = (size_t)B * C;
    const F* qg = qkv + (size_t)b * 3 * C + h * 3 * HS;
    const F* gg = dout + (size_t)b * C + h * HS;
    int k0 = kt * BN, g0 = k0 + wg * 64, wk0 = g0 + warp * 16;
    int keys[2] = {wk0 + gr, wk0 + gr + 8};
    int qt0 = k0 / BM, n_qt = CEIL_DIV(T, BM);
    float scale = rsqrtf((float)HS), scale_log2 = scale * LOG2E, keep_scale = 1.0f / (1.0f - p);
    auto load_query_tile = [&](int qt, int buf) {
        att_wg_load_rows<F, HS, BM, THREADS>(qs + buf * BM * HS, qg, tstride, qt * BM, T);
        att_wg_load_rows<F, HS, BM, THREADS>(gs + buf * BM * HS, gg, ostride, qt * BM, T);
        cp_async_commit();
        att_load_stats<BM, THREADS>(lse_s + buf * BM, delta_s + buf * BM, lse, delta, bh, qt * BM, T);
    };
    att_wg_load_rows<F, HS, BN, THREADS>(ks, qg + HS, tstride, k0, T);
    att_wg_load_rows<F, HS, BN, THREADS>(vs, qg + 2 * HS, tstride, k0, T);
    load_query_tile(qt0, 0);

    float dk[HS / 8][4] = {}, dv[HS / 8][4] = {};
    for (int qt = qt0; qt < n_qt; qt++) {
        int buf = (qt - qt0) & 1, i0 = qt * BM;
        if (qt + 1 < n_qt) {
            load_query_tile(qt + 1, buf ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        att_fence_async_smem();
        __syncthreads();

        if (i0 + BM > g0) {  // a tile of queries all before this warpgroup's keys is skipped
            const F *qb = qs + buf * BM * HS, *gb = gs + buf * BM * HS;
            float s[BM / 8][4] = {}, dp[BM / 8][4] = {};  // transposed: rows are keys, columns queries
            att_wgmma_fence();
            att_wg_abt<F, HS, BN, BM>(s, ks, wg * 64, qb, 0);
            att_wg_abt<F, HS, BN, BM>(dp, vs, wg * 64, gb, 0);
            att_wgmma_commit_wait();
            att_wgmma_hold(s);
            att_wgmma_hold(dp);
            att_dkdv_tile<BM>(s, dp, i0, wk0, keys, lse_s + buf * BM, delta_s + buf * BM, scale_log2, p, keep_min, keep_scale, seed, bh, T);
            uint32_t pa[BM / 16][4], da[BM / 16][4];
            att_c_to_a<F, BM / 16>(pa, s);
            att_c_to_a<F, BM / 16>(da, dp);
            att_wgmma_fence();
            att_wg_ab<F, HS, BM, BM>(dv, pa, gb, 0);
            att_wg_ab<F, HS, BM, BM>(dk, da, qb, 0);
            att_wgmma_commit_wait();
            att_wgmma_hold(dv);
            att_wgmma_hold(dk);
        }
        __syncthreads();  // the buffers are refilled next iteration
    }
#pragma unroll
    for (int n = 0; n < HS / 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) dk[n][c] *= scale;
    F* dkg = dqkv + (size_t)b * 3 * C + h * 3 * HS + HS;
    att_wg_store_rows<F, HS, BN>(dkg, tstride, wk0, T, dk, ks, wg * 64 + warp * 16);
    att_wg_store_rows<F, HS, BN>(dkg + HS, tstride, wk0, T, dv, vs, wg * 64 + warp * 16);
#else
    __trap();  // launched only where att_wgmma_usable said the binary has sm_90a code
#endif
}

// Backward, dq: a block owns ATT_ROWS query rows, walks the key tiles up to the diagonal and
// accumulates dq in registers. It also computes delta (needed by the dk/dv kernel).
template <typename F, int HS>
__global__ void __launch_bounds__(ATT_THREADS) attention_backward_dq_kernel(F* dqkv, float* delta, const F* dout,
                                                                            const F* qkv, const F* out, const float* lse,
                                                                            float p, uint32_t keep_min, uint64_t seed,
                                                                            int B, int T, int NH) {
    constexpr int LD = HS + ATT_PAD, BM = ATT_ROWS, BN = ATT_KTILE;
    extern __shared__ __align__(16) unsigned char att_smem[];
    F* qs = (F*)att_smem;    // [BM][LD]
    F* gs = qs + BM * LD;    // [BM][LD] dout
    F* ks = gs + BM * LD;    // [2][BN][LD]
    F* vs = ks + 2 * BN * LD;  // [2][BN][LD]

    int qt = gridDim.x - 1 - blockIdx.x;
    int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4;
    int C = NH * HS;
    size_t tstride = (size_t)B * 3 * C, ostride = (size_t)B * C;
    const F* qg = qkv + (size_t)b * 3 * C + h * 3 * HS;
    const F* gg = dout + (size_t)b * C + h * HS;
    const F* og = out + (size_t)b * C + h * HS;
    int q0 = qt * BM, wq0 = q0 + warp * 16;
    int rows[2] = {wq0 + gr, wq0 + gr + 8};
    int n_kt = CEIL_DIV(min(T, q0 + BM), BN);
    float scale = rsqrtf((float)HS), scale_log2 = scale * LOG2E, keep_scale = 1.0f / (1.0f - p);

    att_load_rows<F, HS, BM>(qs, qg, tstride, q0, T);
    att_load_rows<F, HS, BM>(gs, gg, ostride, q0, T);
    att_load_rows<F, HS, BN>(ks, qg + HS, tstride, 0, T);
    att_load_rows<F, HS, BN>(vs, qg + 2 * HS, tstride, 0, T);
    cp_async_commit();

    float di[2];
    att_rows_delta<F, HS>(di, delta, gg, og, ostride, wq0, bh, T);
    float lse2[2];
#pragma unroll
    for (int r = 0; r < 2; r++) lse2[r] = rows[r] < T ? lse[(size_t)bh * T + rows[r]] * LOG2E : 0;

    float dq[HS / 8][4] = {};
    for (int kt = 0; kt < n_kt; kt++) {
        int buf = kt & 1, k0 = kt * BN;
        if (kt + 1 < n_kt) {
            att_load_rows<F, HS, BN>(ks + (buf ^ 1) * BN * LD, qg + HS, tstride, k0 + BN, T);
            att_load_rows<F, HS, BN>(vs + (buf ^ 1) * BN * LD, qg + 2 * HS, tstride, k0 + BN, T);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        float s[BN / 8][4] = {}, dp[BN / 8][4] = {};
        att_mma_abt<F, HS, BN / 8>(s, qs + warp * 16 * LD, ks + buf * BN * LD, LD);
        att_mma_abt<F, HS, BN / 8>(dp, gs + warp * 16 * LD, vs + buf * BN * LD, LD);
        att_dq_tile<BN>(s, dp, k0, wq0, rows, lse2, di, scale_log2, p, keep_min, keep_scale, seed, bh, T);
        uint32_t da[BN / 16][4];
        att_c_to_a<F, BN / 16>(da, s);
        att_mma_ab<F, BN / 16, HS / 8>(dq, da, ks + buf * BN * LD, LD);
        __syncthreads();
    }
#pragma unroll
    for (int n = 0; n < HS / 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) dq[n][c] *= scale;
    att_store_rows<F, HS>(dqkv + (size_t)b * 3 * C + h * 3 * HS, tstride, wq0, T, dq, qs + warp * 16 * LD);
}

// Backward, dk and dv: a block owns ATT_ROWS keys, 16 per warp, and walks the query tiles from
// the diagonal to the end, accumulating dk and dv in registers (no atomics anywhere).
// It works on transposed tiles, S^T = K Q^T, so each warp's rows are its own keys.
template <typename F, int HS>
__global__ void __launch_bounds__(ATT_THREADS, att_dkdv_min_blocks(HS))
attention_backward_dkdv_kernel(F* dqkv, const float* delta, const F* dout, const F* qkv, const float* lse, float p,
                               uint32_t keep_min, uint64_t seed, int B, int T, int NH) {
    constexpr int LD = HS + ATT_PAD, BM = att_qtile(HS), BN = ATT_ROWS;
    extern __shared__ __align__(16) unsigned char att_smem[];
    F* ks = (F*)att_smem;      // [BN][LD]
    F* vs = ks + BN * LD;      // [BN][LD]
    F* qs = vs + BN * LD;      // [2][BM][LD]
    F* gs = qs + 2 * BM * LD;  // [2][BM][LD] dout
    float* lse_s = (float*)(gs + 2 * BM * LD);  // [2][BM], in log2 units
    float* delta_s = lse_s + 2 * BM;            // [2][BM]

    int kt = blockIdx.x;  // the longest key columns first
    int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4;
    int C = NH * HS;
    size_t tstride = (size_t)B * 3 * C, ostride = (size_t)B * C;
    const F* qg = qkv + (size_t)b * 3 * C + h * 3 * HS;
    const F* gg = dout + (size_t)b * C + h * HS;
    int k0 = kt * BN, wk0 = k0 + warp * 16;
    int keys[2] = {wk0 + gr, wk0 + gr + 8};
    int qt0 = k0 / BM, n_qt = CEIL_DIV(T, BM);
    float scale = rsqrtf((float)HS), scale_log2 = scale * LOG2E, keep_scale = 1.0f / (1.0f - p);

    // per query tile: q and dout rows (async) and their lse and delta (plain loads)
    auto load_query_tile = [&](int qt, int buf) {
        att_load_rows<F, HS, BM>(qs + buf * BM * LD, qg, tstride, qt * BM, T);
        att_load_rows<F, HS, BM>(gs + buf * BM * LD, gg, ostride, qt * BM, T);
        cp_async_commit();
        att_load_stats<BM, ATT_THREADS>(lse_s + buf * BM, delta_s + buf * BM, lse, delta, bh, qt * BM, T);
    };
    att_load_rows<F, HS, BN>(ks, qg + HS, tstride, k0, T);
    att_load_rows<F, HS, BN>(vs, qg + 2 * HS, tstride, k0, T);
    load_query_tile(qt0, 0);

    float dk[HS / 8][4] = {}, dv[HS / 8][4] = {};
    for (int qt = qt0; qt < n_qt; qt++) {
        int buf = (qt - qt0) & 1, i0 = qt * BM;
        if (qt + 1 < n_qt) {
            load_query_tile(qt + 1, buf ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const F* qb = qs + buf * BM * LD;
        const F* gb = gs + buf * BM * LD;
        float s[BM / 8][4] = {}, dp[BM / 8][4] = {};  // transposed: rows are keys, columns queries
        att_mma_abt<F, HS, BM / 8>(s, ks + warp * 16 * LD, qb, LD);
        att_mma_abt<F, HS, BM / 8>(dp, vs + warp * 16 * LD, gb, LD);
        att_dkdv_tile<BM>(s, dp, i0, wk0, keys, lse_s + buf * BM, delta_s + buf * BM, scale_log2, p, keep_min, keep_scale, seed, bh, T);
        uint32_t a[BM / 16][4];
        att_c_to_a<F, BM / 16>(a, s);
        att_mma_ab<F, BM / 16, HS / 8>(dv, a, gb, LD);
        att_c_to_a<F, BM / 16>(a, dp);
        att_mma_ab<F, BM / 16, HS / 8>(dk, a, qb, LD);
        __syncthreads();
    }
#pragma unroll
    for (int n = 0; n < HS / 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) dk[n][c] *= scale;
    F* dkg = dqkv + (size_t)b * 3 * C + h * 3 * HS + HS;
    att_store_rows<F, HS>(dkg, tstride, wk0, T, dk, ks + warp * 16 * LD);
    att_store_rows<F, HS>(dkg + HS, tstride, wk0, T, dv, vs + warp * 16 * LD);
}

// fp32 storage: one warp per query (or key) row, lane owning dimensions lane + 32k,
// plain fp32 arithmetic in the same order of operations as the CPU reference.

#define ATT_F32_WARPS 8

template <int HS>
__global__ void attention_forward_f32_kernel(float* out, float* lse, const float* qkv, int first, float p, uint64_t seed,
                                             int B, int T, int NH) {
    int row = blockIdx.x * ATT_F32_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32, rows = T - first;
    if (row >= B * NH * rows) return;
    int bh = row / rows, i = first + row % rows, b = bh / NH, h = bh % NH, C = NH * HS;
    size_t tstride = (size_t)B * 3 * C;
    const float* head = qkv + (size_t)b * 3 * C + h * 3 * HS;
    float scale = 1.0f / sqrtf((float)HS), q[HS / 32], o[HS / 32] = {};
    for (int k = 0; k < HS / 32; k++) q[k] = head[i * tstride + lane + 32 * k];
    float m = -INFINITY, l = 0;
    uint64_t drop_row = ((uint64_t)bh * T + i) * T;
    for (int j = 0; j <= i; j++) {
        const float* kj = head + j * tstride + HS;
        float s = 0;
        for (int k = 0; k < HS / 32; k++) s += q[k] * kj[lane + 32 * k];
        s = warp_sum(s) * scale;
        float m_new = fmaxf(m, s), alpha = expf(m - m_new), e = expf(s - m_new);
        l = l * alpha + e;
        float w = p > 0 && !dropout_keep(seed, drop_row + j, p) ? 0.0f : e;
        for (int k = 0; k < HS / 32; k++) o[k] = o[k] * alpha + w * kj[HS + lane + 32 * k];
        m = m_new;
    }
    float* orow = out + ATT_ROW(i - first, b, B) * C + h * HS;
    for (int k = 0; k < HS / 32; k++) orow[lane + 32 * k] = o[k] / ((1.0f - p) * l);
    if (lane == 0) lse[row] = m + logf(l);
}

// dq of one query row, and its delta.
template <int HS>
__global__ void attention_backward_dq_f32_kernel(float* dqkv, float* delta, const float* dout, const float* qkv,
                                                 const float* out, const float* lse, float p, uint64_t seed,
                                                 int B, int T, int NH) {
    int row = blockIdx.x * ATT_F32_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= B * NH * T) return;
    int bh = row / T, i = row % T, b = bh / NH, h = bh % NH, C = NH * HS;
    size_t tstride = (size_t)B * 3 * C;
    const float* head = qkv + (size_t)b * 3 * C + h * 3 * HS;
    const float* g = dout + ATT_ROW(i, b, B) * C + h * HS;
    const float* orow = out + ATT_ROW(i, b, B) * C + h * HS;
    float scale = 1.0f / sqrtf((float)HS), keep_scale = 1.0f / (1.0f - p);
    float q[HS / 32], gq[HS / 32], dq[HS / 32] = {}, di = 0;
    for (int k = 0; k < HS / 32; k++) {
        q[k] = head[i * tstride + lane + 32 * k];
        gq[k] = g[lane + 32 * k];
        di += gq[k] * orow[lane + 32 * k];
    }
    di = warp_sum(di);
    if (lane == 0) delta[row] = di;
    float lse_i = lse[row];
    uint64_t drop_row = (uint64_t)row * T;
    for (int j = 0; j <= i; j++) {
        const float* kj = head + j * tstride + HS;
        float s = 0, gv = 0;
        for (int k = 0; k < HS / 32; k++) {
            s += q[k] * kj[lane + 32 * k];
            gv += gq[k] * kj[HS + lane + 32 * k];
        }
        s = warp_sum(s);
        gv = warp_sum(gv);
        float prob = expf(s * scale - lse_i);
        float mk = p > 0 ? (dropout_keep(seed, drop_row + j, p) ? keep_scale : 0.0f) : 1.0f;
        float ds = prob * (mk * gv - di) * scale;
        for (int k = 0; k < HS / 32; k++) dq[k] += ds * kj[lane + 32 * k];
    }
    float* dqrow = dqkv + ATT_ROW(i, b, B) * 3 * C + h * 3 * HS;
    for (int k = 0; k < HS / 32; k++) dqrow[lane + 32 * k] = dq[k];
}

// dk and dv of one key row (after the dq kernel wrote delta).
template <int HS>
__global__ void attention_backward_dkdv_f32_kernel(float* dqkv, const float* delta, const float* dout, const float* qkv,
                                                   const float* lse, float p, uint64_t seed, int B, int T, int NH) {
    int row = blockIdx.x * ATT_F32_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= B * NH * T) return;
    int bh = row / T, j = row % T, b = bh / NH, h = bh % NH, C = NH * HS;
    size_t tstride = (size_t)B * 3 * C;
    const float* head = qkv + (size_t)b * 3 * C + h * 3 * HS;
    float scale = 1.0f / sqrtf((float)HS), keep_scale = 1.0f / (1.0f - p);
    float kj[HS / 32], vj[HS / 32], dk[HS / 32] = {}, dv[HS / 32] = {};
    for (int k = 0; k < HS / 32; k++) {
        kj[k] = head[j * tstride + HS + lane + 32 * k];
        vj[k] = head[j * tstride + 2 * HS + lane + 32 * k];
    }
    for (int i = j; i < T; i++) {
        const float* qi = head + i * tstride;
        const float* g = dout + ATT_ROW(i, b, B) * C + h * HS;
        float s = 0, gv = 0;
        for (int k = 0; k < HS / 32; k++) {
            s += qi[lane + 32 * k] * kj[k];
            gv += g[lane + 32 * k] * vj[k];
        }
        s = warp_sum(s);
        gv = warp_sum(gv);
        size_t bhi = (size_t)bh * T + i;
        float prob = expf(s * scale - lse[bhi]);
        float mk = p > 0 ? (dropout_keep(seed, (uint64_t)bhi * T + j, p) ? keep_scale : 0.0f) : 1.0f;
        float ds = prob * (mk * gv - delta[bhi]) * scale;
        for (int k = 0; k < HS / 32; k++) {
            dv[k] += prob * mk * g[lane + 32 * k];
            dk[k] += ds * qi[lane + 32 * k];
        }
    }
    float* dkrow = dqkv + ATT_ROW(j, b, B) * 3 * C + h * 3 * HS + HS;
    for (int k = 0; k < HS / 32; k++) {
        dkrow[lane + 32 * k] = dk[k];
        dkrow[HS + lane + 32 * k] = dv[k];
    }
}

// dropout_keep(seed, i, p) tests (float)hash_u32(seed, i) * 2^-32 >= p. The conversion
// to float is monotonic, so this is hash_u32(seed, i) >= the smallest hash that passes:
// the same mask without a conversion per probability.
static uint32_t att_keep_threshold(float p) {
    uint64_t lo = 0, hi = 0xffffffffull;  // 2^32-1 rounds to 2^32, which passes any p < 1
    while (lo < hi) {
        uint64_t mid = (lo + hi) / 2;
        if ((float)(uint32_t)mid * 2.3283064365386963e-10f >= p) hi = mid;
        else lo = mid + 1;
    }
    return (uint32_t)lo;
}

// Run a statement with the compile-time head size HSC bound to HS.
#define ATT_HS_SWITCH(HS, HSC, ...)                                    \
    switch (HS) {                                                     \
        case 32: { constexpr int HSC = 32; __VA_ARGS__; } break;       \
        case 64: { constexpr int HSC = 64; __VA_ARGS__; } break;       \
        case 96: { constexpr int HSC = 96; __VA_ARGS__; } break;       \
        case 128: { constexpr int HSC = 128; __VA_ARGS__; } break;     \
        default: die("attention: head size %d is not supported on the GPU (32, 64, 96 or 128)", HS); \
    }

__global__ void att_wgmma_probe_kernel(int* has) {
#ifdef ATT_HAVE_WGMMA
    *has = 1;
#else
    *has = 0;
#endif
}

// 0 makes the half-precision kernels mma.sync ones everywhere (tests and dev/cuda compare the two).
static int att_wgmma_enabled = 1;

// Whether the wgmma kernels can run for head size HS: the binary loaded on this GPU was
// compiled for sm_90a (asked once per device), and att_wgmma_enabled.
static bool att_wgmma_usable(const Device* d, int HS) {
    static signed char has[64] = {0};  // 0 unknown, 1 yes, -1 no
    if (!att_wgmma_enabled || !att_wg_head_size(HS) || d->device_id >= 64) return false;
    if (!has[d->device_id]) {
        int* flag;
        int host = 0;
        cudaCheck(cudaMalloc(&flag, sizeof(int)));
        att_wgmma_probe_kernel<<<1, 1, 0, d->stream>>>(flag);
        cudaCheck(cudaMemcpyAsync(&host, flag, sizeof(int), cudaMemcpyDeviceToHost, d->stream));
        cudaCheck(cudaStreamSynchronize(d->stream));
        cudaCheck(cudaFree(flag));
        has[d->device_id] = host ? 1 : -1;
    }
    return has[d->device_id] > 0;
}

template <typename F, int HS>
static void attention_forward_launch(const Device* d, F* out, float* lse, const F* qkv, int first, float p, uint64_t seed,
                                     int B, int T, int NH) {
    int rows = T - first;
    if constexpr (std::is_same<F, float>::value) {
        attention_forward_f32_kernel<HS><<<CEIL_DIV(B * NH * rows, ATT_F32_WARPS), ATT_F32_WARPS * 32, 0, d->stream>>>(
            out, lse, qkv, first, p, seed, B, T, NH);
    } else if (att_wgmma_usable(d, HS)) {
        if constexpr (att_wg_head_size(HS)) {  // (att_wgmma_usable is false for the others)
            size_t smem = (size_t)5 * 64 * HS * sizeof(F) + 1024;  // Q, K and V twice; + room to align the tiles
            set_dynamic_smem(attention_forward_wgmma_kernel<F, HS>, smem);
            dim3 grid(CEIL_DIV(rows, 64), B * NH);
            attention_forward_wgmma_kernel<F, HS><<<grid, ATT_WG_THREADS, smem, d->stream>>>(out, lse, qkv, first, p, att_keep_threshold(p),
                                                                                         seed, B, T, NH);
        }
    } else {
        size_t smem = (size_t)(ATT_ROWS + 4 * ATT_KTILE) * (HS + ATT_PAD) * sizeof(F);
        set_dynamic_smem(attention_forward_kernel<F, HS>, smem);
        dim3 grid(CEIL_DIV(rows, ATT_ROWS), B * NH);
        attention_forward_kernel<F, HS><<<grid, ATT_THREADS, smem, d->stream>>>(out, lse, qkv, first, p, att_keep_threshold(p),
                                                                                 seed, B, T, NH);
    }
    cudaCheck(cudaGetLastError());
}

template <typename F, int HS>
static void attention_backward_launch(const Device* d, F* dqkv, float* delta, const F* dout, const F* qkv, const F* out,
                                      const float* lse, float p, uint64_t seed, int B, int T, int NH) {
    if constexpr (std::is_same<F, float>::value) {
        int blocks = CEIL_DIV(B * NH * T, ATT_F32_WARPS);
        attention_backward_dq_f32_kernel<HS><<<blocks, ATT_F32_WARPS * 32, 0, d->stream>>>(
            dqkv, delta, dout, qkv, out, lse, p, seed, B, T, NH);
        cudaCheck(cudaGetLastError());
        attention_backward_dkdv_f32_kernel<HS><<<blocks, ATT_F32_WARPS * 32, 0, d->stream>>>(
            dqkv, delta, dout, qkv, lse, p, seed, B, T, NH);
    } else if (att_wgmma_usable(d, HS)) {
        if constexpr (att_wg_head_size(HS)) {  // (att_wgmma_usable is false for the others)
            size_t smem_dq = (size_t)6 * 64 * HS * sizeof(F) + 1024;  // Q, dout, K and V twice
            set_dynamic_smem(attention_backward_dq_wgmma_kernel<F, HS>, smem_dq);
            attention_backward_dq_wgmma_kernel<F, HS><<<dim3(CEIL_DIV(T, 64), B * NH), ATT_WG_THREADS, smem_dq, d->stream>>>(
                dqkv, delta, dout, qkv, out, lse, p, att_keep_threshold(p), seed, B, T, NH);
            cudaCheck(cudaGetLastError());
            constexpr int KEYS = 64 * att_dkdv_groups(HS);  // K, V; Q, dout twice; lse, delta twice
            size_t smem_kv = (size_t)(2 * KEYS + 4 * 64) * HS * sizeof(F) + 1024 + 4 * 64 * sizeof(float);
            set_dynamic_smem(attention_backward_dkdv_wgmma_kernel<F, HS>, smem_kv);
            attention_backward_dkdv_wgmma_kernel<F, HS><<<dim3(CEIL_DIV(T, KEYS), B * NH), ATT_WG_THREADS * att_dkdv_groups(HS), smem_kv, d->stream>>>(
                dqkv, delta, dout, qkv, lse, p, att_keep_threshold(p), seed, B, T, NH);
        }
    } else {
        constexpr int LD = HS + ATT_PAD, QT = att_qtile(HS);
        size_t smem_dq = (size_t)(2 * ATT_ROWS + 4 * ATT_KTILE) * LD * sizeof(F);
        set_dynamic_smem(attention_backward_dq_kernel<F, HS>, smem_dq);
        dim3 grid_dq(CEIL_DIV(T, ATT_ROWS), B * NH);
        attention_backward_dq_kernel<F, HS><<<grid_dq, ATT_THREADS, smem_dq, d->stream>>>(
            dqkv, delta, dout, qkv, out, lse, p, att_keep_threshold(p), seed, B, T, NH);
        cudaCheck(cudaGetLastError());
        size_t smem_kv = (size_t)(2 * ATT_ROWS + 4 * QT) * LD * sizeof(F) + 4 * QT * sizeof(float);
        set_dynamic_smem(attention_backward_dkdv_kernel<F, HS>, smem_kv);
        dim3 grid_kv(CEIL_DIV(T, ATT_ROWS), B * NH);
        attention_backward_dkdv_kernel<F, HS><<<grid_kv, ATT_THREADS, smem_kv, d->stream>>>(
            dqkv, delta, dout, qkv, lse, p, att_keep_threshold(p), seed, B, T, NH);
    }
    cudaCheck(cudaGetLastError());
}

static void att_check_aligned(const void* ptr, const char* name) {
    if ((uintptr_t)ptr % 16) die("attention: %s is not 16-byte aligned", name);
}

static void attention_forward_cuda(const Device* d, void* out, float* lse, const void* qkv, int first, float p, uint64_t seed,
                                   int B, int T, int NH, int HS) {
    att_check_aligned(out, "out");
    att_check_aligned(qkv, "qkv");
    ATT_HS_SWITCH(HS, HSC, DTYPE_SWITCH(d->dtype, F,
        attention_forward_launch<F, HSC>(d, (F*)out, lse, (const F*)qkv, first, p, seed, B, T, NH)));
}

static void attention_backward_cuda(const Device* d, void* dqkv, float* delta, const void* dout, const void* qkv,
                                    const void* out, const float* lse, float p, uint64_t seed,
                                    int B, int T, int NH, int HS) {
    att_check_aligned(dqkv, "dqkv");
    att_check_aligned(dout, "dout");
    att_check_aligned(qkv, "qkv");
    att_check_aligned(out, "out");
    ATT_HS_SWITCH(HS, HSC, DTYPE_SWITCH(d->dtype, F,
        attention_backward_launch<F, HSC>(d, (F*)dqkv, delta, (const F*)dout, (const F*)qkv, (const F*)out, lse,
                                         p, seed, B, T, NH)));
}
#endif

#if defined(__CUDACC__) && defined(USE_CUDNN)
#include <cudnn.h>

// The same attention through cuDNN's fused flash-attention kernels (--attention-backend fused,
// as Megatron-LM's TransformerEngine "fused" backend; built where cudnn.h is found). cuDNN's
// graph API recognises an operation graph and runs it as one kernel: we describe, over the
// qkv/out layout above by strides, Q K^T, the scale, the causal mask, the softmax with its
// log-sum-exp saved (our lse exactly), and P V; the backward graph recomputes P from lse as
// ours does. bf16/fp16 without attention dropout (cuDNN's dropout mask is not ours).
// Tensor ids of the graphs' inputs and outputs; the virtual (in-kernel) ones count from 100.
enum { CDN_Q = 1, CDN_KT, CDN_VT, CDN_OUT, CDN_LSE, CDN_SCALE, CDN_NEG_INF, CDN_ONE, CDN_DOUT, CDN_DQ, CDN_DK, CDN_DV,
       CDN_DQ_ACCUM, CDN_DELTA, CDN_FIRST_VIRTUAL = 100 };

static void cudnn_check(cudnnStatus_t status, const char* file, int line) {
    if (status == CUDNN_STATUS_SUCCESS) return;
    char detail[1024] = "";
    cudnnGetLastErrorString(detail, sizeof(detail));
    die("cuDNN error at %s:%d: %s%s%s", file, line, cudnnGetErrorString(status), *detail ? ": " : "", detail);
}
#define cudnnCheck(status) cudnn_check((status), __FILE__, __LINE__)

#define CDN_MAX_DESCRIPTORS 128
// A graph being described, then its execution plan: every descriptor made for it (the plan
// may refer to them, so they live as long as it does).
typedef struct {
    int backward, B, T, NH, HS;
    DType dtype;
    cudnnBackendDescriptor_t descriptors[CDN_MAX_DESCRIPTORS];
    int n_descriptors;
    int64_t next_virtual;
    cudnnBackendDescriptor_t plan;
    int64_t workspace;  // bytes the plan needs
} CdnGraph;

typedef struct { int64_t dim[4], stride[4]; } CdnShape;

static cudnnBackendDescriptor_t cdn_new(CdnGraph* g, cudnnBackendDescriptorType_t type) {
    if (g->n_descriptors == CDN_MAX_DESCRIPTORS) die("cuDNN attention: more than %d descriptors in a graph", CDN_MAX_DESCRIPTORS);
    cudnnBackendDescriptor_t desc;
    cudnnCheck(cudnnBackendCreateDescriptor(type, &desc));
    return g->descriptors[g->n_descriptors++] = desc;
}

static void cdn_set(cudnnBackendDescriptor_t desc, cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type,
                    int64_t count, const void* value) {
    cudnnCheck(cudnnBackendSetAttribute(desc, name, type, count, value));
}

static void cdn_set_desc(cudnnBackendDescriptor_t desc, cudnnBackendAttributeName_t name, cudnnBackendDescriptor_t value) {
    cdn_set(desc, name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &value);
}

enum { CDN_IO, CDN_VIRTUAL, CDN_BY_VALUE };  // a tensor in memory, one only inside the kernel, a host scalar

// uid is ignored for CDN_VIRTUAL tensors, which are numbered from CDN_FIRST_VIRTUAL.
static cudnnBackendDescriptor_t cdn_tensor(CdnGraph* g, int64_t uid, cudnnDataType_t type, CdnShape s, int kind) {
    cudnnBackendDescriptor_t t = cdn_new(g, CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    int64_t alignment = 16;
    bool is_virtual = kind == CDN_VIRTUAL, by_value = kind == CDN_BY_VALUE;
    if (is_virtual) uid = g->next_virtual++;
    cdn_set(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type);
    cdn_set(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, s.dim);
    cdn_set(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, s.stride);
    cdn_set(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
    cdn_set(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &alignment);
    if (is_virtual) cdn_set(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
    if (by_value) cdn_set(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
    cudnnCheck(cudnnBackendFinalize(t));
    return t;
}

// y = mode(x[, b][, t]); axis: the dimension CUDNN_POINTWISE_GEN_INDEX numbers.
static cudnnBackendDescriptor_t cdn_pointwise(CdnGraph* g, cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x,
                                              cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t t,
                                              cudnnBackendDescriptor_t y, int64_t axis) {
    cudnnBackendDescriptor_t pw = cdn_new(g, CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    cudnnDataType_t precision = mode == CUDNN_POINTWISE_CMP_GE ? CUDNN_DATA_BOOLEAN : CUDNN_DATA_FLOAT;
    cdn_set(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    cdn_set(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &precision);
    if (mode == CUDNN_POINTWISE_GEN_INDEX) cdn_set(pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis);
    cudnnCheck(cudnnBackendFinalize(pw));
    cudnnBackendDescriptor_t op = cdn_new(g, CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    cdn_set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw);
    cdn_set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b) cdn_set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b);
    if (t) cdn_set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t);
    cdn_set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
    cudnnCheck(cudnnBackendFinalize(op));
    return op;
}

// y = x reduced over the dimensions where y has size 1.
static cudnnBackendDescriptor_t cdn_reduction(CdnGraph* g, cudnnReduceTensorOp_t reduce, cudnnBackendDescriptor_t x,
                                              cudnnBackendDescriptor_t y) {
    cudnnBackendDescriptor_t r = cdn_new(g, CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    cudnnDataType_t precision = CUDNN_DATA_FLOAT;
    bool deterministic = false;
    cdn_set(r, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &reduce);
    cdn_set(r, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &precision);
    cdn_set(r, CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC, CUDNN_TYPE_BOOLEAN, 1, &deterministic);
    cudnnCheck(cudnnBackendFinalize(r));
    cudnnBackendDescriptor_t op = cdn_new(g, CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    cdn_set_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, r);
    cdn_set_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x);
    cdn_set_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y);
    cudnnCheck(cudnnBackendFinalize(op));
    return op;
}

// c = a b over the last two dimensions, fp32 accumulation.
static cudnnBackendDescriptor_t cdn_matmul(CdnGraph* g, cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b,
                                           cudnnBackendDescriptor_t c) {
    cudnnBackendDescriptor_t mm = cdn_new(g, CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    cudnnDataType_t precision = CUDNN_DATA_FLOAT;
    cdn_set(mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &precision);
    cudnnCheck(cudnnBackendFinalize(mm));
    cudnnBackendDescriptor_t op = cdn_new(g, CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    cdn_set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, mm);
    cdn_set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a);
    cdn_set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b);
    cdn_set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c);
    cudnnCheck(cudnnBackendFinalize(op));
    return op;
}

// y: x seen with y's dimensions and strides (here: a transpose).
static cudnnBackendDescriptor_t cdn_reshape(CdnGraph* g, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    cudnnBackendDescriptor_t op = cdn_new(g, CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    cdn_set_desc(op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x);
    cdn_set_desc(op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y);
    cudnnCheck(cudnnBackendFinalize(op));
    return op;
}

// The operation graph of ops, and the first engine cuDNN's heuristics rank for it that builds.
static void cdn_build_plan(CdnGraph* g, cudnnHandle_t handle, cudnnBackendDescriptor_t* ops, int n_ops) {
    cudnnBackendDescriptor_t graph = cdn_new(g, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    cdn_set(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, n_ops, ops);
    cdn_set(graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
    cudnnCheck(cudnnBackendFinalize(graph));
    cudnnBackendDescriptor_t heuristics = cdn_new(g, CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    cdn_set_desc(heuristics, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph);
    cdn_set(heuristics, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
    cudnnCheck(cudnnBackendFinalize(heuristics));
    enum { MAX_CONFIGS = 8 };
    cudnnBackendDescriptor_t configs[MAX_CONFIGS];
    for (int i = 0; i < MAX_CONFIGS; i++) configs[i] = cdn_new(g, CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
    int64_t n_configs = 0;
    cudnnCheck(cudnnBackendGetAttribute(heuristics, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, MAX_CONFIGS,
                                        &n_configs, configs));
    for (int64_t i = 0; i < n_configs; i++) {
        cudnnBackendDescriptor_t plan = cdn_new(g, CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
        cdn_set_desc(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, configs[i]);
        if (cudnnBackendFinalize(plan) != CUDNN_STATUS_SUCCESS) continue;  // this engine cannot run it: the next
        cudnnCheck(cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, NULL, &g->workspace));
        g->plan = plan;
        return;
    }
    char detail[1024] = "";
    cudnnGetLastErrorString(detail, sizeof(detail));
    die("cuDNN attention: no engine runs the %s graph for B=%d T=%d heads=%d head size=%d (%lld candidates)%s%s",
        g->backward ? "backward" : "forward", g->B, g->T, g->NH, g->HS, (long long)n_configs, *detail ? ": " : "", detail);
}

// Dimensions [B, NH, rows, cols] with the strides of each tensor the graphs read or write.
static CdnShape cdn_shape(int64_t B, int64_t NH, int64_t rows, int64_t cols, int64_t sb, int64_t sh, int64_t sr, int64_t sc) {
    CdnShape s = {{B, NH, rows, cols}, {sb, sh, sr, sc}};
    return s;
}
static CdnShape cdn_qkv_shape(const CdnGraph* g) {  // q, k or v of qkv [T, B, 3C]: [B, NH, T, HS]
    int64_t C3 = 3 * (int64_t)g->NH * g->HS;
    return cdn_shape(g->B, g->NH, g->T, g->HS, C3, 3 * g->HS, g->B * C3, 1);
}
static CdnShape cdn_qkv_transposed(const CdnGraph* g) {  // k or v as [B, NH, HS, T]
    int64_t C3 = 3 * (int64_t)g->NH * g->HS;
    return cdn_shape(g->B, g->NH, g->HS, g->T, C3, 3 * g->HS, 1, g->B * C3);
}
static CdnShape cdn_out_shape(const CdnGraph* g) {  // out [T, B, C] as [B, NH, T, HS]
    int64_t C = (int64_t)g->NH * g->HS;
    return cdn_shape(g->B, g->NH, g->T, g->HS, C, g->HS, g->B * C, 1);
}
static CdnShape cdn_packed(const CdnGraph* g, int64_t cols) {  // [B, NH, T, cols], contiguous
    return cdn_shape(g->B, g->NH, g->T, cols, g->NH * g->T * cols, g->T * cols, cols, 1);
}
static CdnShape cdn_scores(const CdnGraph* g, int transposed) {  // [B, NH, T, T]
    int64_t T = g->T;
    return cdn_shape(g->B, g->NH, T, T, g->NH * T * T, T * T, transposed ? 1 : T, transposed ? T : 1);
}
static CdnShape cdn_scalar(void) { return cdn_shape(1, 1, 1, 1, 1, 1, 1, 1); }

// The masked, scaled scores of q and kT, causal: entries above the diagonal become -inf.
// lse given (the backward): scores minus lse, whose exp is P.
static cudnnBackendDescriptor_t cdn_masked_scores(CdnGraph* g, cudnnBackendDescriptor_t* ops, int* n, cudnnBackendDescriptor_t q,
                                                  cudnnBackendDescriptor_t kT, cudnnBackendDescriptor_t scale,
                                                  cudnnBackendDescriptor_t lse) {
    CdnShape S = cdn_scores(g, 0);
    cudnnBackendDescriptor_t s = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, S, CDN_VIRTUAL);
    ops[(*n)++] = cdn_matmul(g, q, kT, s);
    cudnnBackendDescriptor_t scaled = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, S, CDN_VIRTUAL);
    ops[(*n)++] = cdn_pointwise(g, CUDNN_POINTWISE_MUL, s, scale, NULL, scaled, 0);
    if (lse) {
        cudnnBackendDescriptor_t shifted = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, S, CDN_VIRTUAL);
        ops[(*n)++] = cdn_pointwise(g, CUDNN_POINTWISE_SUB, scaled, lse, NULL, shifted, 0);
        scaled = shifted;
    }
    cudnnBackendDescriptor_t col = cdn_tensor(g, 0, CUDNN_DATA_INT32, S, CDN_VIRTUAL);
    cudnnBackendDescriptor_t row = cdn_tensor(g, 0, CUDNN_DATA_INT32, S, CDN_VIRTUAL);
    cudnnBackendDescriptor_t keep = cdn_tensor(g, 0, CUDNN_DATA_BOOLEAN, S, CDN_VIRTUAL);
    cudnnBackendDescriptor_t neg_inf = cdn_tensor(g, CDN_NEG_INF, CUDNN_DATA_FLOAT, cdn_scalar(), CDN_BY_VALUE);
    cudnnBackendDescriptor_t masked = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, S, CDN_VIRTUAL);
    ops[(*n)++] = cdn_pointwise(g, CUDNN_POINTWISE_GEN_INDEX, scaled, NULL, NULL, col, 3);
    ops[(*n)++] = cdn_pointwise(g, CUDNN_POINTWISE_GEN_INDEX, scaled, NULL, NULL, row, 2);
    ops[(*n)++] = cdn_pointwise(g, CUDNN_POINTWISE_CMP_GE, row, col, NULL, keep, 0);
    ops[(*n)++] = cdn_pointwise(g, CUDNN_POINTWISE_BINARY_SELECT, scaled, neg_inf, keep, masked, 0);
    return masked;
}

// out = softmax(masked scores) v, lse = max + log(sum of exp(scores - max)).
static void cdn_forward_graph(CdnGraph* g, cudnnHandle_t handle, cudnnDataType_t io) {
    cudnnBackendDescriptor_t ops[32];
    int n = 0;
    CdnShape row_stat = cdn_packed(g, 1), S = cdn_scores(g, 0);
    cudnnBackendDescriptor_t q = cdn_tensor(g, CDN_Q, io, cdn_qkv_shape(g), CDN_IO);
    cudnnBackendDescriptor_t kT = cdn_tensor(g, CDN_KT, io, cdn_qkv_transposed(g), CDN_IO);
    cudnnBackendDescriptor_t v = cdn_tensor(g, CDN_VT, io, cdn_qkv_shape(g), CDN_IO);
    cudnnBackendDescriptor_t out = cdn_tensor(g, CDN_OUT, io, cdn_out_shape(g), CDN_IO);
    cudnnBackendDescriptor_t lse = cdn_tensor(g, CDN_LSE, CUDNN_DATA_FLOAT, row_stat, CDN_IO);
    cudnnBackendDescriptor_t scale = cdn_tensor(g, CDN_SCALE, CUDNN_DATA_FLOAT, cdn_scalar(), CDN_BY_VALUE);
    cudnnBackendDescriptor_t masked = cdn_masked_scores(g, ops, &n, q, kT, scale, NULL);
    cudnnBackendDescriptor_t max = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, row_stat, CDN_VIRTUAL);
    cudnnBackendDescriptor_t shifted = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, S, CDN_VIRTUAL);
    cudnnBackendDescriptor_t e = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, S, CDN_VIRTUAL);
    cudnnBackendDescriptor_t sum = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, row_stat, CDN_VIRTUAL);
    cudnnBackendDescriptor_t log_sum = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, row_stat, CDN_VIRTUAL);
    cudnnBackendDescriptor_t P = cdn_tensor(g, 0, io, S, CDN_VIRTUAL);
    ops[n++] = cdn_reduction(g, CUDNN_REDUCE_TENSOR_MAX, masked, max);
    ops[n++] = cdn_pointwise(g, CUDNN_POINTWISE_SUB, masked, max, NULL, shifted, 0);
    ops[n++] = cdn_pointwise(g, CUDNN_POINTWISE_EXP, shifted, NULL, NULL, e, 0);
    ops[n++] = cdn_reduction(g, CUDNN_REDUCE_TENSOR_ADD, e, sum);
    ops[n++] = cdn_pointwise(g, CUDNN_POINTWISE_LOG, sum, NULL, NULL, log_sum, 0);
    ops[n++] = cdn_pointwise(g, CUDNN_POINTWISE_ADD, max, log_sum, NULL, lse, 0);
    ops[n++] = cdn_pointwise(g, CUDNN_POINTWISE_DIV, e, sum, NULL, P, 0);
    ops[n++] = cdn_matmul(g, P, v, out);
    cdn_build_plan(g, handle, ops, n);
}

// With P rebuilt from lse and delta_i = dout_i . out_i (the FlashAttention-2 backward above):
// dv = P^T dout, dS = P (dout v^T - delta) scale, dq = dS k, dk = dS^T q. dq accumulates in
// fp32 (CDN_DQ_ACCUM) and is then rounded to the io type. From cuDNN 9.6 the kernel that computes
// delta also zeroes that accumulator (cudnn-frontend stopped clearing it there); before, we do.
static void cdn_backward_graph(CdnGraph* g, cudnnHandle_t handle, cudnnDataType_t io) {
    cudnnBackendDescriptor_t ops[32];
    int n = 0;
    CdnShape qkv = cdn_qkv_shape(g), qkvT = cdn_qkv_transposed(g), O = cdn_out_shape(g), row_stat = cdn_packed(g, 1);
    CdnShape S = cdn_scores(g, 0), ST = cdn_scores(g, 1);
    cudnnBackendDescriptor_t q = cdn_tensor(g, CDN_Q, io, qkv, CDN_IO);
    cudnnBackendDescriptor_t kT = cdn_tensor(g, CDN_KT, io, qkvT, CDN_IO);
    cudnnBackendDescriptor_t vT = cdn_tensor(g, CDN_VT, io, qkvT, CDN_IO);
    cudnnBackendDescriptor_t out = cdn_tensor(g, CDN_OUT, io, O, CDN_IO);
    cudnnBackendDescriptor_t dout = cdn_tensor(g, CDN_DOUT, io, O, CDN_IO);
    cudnnBackendDescriptor_t lse = cdn_tensor(g, CDN_LSE, CUDNN_DATA_FLOAT, row_stat, CDN_IO);
    cudnnBackendDescriptor_t delta = cdn_tensor(g, CDN_DELTA, CUDNN_DATA_FLOAT, row_stat, CDN_IO);
    cudnnBackendDescriptor_t dq_accum = cdn_tensor(g, CDN_DQ_ACCUM, CUDNN_DATA_FLOAT, cdn_packed(g, g->HS), CDN_IO);
    cudnnBackendDescriptor_t dq = cdn_tensor(g, CDN_DQ, io, qkv, CDN_IO);
    cudnnBackendDescriptor_t dk = cdn_tensor(g, CDN_DK, io, qkv, CDN_IO);
    cudnnBackendDescriptor_t dv = cdn_tensor(g, CDN_DV, io, qkv, CDN_IO);
    cudnnBackendDescriptor_t scale = cdn_tensor(g, CDN_SCALE, CUDNN_DATA_FLOAT, cdn_scalar(), CDN_BY_VALUE);
    cudnnBackendDescriptor_t one = cdn_tensor(g, CDN_ONE, CUDNN_DATA_FLOAT, cdn_scalar(), CDN_BY_VALUE);

    cudnnBackendDescriptor_t dP = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, S, CDN_VIRTUAL);
    ops[n++] = cdn_matmul(g, dout, vT, dP);
    cudnnBackendDescriptor_t masked = cdn_masked_scores(g, ops, &n, q, kT, scale, lse);
    cudnnBackendDescriptor_t P = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, S, CDN_VIRTUAL);
    cudnnBackendDescriptor_t PT = cdn_tensor(g, 0, io, ST, CDN_VIRTUAL);
    ops[n++] = cdn_pointwise(g, CUDNN_POINTWISE_EXP, masked, NULL, NULL, P, 0);
    ops[n++] = cdn_reshape(g, P, PT);
    ops[n++] = cdn_matmul(g, PT, dout, dv);

    cudnnBackendDescriptor_t dout_out = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, cdn_packed(g, g->HS), CDN_VIRTUAL);
    cudnnBackendDescriptor_t row_sum = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, row_stat, CDN_VIRTUAL);
    ops[n++] = cdn_pointwise(g, CUDNN_POINTWISE_MUL, dout, out, NULL, dout_out, 0);
    ops[n++] = cdn_reduction(g, CUDNN_REDUCE_TENSOR_ADD, dout_out, row_sum);
    ops[n++] = cdn_pointwise(g, CUDNN_POINTWISE_MUL, row_sum, one, NULL, delta, 0);

    cudnnBackendDescriptor_t dP_centred = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, S, CDN_VIRTUAL);
    cudnnBackendDescriptor_t dS_unscaled = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, S, CDN_VIRTUAL);
    cudnnBackendDescriptor_t dS = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, S, CDN_VIRTUAL);
    ops[n++] = cdn_pointwise(g, CUDNN_POINTWISE_SUB, dP, delta, NULL, dP_centred, 0);
    ops[n++] = cdn_pointwise(g, CUDNN_POINTWISE_MUL, dP_centred, P, NULL, dS_unscaled, 0);
    ops[n++] = cdn_pointwise(g, CUDNN_POINTWISE_MUL, dS_unscaled, scale, NULL, dS, 0);

    cudnnBackendDescriptor_t k = cdn_tensor(g, 0, CUDNN_DATA_FLOAT, qkv, CDN_VIRTUAL);
    ops[n++] = cdn_reshape(g, kT, k);
    ops[n++] = cdn_matmul(g, dS, k, dq_accum);
    ops[n++] = cdn_pointwise(g, CUDNN_POINTWISE_IDENTITY, dq_accum, NULL, NULL, dq, 0);
    cudnnBackendDescriptor_t dST = cdn_tensor(g, 0, io, ST, CDN_VIRTUAL);
    ops[n++] = cdn_reshape(g, dS, dST);
    ops[n++] = cdn_matmul(g, dST, q, dk);
    cdn_build_plan(g, handle, ops, n);
}

// Per GPU: the handle, the plans built so far (one per shape and direction), and the scratch
// memory the plans share (the plan's workspace, then the backward's fp32 dq).
#define CDN_MAX_PLANS 16
typedef struct {
    cudnnHandle_t handle;
    CdnGraph* plans[CDN_MAX_PLANS];
    int n_built;
    void* scratch;
    size_t scratch_size;
} CdnState;

static CdnState* cdn_state(const Device* d) {
    static CdnState states[64];
    if (d->device_id >= 64) die("cuDNN attention: device %d beyond the 64 this build tracks", d->device_id);
    CdnState* s = &states[d->device_id];
    if (!s->handle) cudnnCheck(cudnnCreate(&s->handle));
    cudnnCheck(cudnnSetStream(s->handle, d->stream));
    return s;
}

// The plan for this shape and direction, built the first time it is asked for.
static CdnGraph* cdn_plan(const Device* d, CdnState* s, int backward, int B, int T, int NH, int HS) {
    for (int i = 0; i < CDN_MAX_PLANS && s->plans[i]; i++) {
        CdnGraph* g = s->plans[i];
        if (g->backward == backward && g->B == B && g->T == T && g->NH == NH && g->HS == HS && g->dtype == d->dtype) return g;
    }
    int slot = s->n_built++ % CDN_MAX_PLANS;  // past the table's size the oldest plan goes
    if (s->plans[slot]) {
        for (int i = 0; i < s->plans[slot]->n_descriptors; i++) cudnnCheck(cudnnBackendDestroyDescriptor(s->plans[slot]->descriptors[i]));
        free(s->plans[slot]);
    }
    CdnGraph* g = (CdnGraph*)calloc(1, sizeof(CdnGraph));
    if (!g) die("out of host memory");
    g->backward = backward, g->B = B, g->T = T, g->NH = NH, g->HS = HS, g->dtype = d->dtype;
    g->next_virtual = CDN_FIRST_VIRTUAL;
    cudnnDataType_t io = d->dtype == DT_BF16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_HALF;
    if (backward) cdn_backward_graph(g, s->handle, io);
    else cdn_forward_graph(g, s->handle, io);
    return s->plans[slot] = g;
}

static void* cdn_scratch(const Device* d, CdnState* s, size_t bytes) {
    if (bytes > s->scratch_size) {
        if (s->scratch) dev_free(d, s->scratch);  // (synchronises: only while the first plans are built)
        s->scratch = dev_malloc(d, bytes);
        s->scratch_size = bytes;
    }
    return s->scratch;
}

static void cdn_execute(CdnState* s, const CdnGraph* g, const int64_t* uids, void** pointers, int n, void* workspace) {
    cudnnBackendDescriptor_t pack;
    cudnnCheck(cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack));
    cdn_set(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, n, uids);
    cdn_set(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, n, pointers);
    cdn_set(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace);
    cudnnCheck(cudnnBackendFinalize(pack));
    cudnnCheck(cudnnBackendExecute(s->handle, g->plan, pack));
    cudnnCheck(cudnnBackendDestroyDescriptor(pack));
}

static void cdn_check_supported(const Device* d, float p) {
    if (d->dtype == DT_F32) die("--attention-backend fused: cuDNN's fused attention takes bf16 or fp16, not fp32");
    if (p != 0.0f) die("--attention-backend fused: attention dropout %g; cuDNN's path here runs without (--attention-dropout 0)", p);
}

static void attention_forward_cudnn(const Device* d, void* out, float* lse, const void* qkv, float p, int B, int T, int NH, int HS) {
    cdn_check_supported(d, p);
    CdnState* s = cdn_state(d);
    const CdnGraph* g = cdn_plan(d, s, 0, B, T, NH, HS);
    float scale = 1.0f / sqrtf((float)HS), neg_inf = -INFINITY;
    const char* base = (const char*)qkv;
    size_t head = (size_t)HS * dtype_size(d->dtype);
    int64_t uids[] = {CDN_Q, CDN_KT, CDN_VT, CDN_OUT, CDN_LSE, CDN_SCALE, CDN_NEG_INF};
    void* pointers[] = {(void*)base, (void*)(base + head), (void*)(base + 2 * head), out, lse, &scale, &neg_inf};
    cdn_execute(s, g, uids, pointers, 7, cdn_scratch(d, s, g->workspace));
}

static void attention_backward_cudnn(const Device* d, void* dqkv, float* delta, const void* dout, const void* qkv,
                                     const void* out, const float* lse, float p, int B, int T, int NH, int HS) {
    cdn_check_supported(d, p);
    CdnState* s = cdn_state(d);
    const CdnGraph* g = cdn_plan(d, s, 1, B, T, NH, HS);
    size_t workspace = (size_t)(g->workspace + 255) / 256 * 256, dq_bytes = (size_t)B * NH * T * HS * sizeof(float);
    char* scratch = (char*)cdn_scratch(d, s, workspace + dq_bytes);
    if (cudnnGetVersion() < 90600) dev_zero(d, scratch + workspace, dq_bytes);
    float scale = 1.0f / sqrtf((float)HS), neg_inf = -INFINITY, one = 1.0f;
    const char *in = (const char*)qkv, *din = (const char*)dqkv;
    size_t head = (size_t)HS * dtype_size(d->dtype);
    int64_t uids[] = {CDN_Q, CDN_KT, CDN_VT, CDN_OUT, CDN_DOUT, CDN_LSE, CDN_DELTA, CDN_DQ_ACCUM,
                      CDN_DQ, CDN_DK, CDN_DV, CDN_SCALE, CDN_ONE, CDN_NEG_INF};
    void* pointers[] = {(void*)in, (void*)(in + head), (void*)(in + 2 * head), (void*)out, (void*)dout, (void*)lse, delta,
                        scratch + workspace, (void*)din, (void*)(din + head), (void*)(din + 2 * head), &scale, &one, &neg_inf};
    cdn_execute(s, g, uids, pointers, 14, scratch);
}
#endif

// What runs attention on d, for the log: "" (the kernels above) or ", attention through cuDNN
// 9.19.0" (the library loaded).
static const char* attention_backend_note(const Device* d) {
#if defined(__CUDACC__) && defined(USE_CUDNN)
    static char note[64];
    size_t v = cudnnGetVersion();
    snprintf(note, sizeof(note), ", attention through cuDNN %zu.%zu.%zu", v / 10000, v / 100 % 100, v % 100);
    return d->is_gpu && d->attention_fused ? note : "";
#else
    (void)d;
    return "";
#endif
}

// out [N, C] and lse [B, NH, T] from qkv [N, 3C].
static void attention_forward(const Device* d, void* out, float* lse, const void* qkv, float p, uint64_t seed,
                              int B, int T, int NH, int HS) {
    attention_check(p, B, T, NH, HS);
#if defined(__CUDACC__) && defined(USE_CUDNN)
    if (d->is_gpu && d->attention_fused) { attention_forward_cudnn(d, out, lse, qkv, p, B, T, NH, HS); return; }
#endif
#ifdef __CUDACC__
    if (d->is_gpu) { attention_forward_cuda(d, out, lse, qkv, 0, p, seed, B, T, NH, HS); return; }
#endif
    (void)d;
    attention_forward_cpu<float>((float*)out, lse, (const float*)qkv, 0, p, seed, B, T, NH, HS);
}

// A decode step: n new query rows at positions [pos, pos+n) attend to the KV cache's rows
// [0, pos+n). The cache is a qkv tensor of up to maxT positions, [maxT, B, 3C] in the layout
// above (q kept beside k and v, so the training kernels read it unchanged), whose rows
// [pos, pos+n) the caller has just written. out [n, B, C] and lse [B, NH, n] as the forward's
// rows [pos, pos+n); no dropout (inference).
static void attention_decode(const Device* d, void* out, float* lse, const void* cache, int pos, int n,
                             int B, int NH, int HS) {
    if (pos < 0 || n < 1) die("attention_decode: bad rows pos=%d n=%d", pos, n);
    attention_check(0.0f, B, pos + n, NH, HS);
#ifdef __CUDACC__
    if (d->is_gpu) { attention_forward_cuda(d, out, lse, cache, pos, 0.0f, 0, B, pos + n, NH, HS); return; }
#endif
    (void)d;
    attention_forward_cpu<float>((float*)out, lse, (const float*)cache, pos, 0.0f, 0, B, pos + n, NH, HS);
}

// dqkv (=, written fully) from dout and the forward's out and lse; delta is fp32 [B, NH, T]
// scratch (written).
static void attention_backward(const Device* d, void* dqkv, float* delta, const void* dout, const void* qkv,
                               const void* out, const float* lse, float p, uint64_t seed, int B, int T, int NH, int HS) {
    attention_check(p, B, T, NH, HS);
#if defined(__CUDACC__) && defined(USE_CUDNN)
    if (d->is_gpu && d->attention_fused) {
        attention_backward_cudnn(d, dqkv, delta, dout, qkv, out, lse, p, B, T, NH, HS);
        return;
    }
#endif
#ifdef __CUDACC__
    if (d->is_gpu) { attention_backward_cuda(d, dqkv, delta, dout, qkv, out, lse, p, seed, B, T, NH, HS); return; }
#endif
    (void)d;
    attention_backward_cpu<float>((float*)dqkv, delta, (const float*)dout, (const float*)qkv, (const float*)out, lse,
                                  p, seed, B, T, NH, HS);
}
// <<< layers-attention

// >>> layers-residual
// ----------------------------------------------------------------------------
// Bias-dropout-add and dropout (Megatron-1 §2: dropout on each sublayer's output before
// the residual add, and on the embedding output; Megatron's fused bias_dropout_add).
// Element i of a tensor (i = r*C + c) is kept iff dropout_keep(seed, i, p), on CPU and GPU
// alike, and kept values are scaled by 1/(1-p); the backward regenerates the mask from seed.

// The factor element i is multiplied by: 0 or 1/(1-p).
HD static inline float dropout_factor(uint64_t seed, uint64_t i, float p) {
    return p == 0.0f ? 1.0f : dropout_keep(seed, i, p) ? 1.0f / (1.0f - p) : 0.0f;
}

static void check_dropout_p(const char* who, float p) {
    if (!(p >= 0.0f && p < 1.0f)) die("%s: dropout probability %g is outside [0, 1)", who, p);
}

// out = residual + dropout(x + bias) over n = N*C elements; residual and bias may be NULL
// (read as zero), out may be x or residual.
template <typename real>
static void residual_dropout_forward_cpu(real* out, const real* residual, const real* x, const real* bias, float p, uint64_t seed, size_t n, int C) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        real y = (x[i] + (bias ? bias[i % C] : 0)) * (real)dropout_factor(seed, i, p);
        out[i] = (residual ? residual[i] : 0) + y;
    }
}

// dx = dout * mask / (1-p) (=); dresidual += dout unless NULL; dbias += column sums of dx
// unless NULL. dx may be dout.
template <typename real>
static void residual_dropout_backward_cpu(real* dresidual, real* dx, real* dbias, const real* dout, float p, uint64_t seed, int N, int C) {
    if (dbias) {  // threads own slices of channels and add the rows in order: deterministic
        #pragma omp parallel for
        for (int c0 = 0; c0 < C; c0 += 64)
            for (int r = 0; r < N; r++)
                for (int c = c0; c < c0 + 64 && c < C; c++) {
                    size_t i = (size_t)r * C + c;
                    dbias[c] += dout[i] * (real)dropout_factor(seed, i, p);
                }
    }
    #pragma omp parallel for
    for (size_t i = 0; i < (size_t)N * C; i++) {
        real g = dout[i];
        if (dresidual) dresidual[i] += g;
        dx[i] = g * (real)dropout_factor(seed, i, p);
    }
}

#ifdef __CUDACC__
template <typename T, int W>
__global__ void residual_dropout_forward_kernel(T* out, const T* residual, const T* x, const T* bias, float p, uint64_t seed, size_t n, int C) {
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W;
    if (i >= n) return;
    Vec<T, W> xv = load_vec<W>(x + i), bv, rv, ov;
    if (bias) bv = load_vec<W>(bias + i % C);
    if (residual) rv = load_vec<W>(residual + i);
    for (int k = 0; k < W; k++) {
        float y = (to_float(xv.v[k]) + (bias ? to_float(bv.v[k]) : 0.0f)) * dropout_factor(seed, i + k, p);
        ov.v[k] = from_float<T>((residual ? to_float(rv.v[k]) : 0.0f) + y);
    }
    store_vec<W>(out + i, ov);
}

static void residual_dropout_forward_cuda(const Device* d, void* out, const void* residual, const void* x, const void* bias, float p, uint64_t seed, size_t n, int C) {
    DTYPE_SWITCH(d->dtype, T, {
        int vec = n % (16 / sizeof(T)) == 0 && (!bias || C % (16 / sizeof(T)) == 0) && aligned16(out) && aligned16(residual) && aligned16(x) && aligned16(bias);
        VEC_SWITCH(vec, T, W, {
            residual_dropout_forward_kernel<T, W><<<CEIL_DIV(n / W, 256), 256, 0, d->stream>>>((T*)out, (const T*)residual, (const T*)x, (const T*)bias, p, seed, n, C);
        });
    });
    cudaCheck(cudaGetLastError());
}

// Block i takes a contiguous chunk of rows (see ROW_CHUNKS); each thread owns W channels and
// walks down the chunk, so its dbias sums stay in registers, and writes them to partial row i.
template <typename T, int W>
__global__ void __launch_bounds__(1024) residual_dropout_backward_kernel(T* dresidual, T* dx, float* partials, const T* dout, float p, uint64_t seed, int N, int C) {
    int r_begin = (int)((long)blockIdx.x * N / gridDim.x), r_end = (int)((long)(blockIdx.x + 1) * N / gridDim.x);
    for (int c = threadIdx.x * W; c < C; c += blockDim.x * W) {
        float acc[W] = {0};
        for (int r = r_begin; r < r_end; r++) {
            size_t i = (size_t)r * C + c;
            Vec<T, W> g = load_vec<W>(dout + i), dxv;
            if (dresidual) {
                Vec<T, W> res = load_vec<W>(dresidual + i);
                for (int k = 0; k < W; k++) res.v[k] = from_float<T>(to_float(res.v[k]) + to_float(g.v[k]));
                store_vec<W>(dresidual + i, res);
            }
            for (int k = 0; k < W; k++) {
                float gx = to_float(g.v[k]) * dropout_factor(seed, i + k, p);
                acc[k] += gx;
                dxv.v[k] = from_float<T>(gx);
            }
            store_vec<W>(dx + i, dxv);
        }
        if (partials)
            for (int k = 0; k < W; k++) partials[(size_t)blockIdx.x * C + c + k] = acc[k];
    }
}

static void residual_dropout_backward_cuda(const Device* d, void* dresidual, void* dx, float* dbias, const void* dout, float p, uint64_t seed, int N, int C) {
    int chunks = row_chunks(N);
    float* partials = dbias ? (float*)pool_alloc(d, (size_t)chunks * C * sizeof(float)) : NULL;
    DTYPE_SWITCH(d->dtype, T, {
        int vec = C % (16 / sizeof(T)) == 0 && aligned16(dresidual) && aligned16(dx) && aligned16(dout);
        VEC_SWITCH(vec, T, W, {
            residual_dropout_backward_kernel<T, W><<<chunks, row_threads(C / W, 1024), 0, d->stream>>>(
                (T*)dresidual, (T*)dx, partials, (const T*)dout, p, seed, N, C);
        });
    });
    cudaCheck(cudaGetLastError());
    if (dbias) {
        column_sum(d, dbias, NULL, NULL, 1, partials, chunks, C);
        pool_free(d, partials);
    }
}
#endif

// out = residual + dropout(x + bias, p); bias may be NULL, p may be 0; out may be residual or x.
static void residual_dropout_forward(const Device* d, void* out, const void* residual, const void* x, const void* bias, float p, uint64_t seed, int N, int C) {
    check_dropout_p("residual_dropout_forward", p);
    if (N < 0 || C <= 0) die("residual_dropout_forward: bad shape N=%d C=%d", N, C);
    if (N == 0) return;
#ifdef __CUDACC__
    if (d->is_gpu) { residual_dropout_forward_cuda(d, out, residual, x, bias, p, seed, (size_t)N * C, C); return; }
#endif
    (void)d;
    residual_dropout_forward_cpu<float>((float*)out, (const float*)residual, (const float*)x, (const float*)bias, p, seed, (size_t)N * C, C);
}

// dresidual += dout (skipped when dresidual is NULL or is dout: the gradient is already there);
// dx = dout * mask / (1-p) (=, may be dout); dbias (fp32) += column sums of dx unless NULL.
// Deterministic on the GPU.
static void residual_dropout_backward(const Device* d, void* dresidual, void* dx, float* dbias, const void* dout, float p, uint64_t seed, int N, int C) {
    check_dropout_p("residual_dropout_backward", p);
    if (N < 0 || C <= 0) die("residual_dropout_backward: bad shape N=%d C=%d", N, C);
    if (N == 0) return;
    if (dresidual == dout) dresidual = NULL;
#ifdef __CUDACC__
    if (d->is_gpu) { residual_dropout_backward_cuda(d, dresidual, dx, dbias, dout, p, seed, N, C); return; }
#endif
    (void)d;
    residual_dropout_backward_cpu<float>((float*)dresidual, (float*)dx, dbias, (const float*)dout, p, seed, N, C);
}

// Plain dropout in place over n elements (the embedding output's hidden dropout).
static void dropout_forward(const Device* d, void* x, float p, uint64_t seed, size_t n) {
    check_dropout_p("dropout_forward", p);
    if (n == 0 || p == 0.0f) return;
#ifdef __CUDACC__
    if (d->is_gpu) { residual_dropout_forward_cuda(d, x, NULL, x, NULL, p, seed, n, 1); return; }
#endif
    (void)d;
    residual_dropout_forward_cpu<float>((float*)x, NULL, (const float*)x, NULL, p, seed, n, 1);
}

// Its backward in place: the gradient is masked and scaled exactly as the forward's values.
static void dropout_backward(const Device* d, void* dx, float p, uint64_t seed, size_t n) { dropout_forward(d, dx, p, seed, n); }
// <<< layers-residual

// >>> layers-crossentropy
// ----------------------------------------------------------------------------
// 3g. cross-entropy: the language-model loss, softmax and cross-entropy fused over the vocabulary
// (Megatron-1 §3 fuses the output GEMM with the loss so only b x s losses leave the logits).
// No probability tensor is kept: the gradient overwrites the logits in place.
// logits [N, Vp]: only the first V columns are real; the padded ones take no part and get gradient 0.
// losses[n] (=) = logsumexp(logits[n, :V]) - logits[n, targets[n]]; targets in [0, V).
// dloss (may be NULL: loss only): per-row weight of the loss (mask / tokens x loss scale); then
// logits (=) d(sum_n dloss[n] losses[n]) / d(logits) = (softmax - onehot(target)) * dloss[n].

template <typename real>
static void crossentropy_forward_backward_cpu(real* losses, real* logits, const int* targets, const real* dloss, int N, int V, int Vp) {
    for (int n = 0; n < N; n++)
        if (targets[n] < 0 || targets[n] >= V) die("cross-entropy: target %d of row %d is outside the vocabulary [0, %d)", targets[n], n, V);
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        real* x = logits + (size_t)n * Vp;
        real x_target = x[targets[n]], max_x = x[0];
        for (int i = 1; i < V; i++) max_x = x[i] > max_x ? x[i] : max_x;
        double sum = 0;
        for (int i = 0; i < V; i++) {
            real e = exp(x[i] - max_x);
            sum += e;
            if (dloss) x[i] = e;  // kept for the gradient: one exp per logit
        }
        losses[n] = (real)(log(sum) + max_x - x_target);
        if (!dloss) continue;
        real scale = (real)(dloss[n] / sum);
        for (int i = 0; i < V; i++) x[i] *= scale;
        x[targets[n]] -= dloss[n];
        for (int i = V; i < Vp; i++) x[i] = 0;
    }
}

#ifdef __CUDACC__
// GPU: one block per row (llm.c's fused classifier), three passes over the row: its maximum, its
// sum of exp, the gradient. STAGED: the block first copies the row into shared memory with
// cp.async (all of it in flight at once, one read from DRAM; at a GPT-2 vocabulary in bf16 two
// blocks fit an SM, so one row loads while the other computes); else each pass reads global
// memory (rows too long for shared memory; the later passes mostly hit L2).
#define CE_THREADS 512

template <typename T, int W, bool STAGED>
__global__ void __launch_bounds__(CE_THREADS) crossentropy_kernel(float* losses, T* logits, const int* targets, const float* dloss, int V, int Vp) {
    extern __shared__ __align__(16) unsigned char ce_row[];
    __shared__ float scratch[32];
    int n = blockIdx.x, target = targets[n];
    T* x = logits + (size_t)n * Vp;
    const T* row = x;
    if constexpr (STAGED) {  // 16 bytes per cp.async: W * sizeof(T) == 16
        for (int i = threadIdx.x * W; i < Vp; i += blockDim.x * W) cp_async16((T*)ce_row + i, x + i, true);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        row = (const T*)ce_row;
    }
    float x_target = threadIdx.x == 0 && target >= 0 && target < V ? to_float(row[target]) : NAN;  // before the gradient overwrites x

    float m = -FLT_MAX;
    for (int i = threadIdx.x * W; i < V; i += blockDim.x * W) {
        Vec<T, W> p = load_vec<W>(row + i);
        for (int j = 0; j < W; j++)
            if (i + j < V) m = fmaxf(m, to_float(p.v[j]));
    }
    m = block_reduce<true>(m, scratch);
    float s = 0.0f;  // exp(x - m) as 2^((x - m) log2 e): x - m is exact near the maximum, so a lone logit gets exactly 1
    for (int i = threadIdx.x * W; i < V; i += blockDim.x * W) {
        Vec<T, W> p = load_vec<W>(row + i);
        for (int j = 0; j < W; j++)
            if (i + j < V) s += exp2_approx((to_float(p.v[j]) - m) * LOG2E);
    }
    s = block_reduce<false>(s, scratch);
    if (threadIdx.x == 0) losses[n] = logf(s) + m - x_target;
    if (!dloss) return;

    float scale = dloss[n] / s, d_target = dloss[n];
    for (int i = threadIdx.x * W; i < Vp; i += blockDim.x * W) {
        Vec<T, W> p = load_vec<W>(row + i);
        for (int j = 0; j < W; j++) {
            int col = i + j;
            float grad = col < V ? exp2_approx((to_float(p.v[j]) - m) * LOG2E) * scale - (col == target ? d_target : 0.0f) : 0.0f;
            p.v[j] = from_float<T>(grad);
        }
        store_vec<W>(x + i, p);
    }
}

template <typename T, int W>
static void crossentropy_launch(const Device* d, float* losses, T* logits, const int* targets, const float* dloss, int N, int V, int Vp) {
    int threads = row_threads(CEIL_DIV(Vp, W), CE_THREADS);
    size_t row_bytes = (size_t)Vp * sizeof(T);
    if constexpr (W > 1) {
        if (row_bytes + 32 * sizeof(float) <= (size_t)smem_optin_limit(d)) {
            if (row_bytes > 48 * 1024) set_dynamic_smem(crossentropy_kernel<T, W, true>, row_bytes);
            crossentropy_kernel<T, W, true><<<N, threads, row_bytes, d->stream>>>(losses, logits, targets, dloss, V, Vp);
            return;
        }
    }
    crossentropy_kernel<T, W, false><<<N, threads, 0, d->stream>>>(losses, logits, targets, dloss, V, Vp);
}

static void crossentropy_forward_backward_cuda(const Device* d, float* losses, void* logits, const int* targets, const float* dloss,
                                               int N, int V, int Vp) {
    if (N == 0) return;
    DTYPE_SWITCH(d->dtype, T, {
        int vectorize = Vp % (16 / sizeof(T)) == 0 && aligned16(logits);
        VEC_SWITCH(vectorize, T, W, crossentropy_launch<T, W>(d, losses, (T*)logits, targets, dloss, N, V, Vp));
    });
    cudaCheck(cudaGetLastError());
}
#endif

static void crossentropy_forward_backward(const Device* d, float* losses, void* logits, const int* targets, const float* dloss,
                                          int N, int V, int Vp) {
    if (V < 1 || V > Vp) die("cross-entropy: vocabulary %d must be in [1, padded vocabulary %d]", V, Vp);
#ifdef __CUDACC__
    if (d->is_gpu) { crossentropy_forward_backward_cuda(d, losses, logits, targets, dloss, N, V, Vp); return; }
#endif
    (void)d;
    crossentropy_forward_backward_cpu<float>(losses, (float*)logits, targets, dloss, N, V, Vp);
}
// <<< layers-crossentropy

// >>> parallel
// ----------------------------------------------------------------------------
// 3h. parallelism: tensor model parallelism (Megatron-1 §3) and data parallelism, with
// collectives over MPI between CPU processes and over NCCL between GPUs.
//
// Rank layout as Megatron's: a tensor-parallel (TP) group is t consecutive world ranks (TP
// fastest), a data-parallel (DP) group takes the ranks with the same TP rank:
// world rank = dp_rank * t + tp_rank. Every collective names its group, is counted
// (Parallel.calls, the collective counter: doc/parallelism.md lists what one layer costs and
// test/test_parallel.cu checks it), and waits with a deadline: a rank that never arrives
// stops the run with "rank R: all_reduce #K in group tp timed out after S s", never a hang.
// Builds without MPI (no mpicxx) run as one process; started by a launcher with several
// ranks they stop with an error saying so. Where there is no MPI, GPU ranks can meet through
// a file rendezvous instead: WORLD_SIZE, RANK (and LOCAL_RANK) in the environment, as torchrun
// sets them, and MEGATRON_RENDEZVOUS naming an empty directory every rank sees; NCCL's unique
// ids travel through files there, and host values through the GPU.

#ifdef USE_MPI
#include <mpi.h>
#endif
#if defined(__CUDACC__) && defined(USE_NCCL)
#include <nccl.h>
#define HAVE_NCCL 1
#endif
#include <sched.h>

typedef enum { GROUP_TP, GROUP_DP, GROUP_WORLD, NUM_GROUPS } Group;
typedef enum { COLL_ALL_REDUCE, COLL_REDUCE_SCATTER, COLL_ALL_GATHER, NUM_COLLECTIVES } Collective;
typedef enum { REDUCE_SUM, REDUCE_MAX } ReduceOp;
static const char* const group_names[NUM_GROUPS] = {"tp", "dp", "world"};
static const char* const collective_names[NUM_COLLECTIVES] = {"all_reduce", "reduce_scatter", "all_gather"};

typedef struct {
    int size[NUM_GROUPS];                     // ranks in each group
    int rank[NUM_GROUPS];                     // this process's rank in each group
    double timeout;                           // seconds a collective waits for the other ranks
    long calls[NUM_COLLECTIVES][NUM_GROUPS];  // the collective counter
    int mpi;                                  // MPI_Init was called (a launcher started us)
#ifdef USE_MPI
    MPI_Comm comm[NUM_GROUPS];
#endif
#ifdef HAVE_NCCL
    ncclComm_t nccl[NUM_GROUPS];              // set by parallel_init_nccl on GPUs
    const Device* gpu;                        // the GPU the communicators use
    void* staging;                            // without MPI: host buffers pass through here
    size_t staging_bytes;
    cudaStream_t comm_stream;                 // all_reduce_start's collectives, beside the compute stream
    cudaEvent_t comm_ready;
#endif
    // all_reduce_start's collectives in flight, finished by all_reduce_finish
    int pending, pending_cap;
    long* pending_ids;
    Group* pending_groups;
#ifdef USE_MPI
    MPI_Request* pending_requests;
#endif
} Parallel;

// One process, no communication: what the single-device model and the unit tests use.
static Parallel* parallel_serial(void) {
    static Parallel p;
    for (int g = 0; g < NUM_GROUPS; g++) p.size[g] = 1;
    p.timeout = 600;
    return &p;
}

// The host as a Device: collectives on host memory (gathered parameters, the log's values).
static const Device* parallel_host_device(void) {
    static Device host;  // zeroed: the CPU, fp32
    return &host;
}

// The ranks a launcher (mpirun, srun with PMI/PMIx) started, from its environment; 0 without one.
static int launcher_world_size(void) {
    const char* vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"};
    for (int i = 0; i < 3; i++)
        if (getenv(vars[i])) return atoi(getenv(vars[i]));
    return getenv("PMIX_RANK") ? 1 : 0;
}

// The index of this process among those on its node, from the launcher (0 without one).
static int launcher_local_rank(void) {
    const char* vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"};
    for (int i = 0; i < 4; i++)
        if (getenv(vars[i])) return atoi(getenv(vars[i]));
    return 0;
}

// Join the launcher's world and cut it into TP groups of t ranks and DP groups.
static void parallel_init(Parallel* p, int t, double timeout) {
    memset(p, 0, sizeof(*p));
    int world = 1, rank = 0, launched = launcher_world_size();
#ifdef USE_MPI
    if (launched > 0) {
        MPI_Init(NULL, NULL);
        p->mpi = 1;
        MPI_Comm_size(MPI_COMM_WORLD, &world);
        MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    }
#else
    if (launched > 1)
        die("this binary was built without MPI and runs as one process, but the launcher started %d: "
            "install MPI (apt-get install libopenmpi-dev) and rebuild with make", launched);
#endif
    if (!p->mpi && getenv("MEGATRON_RENDEZVOUS")) {
        if (!getenv("WORLD_SIZE") || !getenv("RANK")) die("MEGATRON_RENDEZVOUS needs WORLD_SIZE and RANK in the environment");
        world = atoi(getenv("WORLD_SIZE"));
        rank = atoi(getenv("RANK"));
        if (world < 1 || rank < 0 || rank >= world) die("RANK %s and WORLD_SIZE %s: need 0 <= RANK < WORLD_SIZE", getenv("RANK"), getenv("WORLD_SIZE"));
    }
    if (world > 1) die_rank = rank;
    if (t < 1) arg_error("--tensor-model-parallel-size must be positive");
    if (world % t) arg_error("--tensor-model-parallel-size %d does not divide the world size %d", t, world);
    if (!(timeout > 0)) arg_error("--collective-timeout must be positive");
    p->size[GROUP_WORLD] = world;
    p->rank[GROUP_WORLD] = rank;
    p->size[GROUP_TP] = t;
    p->rank[GROUP_TP] = rank % t;
    p->size[GROUP_DP] = world / t;
    p->rank[GROUP_DP] = rank / t;
    p->timeout = timeout;
#ifdef USE_MPI
    if (p->mpi) {
        MPI_Comm_dup(MPI_COMM_WORLD, &p->comm[GROUP_WORLD]);
        MPI_Comm_split(MPI_COMM_WORLD, rank / t, rank % t, &p->comm[GROUP_TP]);
        MPI_Comm_split(MPI_COMM_WORLD, rank % t, rank / t, &p->comm[GROUP_DP]);
    }
#endif
}

// Before device_init: each process of a node takes its own GPU (local rank modulo the GPUs).
static void parallel_select_gpu(const Parallel* p) {
#ifdef __CUDACC__
    int count = 0;
    if (p->size[GROUP_WORLD] > 1 && cudaGetDeviceCount(&count) == cudaSuccess && count > 0)
        cudaCheck(cudaSetDevice(launcher_local_rank() % count));
    cudaGetLastError();
#endif
    (void)p;
}

#ifdef HAVE_NCCL
static void nccl_check(ncclResult_t r, const char* file, int line) {
    if (r != ncclSuccess) die("NCCL error at %s:%d: %s", file, line, ncclGetErrorString(r));
}
#define ncclCheck(r) nccl_check((r), __FILE__, __LINE__)

static ncclDataType_t nccl_type(DType dt) { return dt == DT_F32 ? ncclFloat : dt == DT_BF16 ? ncclBfloat16 : ncclHalf; }
#endif

#ifdef HAVE_NCCL
// The file rendezvous: the group's rank 0 writes its id to DIR/nccl-GROUP-INDEX (under a
// temporary name, then renamed), the others wait for the file until the collective timeout.
static void rendezvous_unique_id(const Parallel* p, Group g, ncclUniqueId* id) {
    int t = p->size[GROUP_TP], w = p->rank[GROUP_WORLD];
    int index = g == GROUP_TP ? w / t : g == GROUP_DP ? w % t : 0;
    char path[4096], tmp[4200];
    snprintf(path, sizeof(path), "%s/nccl-%s-%d", getenv("MEGATRON_RENDEZVOUS"), group_names[g], index);
    if (p->rank[g] == 0) {
        snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, w);
        FILE* f = fopen(tmp, "wb");
        if (!f || fwrite(id, sizeof(*id), 1, f) != 1 || fclose(f) || rename(tmp, path))
            die("MEGATRON_RENDEZVOUS: cannot write %s: %s", path, strerror(errno));
        return;
    }
    double start = now_seconds();
    for (;;) {
        FILE* f = fopen(path, "rb");
        if (f) {
            size_t got = fread(id, sizeof(*id), 1, f);
            fclose(f);
            if (got == 1) return;
        }
        if (now_seconds() - start > p->timeout)
            die("MEGATRON_RENDEZVOUS: no %s from rank 0 of group %s after %.0f s (is the directory shared, empty, and rank 0 running?)",
                path, group_names[g], p->timeout);
        usleep(10000);
    }
}
#endif

// On GPUs: one NCCL communicator per group; each group's unique id travels from its rank 0 over
// MPI, or through the file rendezvous. A world of one rank needs none, unless `force` asks
// for them (--debug-force-nccl: then every collective runs through NCCL, a check on one GPU).
static void parallel_init_nccl(Parallel* p, const Device* d, int force) {
    if (force && !d->is_gpu) arg_error("--debug-force-nccl needs a GPU");
    if (p->size[GROUP_WORLD] == 1 && !force) return;
    if (!d->is_gpu && p->mpi) return;
    if (!d->is_gpu) die("CPU ranks need MPI (mpirun); MEGATRON_RENDEZVOUS is for NCCL between GPUs");
#ifdef HAVE_NCCL
    p->gpu = d;
    for (int g = 0; g < NUM_GROUPS; g++) {
        ncclUniqueId id;
        if (p->rank[g] == 0) ncclCheck(ncclGetUniqueId(&id));
#ifdef USE_MPI
        if (p->mpi) MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, p->comm[g]);
#endif
        if (!p->mpi && p->size[g] > 1) rendezvous_unique_id(p, (Group)g, &id);
        ncclCheck(ncclCommInitRank(&p->nccl[g], p->size[g], id, p->rank[g]));
    }
#else
    die("%s needs a build with NCCL (nccl.h found by make next to nvcc)", force ? "--debug-force-nccl" : "several GPU ranks");
#endif
}

static void parallel_finalize(Parallel* p) {
#ifdef HAVE_NCCL
    for (int g = 0; g < NUM_GROUPS; g++)
        if (p->nccl[g]) ncclCheck(ncclCommDestroy(p->nccl[g]));
    if (p->staging) cudaCheck(cudaFree(p->staging));
    if (p->comm_stream) {
        cudaCheck(cudaEventDestroy(p->comm_ready));
        cudaCheck(cudaStreamDestroy(p->comm_stream));
    }
#endif
    free(p->pending_ids);
    free(p->pending_groups);
#ifdef USE_MPI
    free(p->pending_requests);
#endif
#ifdef USE_MPI
    if (p->mpi) {
        for (int g = 0; g < NUM_GROUPS; g++) MPI_Comm_free(&p->comm[g]);
        MPI_Finalize();
    }
#endif
    (void)p;
}

static void collective_timed_out(const Parallel* p, Collective kind, Group g, long id) {
    fprintf(stderr, "error: rank %d: %s #%ld in group %s (%d ranks) timed out after %.0f s: another rank of the group died, "
            "hangs, or runs different collectives (were all ranks started with the same flags?)\n",
            p->rank[GROUP_WORLD], collective_names[kind], id, group_names[g], p->size[g], p->timeout);
    fflush(stderr);
#ifdef USE_MPI
    if (p->mpi) MPI_Abort(MPI_COMM_WORLD, 1);
#endif
    exit(1);
}

#ifdef USE_MPI
// The watchdog: poll a nonblocking collective until it completes or its deadline passes.
static void mpi_wait(const Parallel* p, MPI_Request* req, Collective kind, Group g, long id) {
    double start = now_seconds();
    for (int done = 0;;) {
        MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (done) return;
        if (now_seconds() - start > p->timeout) collective_timed_out(p, kind, g, id);
        sched_yield();
    }
}

static MPI_Datatype mpi_type(DType dt) {
    if (dt != DT_F32) die("MPI collectives reduce fp32 only (the CPU path is fp32)");
    return MPI_FLOAT;
}
#endif

#ifdef HAVE_NCCL
// The same watchdog on a GPU: poll the stream, and NCCL's own error state, until the deadline.
static void nccl_wait_stream(const Parallel* p, cudaStream_t stream, Collective kind, Group g, long id) {
    double start = now_seconds();
    for (;;) {
        cudaError_t status = cudaStreamQuery(stream);
        if (status == cudaSuccess) return;
        if (status != cudaErrorNotReady) cudaCheck(status);
        ncclResult_t async;
        ncclCheck(ncclCommGetAsyncError(p->nccl[g], &async));
        if (async != ncclSuccess) die("%s #%ld in group %s failed: %s", collective_names[kind], id, group_names[g], ncclGetErrorString(async));
        if (now_seconds() - start > p->timeout) {
            ncclCommAbort(p->nccl[g]);
            collective_timed_out(p, kind, g, id);
        }
        sched_yield();
    }
}

static void nccl_wait(const Parallel* p, const Device* d, Collective kind, Group g, long id) { nccl_wait_stream(p, d->stream, kind, g, id); }

// Without MPI, a collective on host memory runs on the GPU: copy in, collective, copy out.
// Returns the device buffer to use (buf itself when it is on the GPU already).
static void* nccl_stage_in(Parallel* p, const Device* d, void* buf, size_t bytes) {
    if (d->is_gpu) return buf;
    if (p->staging_bytes < bytes) {
        if (p->staging) cudaCheck(cudaFree(p->staging));
        cudaCheck(cudaMalloc(&p->staging, bytes));
        p->staging_bytes = bytes;
    }
    dev_upload(p->gpu, p->staging, buf, bytes);
    return p->staging;
}

static void nccl_stage_out(const Parallel* p, const Device* d, void* buf, size_t bytes) {
    if (!d->is_gpu) dev_download(p->gpu, buf, p->staging, bytes);
}

// NCCL runs a collective where the data is on the GPU, or on the host of a run without MPI.
static int use_nccl(const Parallel* p, const Device* d, Group g) { return p->nccl[g] && (d->is_gpu || !p->mpi); }
#endif

// A collective has nothing to do for no values, or in a group of one rank, unless
// --debug-force-nccl gave that group a communicator (to run the NCCL path on one GPU).
static int collective_is_noop(const Parallel* p, Group g, size_t n) {
    if (n == 0) return 1;
#ifdef HAVE_NCCL
    if (p->nccl[g]) return 0;
#endif
    return p->size[g] == 1;
}

// buf (n values of dtype dt, on d) = the sum (or max) of buf over the group's ranks.
static void all_reduce(Parallel* p, const Device* d, Group g, void* buf, size_t n, DType dt, ReduceOp op) {
    long id = ++p->calls[COLL_ALL_REDUCE][g];
    if (collective_is_noop(p, g, n)) return;
#ifdef HAVE_NCCL
    if (use_nccl(p, d, g)) {
        size_t bytes = n * dtype_size(dt);
        void* x = nccl_stage_in(p, d, buf, bytes);
        ncclCheck(ncclAllReduce(x, x, n, nccl_type(dt), op == REDUCE_SUM ? ncclSum : ncclMax, p->nccl[g], p->gpu->stream));
        nccl_wait(p, p->gpu, COLL_ALL_REDUCE, g, id);
        nccl_stage_out(p, d, buf, bytes);
        return;
    }
#endif
#ifdef USE_MPI
    if (n > INT32_MAX) die("all_reduce of %zu values: above MPI's int count", n);
    MPI_Request req;
    MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, mpi_type(dt), op == REDUCE_SUM ? MPI_SUM : MPI_MAX, p->comm[g], &req);
    mpi_wait(p, &req, COLL_ALL_REDUCE, g, id);
#endif
    (void)d; (void)dt; (void)op; (void)id;
}

// The same sum of fp32 values, started now and finished by all_reduce_finish: the gradient
// all-reduce runs while the backward pass goes on. On a GPU it runs on its own stream after
// the work queued so far; on the CPU it is MPI's nonblocking all-reduce.
static void all_reduce_start(Parallel* p, const Device* d, Group g, float* buf, size_t n) {
    long id = ++p->calls[COLL_ALL_REDUCE][g];
    if (collective_is_noop(p, g, n)) return;
    if (p->pending == p->pending_cap) {
        p->pending_cap = p->pending_cap ? 2 * p->pending_cap : 64;
        p->pending_ids = (long*)realloc(p->pending_ids, p->pending_cap * sizeof(long));
        p->pending_groups = (Group*)realloc(p->pending_groups, p->pending_cap * sizeof(Group));
#ifdef USE_MPI
        p->pending_requests = (MPI_Request*)realloc(p->pending_requests, p->pending_cap * sizeof(MPI_Request));
#endif
        if (!p->pending_ids || !p->pending_groups) die("out of host memory");
#ifdef USE_MPI
        if (!p->pending_requests) die("out of host memory");
#endif
    }
    p->pending_ids[p->pending] = id;
    p->pending_groups[p->pending] = g;
#ifdef HAVE_NCCL
    if (d->is_gpu) {
        if (!p->comm_stream) {
            cudaCheck(cudaStreamCreateWithFlags(&p->comm_stream, cudaStreamNonBlocking));
            cudaCheck(cudaEventCreateWithFlags(&p->comm_ready, cudaEventDisableTiming));
        }
        cudaCheck(cudaEventRecord(p->comm_ready, d->stream));
        cudaCheck(cudaStreamWaitEvent(p->comm_stream, p->comm_ready, 0));
        ncclCheck(ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, p->nccl[g], p->comm_stream));
        p->pending++;
        return;
    }
#endif
#ifdef USE_MPI
    if (n > INT32_MAX) die("all_reduce of %zu values: above MPI's int count", n);
    MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, p->comm[g], &p->pending_requests[p->pending]);
    p->pending++;
#endif
    (void)d; (void)buf;
}

// Wait (with the watchdog) for every all_reduce_start; afterwards the compute stream may use the sums.
static void all_reduce_finish(Parallel* p, const Device* d) {
    if (p->pending == 0) return;
#ifdef HAVE_NCCL
    if (d->is_gpu) {
        nccl_wait_stream(p, p->comm_stream, COLL_ALL_REDUCE, p->pending_groups[p->pending - 1], p->pending_ids[p->pending - 1]);
        p->pending = 0;
        return;
    }
#endif
#ifdef USE_MPI
    for (int k = 0; k < p->pending; k++) mpi_wait(p, &p->pending_requests[k], COLL_ALL_REDUCE, p->pending_groups[k], p->pending_ids[k]);
#endif
    p->pending = 0;
    (void)d;
}

// buf holds size x n fp32 values; afterwards its block of this rank, buf[rank*n .. (rank+1)*n),
// is the sum of that block over the group (the other blocks are left undefined).
static void reduce_scatter(Parallel* p, const Device* d, Group g, float* buf, size_t n) {
    long id = ++p->calls[COLL_REDUCE_SCATTER][g];
    if (collective_is_noop(p, g, n)) return;
#ifdef HAVE_NCCL
    if (use_nccl(p, d, g)) {
        if (!d->is_gpu) die("reduce_scatter of host memory needs MPI");
        ncclCheck(ncclReduceScatter(buf, buf + (size_t)p->rank[g] * n, n, ncclFloat, ncclSum, p->nccl[g], d->stream));
        nccl_wait(p, d, COLL_REDUCE_SCATTER, g, id);
        return;
    }
#endif
#ifdef USE_MPI
    if (n > INT32_MAX) die("reduce_scatter of %zu values per rank: above MPI's int count", n);
    MPI_Request req;
    MPI_Ireduce_scatter_block(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, p->comm[g], &req);
    mpi_wait(p, &req, COLL_REDUCE_SCATTER, g, id);
    memmove(buf + (size_t)p->rank[g] * n, buf, n * sizeof(float));  // MPI's in-place result lands in the first block
#endif
    (void)d; (void)id;
}

// buf holds size x n values of dtype dt; every rank's block buf[rank*n ..] goes to all ranks.
static void all_gather(Parallel* p, const Device* d, Group g, void* buf, size_t n, DType dt) {
    long id = ++p->calls[COLL_ALL_GATHER][g];
    if (collective_is_noop(p, g, n)) return;
    size_t bytes = n * dtype_size(dt);
#ifdef HAVE_NCCL
    if (use_nccl(p, d, g)) {
        char* x = (char*)nccl_stage_in(p, d, buf, p->size[g] * bytes);
        ncclCheck(ncclAllGather(x + p->rank[g] * bytes, x, n, nccl_type(dt), p->nccl[g], p->gpu->stream));
        nccl_wait(p, p->gpu, COLL_ALL_GATHER, g, id);
        nccl_stage_out(p, d, buf, p->size[g] * bytes);
        return;
    }
#endif
#ifdef USE_MPI
    if (bytes > INT32_MAX) die("all_gather of %zu bytes per rank: above MPI's int count", bytes);
    MPI_Request req;
    MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, (int)bytes, MPI_BYTE, p->comm[g], &req);
    mpi_wait(p, &req, COLL_ALL_GATHER, g, id);
#endif
    (void)d; (void)bytes; (void)id;
}

// Host doubles (losses, squared norms): x = the sum over the group.
static void all_reduce_host(Parallel* p, Group g, double* x, int n) {
    long id = ++p->calls[COLL_ALL_REDUCE][g];
    if (collective_is_noop(p, g, n)) return;
#ifdef HAVE_NCCL
    if (!p->mpi) {
        void* staged = nccl_stage_in(p, parallel_host_device(), x, n * sizeof(double));
        ncclCheck(ncclAllReduce(staged, staged, n, ncclDouble, ncclSum, p->nccl[g], p->gpu->stream));
        nccl_wait(p, p->gpu, COLL_ALL_REDUCE, g, id);
        nccl_stage_out(p, parallel_host_device(), x, n * sizeof(double));
        return;
    }
#endif
#ifdef USE_MPI
    MPI_Request req;
    MPI_Iallreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_SUM, p->comm[g], &req);
    mpi_wait(p, &req, COLL_ALL_REDUCE, g, id);
#endif
    (void)x; (void)n; (void)id;
}

// Every rank must run the same command line (else collectives would silently disagree):
// compare a hash of argv across the world and name the first rank that differs.
static void parallel_check_same_flags(Parallel* p, int argc, char** argv) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the arguments and their separators
    for (int i = 1; i < argc; i++)
        for (const char* s = argv[i];; s++) {
            h = (h ^ (unsigned char)*s) * 1099511628211ull;
            if (!*s) break;
        }
    int world = p->size[GROUP_WORLD];
    uint64_t* all = (uint64_t*)xcalloc(world, sizeof(uint64_t));
    all[p->rank[GROUP_WORLD]] = h;
    all_gather(p, parallel_host_device(), GROUP_WORLD, all, sizeof(uint64_t) / sizeof(float), DT_F32);  // moves bits only
    for (int r = 1; r < world; r++)
        if (all[r] != all[0]) die("rank %d was started with different flags than rank 0: every rank needs the same command line", r);
    free(all);
}

// ---- Megatron-1 §3's conjugate operators around a column-parallel then row-parallel pair:
// f is the identity forward and an all-reduce of the input gradient backward (before a
// column-parallel layer: each rank's partial dX covers its own output columns);
// g is an all-reduce forward (after a row-parallel layer: each rank's output is a partial
// sum over its input columns) and the identity backward.
static void tp_f_backward(Parallel* p, const Device* d, void* dx, size_t n) { all_reduce(p, d, GROUP_TP, dx, n, d->dtype, REDUCE_SUM); }
static void tp_g_forward(Parallel* p, const Device* d, void* x, size_t n) { all_reduce(p, d, GROUP_TP, x, n, d->dtype, REDUCE_SUM); }

// dst (+=) src, n fp32 values.
#ifdef __CUDACC__
__global__ void add_floats_kernel(float* dst, const float* src, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] += src[i];
}
#endif

static void add_floats(const Device* d, float* dst, const float* src, size_t n) {
    if (n == 0) return;
#ifdef __CUDACC__
    if (d->is_gpu) {
        add_floats_kernel<<<CEIL_DIV(n, 256), 256, 0, d->stream>>>(dst, src, n);
        cudaCheck(cudaGetLastError());
        return;
    }
#endif
    (void)d;
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) dst[i] += src[i];
}

// ---- VocabParallelEmbedding (Megatron-1 §3): rank r holds rows [r*V/t, (r+1)*V/t) of the word
// embedding. A rank looks up the tokens in its range and writes 0 for the others, rank 0 adds
// the (replicated) position embedding, and the caller's g all-reduce sums the ranks: exactly
// wte[token] + wpe[t], as on one device (the other terms are zeros).
// local_tokens[r] = token - first row of the shard, or `rows` (a sink) for the other ranks' tokens.

template <typename real>
static void vocab_embedding_forward_cpu(real* out, const int* local_tokens, const real* wte, const real* wpe, int rows, int B, int T, int C) {
    #pragma omp parallel for
    for (int r = 0; r < B * T; r++) {
        const real* w = local_tokens[r] < rows ? wte + (size_t)local_tokens[r] * C : NULL;
        const real* p = wpe ? wpe + (size_t)(r / B) * C : NULL;
        real* o = out + (size_t)r * C;
        for (int c = 0; c < C; c++) o[c] = (w ? w[c] : 0) + (p ? p[c] : 0);
    }
}

#ifdef __CUDACC__
template <typename T>
__global__ void vocab_embedding_forward_kernel(T* out, const int* local_tokens, const T* wte, const T* wpe, int rows, int B, int C) {
    int r = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int token = local_tokens[r];
    float x = (token < rows ? to_float(wte[(size_t)token * C + c]) : 0.0f) + (wpe ? to_float(wpe[(size_t)(r / B) * C + c]) : 0.0f);
    out[(size_t)r * C + c] = from_float<T>(x);
}
#endif

// wpe: NULL on the ranks that must not add the positions (all but TP rank 0).
static void vocab_embedding_forward(const Device* d, void* out, const int* local_tokens, const void* wte, const void* wpe, int rows, int B, int T, int C) {
#ifdef __CUDACC__
    if (d->is_gpu) {
        DTYPE_SWITCH(d->dtype, T_, {
            vocab_embedding_forward_kernel<T_><<<dim3(B * T, CEIL_DIV(C, 256)), 256, 0, d->stream>>>((T_*)out, local_tokens, (const T_*)wte,
                                                                                              (const T_*)wpe, rows, B, C);
        });
        cudaCheck(cudaGetLastError());
        return;
    }
#endif
    (void)d;
    vocab_embedding_forward_cpu<float>((float*)out, local_tokens, (const float*)wte, (const float*)wpe, rows, B, T, C);
}

// Backward: dwte (+=) gets the rows of this rank's tokens, dwpe (+=) all of dout (on every rank:
// the replicated position embedding's gradient is the full one). scratch: fp32 (rows + 1) x C,
// the deterministic embedding_backward accumulates into it with the other ranks' tokens in the sink row.
static void vocab_embedding_backward(const Device* d, float* dwte, float* dwpe, float* scratch, const void* dout, const int* local_tokens,
                                     int rows, int B, int T, int C) {
    dev_zero(d, scratch, (size_t)(rows + 1) * C * sizeof(float));
    embedding_backward(d, scratch, dwpe, dout, local_tokens, B, T, C);
    add_floats(d, dwte, scratch, (size_t)rows * C);
}

// ---- Vocab-parallel cross-entropy (Megatron-1 §3: the output GEMM's columns are split over
// the vocabulary and the loss is computed without gathering the logits). Rank r holds logits
// [N, Vr] for columns [start, start + Vr), of which the first `valid` are real vocabulary:
//   M_n = max over ranks of the local max       (all-reduce max)
//   S_n = sum over ranks of sum_j exp(x_nj - M_n), x_target summed likewise (0 off its rank)
//                                               (one all-reduce sum of [S | x_target])
//   loss_n = log S_n + M_n - x_target,  dlogits (=) (exp(x - M)/S - onehot) * dloss_n.
// stats: fp32 scratch of 3N values [M | S | x_target].

template <typename real>
static void vocab_ce_max_cpu(float* maxes, const real* logits, int N, int Vr, int valid) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float m = -FLT_MAX;
        for (int j = 0; j < valid; j++) m = fmaxf(m, (float)logits[(size_t)n * Vr + j]);
        maxes[n] = m;
    }
}

template <typename real>
static void vocab_ce_sums_cpu(float* sums, const real* logits, const float* maxes, const int* targets, int start, int N, int Vr, int valid) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real* x = logits + (size_t)n * Vr;
        double s = 0;
        for (int j = 0; j < valid; j++) s += exp((double)x[j] - maxes[n]);
        int local = targets[n] - start;
        sums[n] = (float)s;
        sums[N + n] = local >= 0 && local < valid ? (float)x[local] : 0.0f;
    }
}

template <typename real>
static void vocab_ce_finish_cpu(float* losses, real* logits, const float* stats, const int* targets, const float* dloss, int start, int N, int Vr, int valid) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float m = stats[n], s = stats[N + n], x_target = stats[2 * N + n];
        losses[n] = logf(s) + m - x_target;
        if (!dloss) continue;
        real* x = logits + (size_t)n * Vr;
        int local = targets[n] - start;
        for (int j = 0; j < Vr; j++)
            x[j] = j < valid ? (real)((expf((float)x[j] - m) / s - (j == local ? 1.0f : 0.0f)) * dloss[n]) : 0;
    }
}

#ifdef __CUDACC__
// One block of 256 threads per row; reductions in a fixed order (block_reduce).
// mode 0: maxes; mode 1: [S | x_target] with the all-reduced maxes.
template <typename T>
__global__ void vocab_ce_stats_kernel(float* stats, const T* logits, const int* targets, int start, int N, int Vr, int valid, int mode) {
    int n = blockIdx.x;
    __shared__ float scratch[32];
    const T* x = logits + (size_t)n * Vr;
    if (mode == 0) {
        float m = -FLT_MAX;
        for (int j = threadIdx.x; j < valid; j += blockDim.x) m = fmaxf(m, to_float(x[j]));
        m = block_reduce<true>(m, scratch);
        if (threadIdx.x == 0) stats[n] = m;
        return;
    }
    float m = stats[n], s = 0.0f;
    for (int j = threadIdx.x; j < valid; j += blockDim.x) s += expf(to_float(x[j]) - m);
    s = block_reduce<false>(s, scratch);
    if (threadIdx.x == 0) {
        int local = targets[n] - start;
        stats[N + n] = s;
        stats[2 * N + n] = local >= 0 && local < valid ? to_float(x[local]) : 0.0f;
    }
}

template <typename T>
__global__ void vocab_ce_finish_kernel(float* losses, T* logits, const float* stats, const int* targets, const float* dloss, int start, int N, int Vr, int valid) {
    int n = blockIdx.x;
    float m = stats[n], s = stats[N + n];
    if (threadIdx.x == 0) losses[n] = logf(s) + m - stats[2 * N + n];
    if (!dloss) return;
    T* x = logits + (size_t)n * Vr;
    int local = targets[n] - start;
    for (int j = threadIdx.x; j < Vr; j += blockDim.x)
        x[j] = from_float<T>(j < valid ? (expf(to_float(x[j]) - m) / s - (j == local ? 1.0f : 0.0f)) * dloss[n] : 0.0f);
}
#endif

// losses (=) and, when dloss is given, logits (=) their gradient; V: the real vocabulary.
static void vocab_parallel_crossentropy(Parallel* p, const Device* d, float* losses, void* logits, const int* targets, const float* dloss,
                                        float* stats, int N, int V, int Vp) {
    int t = p->size[GROUP_TP], Vr = Vp / t, start = p->rank[GROUP_TP] * Vr;
    int valid = V - start < 0 ? 0 : V - start > Vr ? Vr : V - start;
    if (Vp % t) die("vocab-parallel cross-entropy: padded vocabulary %d is not a multiple of %d ranks", Vp, t);
#ifdef __CUDACC__
    if (d->is_gpu) {
        DTYPE_SWITCH(d->dtype, T_, vocab_ce_stats_kernel<T_><<<N, 256, 0, d->stream>>>(stats, (const T_*)logits, targets, start, N, Vr, valid, 0));
        cudaCheck(cudaGetLastError());
        all_reduce(p, d, GROUP_TP, stats, N, DT_F32, REDUCE_MAX);
        DTYPE_SWITCH(d->dtype, T_, vocab_ce_stats_kernel<T_><<<N, 256, 0, d->stream>>>(stats, (const T_*)logits, targets, start, N, Vr, valid, 1));
        cudaCheck(cudaGetLastError());
        all_reduce(p, d, GROUP_TP, stats + N, 2 * (size_t)N, DT_F32, REDUCE_SUM);
        DTYPE_SWITCH(d->dtype, T_, vocab_ce_finish_kernel<T_><<<N, 256, 0, d->stream>>>(losses, (T_*)logits, stats, targets, dloss, start, N, Vr, valid));
        cudaCheck(cudaGetLastError());
        return;
    }
#endif
    vocab_ce_max_cpu<float>(stats, (const float*)logits, N, Vr, valid);
    all_reduce(p, d, GROUP_TP, stats, N, DT_F32, REDUCE_MAX);
    vocab_ce_sums_cpu<float>(stats + N, (const float*)logits, stats, targets, start, N, Vr, valid);
    all_reduce(p, d, GROUP_TP, stats + N, 2 * (size_t)N, DT_F32, REDUCE_SUM);
    vocab_ce_finish_cpu<float>(losses, (float*)logits, stats, targets, dloss, start, N, Vr, valid);
}
// <<< parallel

// >>> optimizer
// ----------------------------------------------------------------------------
// 4. optimizer: AdamW (decoupled weight decay, as apex FusedAdam with adam_w_mode in
// Megatron) and the global gradient norm for clipping. No paper section: Megatron-LM's
// optimizer/ code.

// ---- global gradient norm: returns sum(g^2) over n fp32 gradients (the caller takes the
// square root, clips with coeff = clip / (norm + 1e-6), and skips a step whose result is not
// finite). Accumulated in double in a fixed order (contiguous chunks on the CPU, a fixed
// grid on the GPU): the same bits on every run.

#define GRAD_NORM_CHUNKS 1024

static float grad_norm_squared_cpu(const float* grads, size_t n) {
    double partial[GRAD_NORM_CHUNKS];
    #pragma omp parallel for
    for (int k = 0; k < GRAD_NORM_CHUNKS; k++) {
        double sum = 0;
        for (size_t i = n * k / GRAD_NORM_CHUNKS; i < n * (k + 1) / GRAD_NORM_CHUNKS; i++) sum += (double)grads[i] * grads[i];
        partial[k] = sum;
    }
    double total = 0;
    for (int k = 0; k < GRAD_NORM_CHUNKS; k++) total += partial[k];
    return (float)total;
}

#ifdef __CUDACC__
// GRAD_NORM_CHUNKS blocks of 256 threads stride over the gradients (a fixed assignment, on
// any GPU); block k writes its sum to partials[k].
template <int W>
__global__ void grad_norm_squared_kernel(double* partials, const float* grads, size_t n) {
    __shared__ double warp_sums[32];
    double sum = 0;
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W; i < n; i += (size_t)gridDim.x * blockDim.x * W) {
        Vec<float, W> g = load_vec<W>(grads + i);
        for (int k = 0; k < W; k++) sum += (double)g.v[k] * g.v[k];
    }
    sum = warp_sum(sum);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0;
        for (int w = 0; w < blockDim.x / 32; w++) total += warp_sums[w];
        partials[blockIdx.x] = total;
    }
}

// Range r's block sums land in partials[r * GRAD_NORM_CHUNKS ...]; one copy back and one wait for all.
static void grad_norm_partials_cuda(const Device* d, double* host, const float* const* grads, const size_t* n, int count) {
    double* partials = (double*)pool_alloc(d, (size_t)count * GRAD_NORM_CHUNKS * sizeof(double));
    for (int r = 0; r < count; r++) {
        double* out = partials + (size_t)r * GRAD_NORM_CHUNKS;
        if (n[r] % 4 == 0 && aligned16(grads[r])) grad_norm_squared_kernel<4><<<GRAD_NORM_CHUNKS, 256, 0, d->stream>>>(out, grads[r], n[r]);
        else grad_norm_squared_kernel<1><<<GRAD_NORM_CHUNKS, 256, 0, d->stream>>>(out, grads[r], n[r]);
        cudaCheck(cudaGetLastError());
    }
    cudaCheck(cudaMemcpyAsync(host, partials, (size_t)count * GRAD_NORM_CHUNKS * sizeof(double), cudaMemcpyDeviceToHost, d->stream));
    pool_free(d, partials);
    cudaCheck(cudaStreamSynchronize(d->stream));
}
#endif

// The sum over `count` ranges (grads[r], n[r]) of each range's sum(g^2) rounded to float, with one
// synchronisation with the GPU; the same bits as adding up grad_norm_squared of each range.
static double grad_norm_squared_ranges(const Device* d, const float* const* grads, const size_t* n, int count) {
    double total = 0;
#ifdef __CUDACC__
    if (d->is_gpu) {
        double* host = (double*)xmalloc((size_t)count * GRAD_NORM_CHUNKS * sizeof(double));
        grad_norm_partials_cuda(d, host, grads, n, count);
        for (int r = 0; r < count; r++) {
            double range = 0;
            for (int k = 0; k < GRAD_NORM_CHUNKS; k++) range += host[(size_t)r * GRAD_NORM_CHUNKS + k];
            total += (float)range;
        }
        free(host);
        return total;
    }
#endif
    (void)d;
    for (int r = 0; r < count; r++) total += grad_norm_squared_cpu(grads[r], n[r]);
    return total;
}

// Synchronises with the GPU (the result comes back to the host).
static float grad_norm_squared(const Device* d, const float* grads, size_t n) {
    return (float)grad_norm_squared_ranges(d, &grads, &n, 1);
}

// ---- AdamW

typedef struct {
    float lr, beta1, beta2, eps, weight_decay, grad_scale;
    float bias_correction1, bias_correction2;  // 1 - beta^step
} AdamWStep;

// One parameter's update, apex FusedAdam (adam_w_mode=1): the moments see g = grad * grad_scale,
// p -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p).
HD static inline float adamw_param(float p, float grad, float* m, float* v, const AdamWStep* h) {
    float g = grad * h->grad_scale;
    *m = h->beta1 * *m + (1.0f - h->beta1) * g;
    *v = h->beta2 * *v + (1.0f - h->beta2) * g * g;
    float update = (*m / h->bias_correction1) / (sqrtf(*v / h->bias_correction2) + h->eps) + h->weight_decay * p;
    return p - h->lr * update;
}

// The CPU path is fp32: params are floats; master, if given, is updated too and params copied from it.
static void adamw_update_cpu(float* params, float* master, const float* grads, float* m, float* v, size_t n, AdamWStep h) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float p = adamw_param(master ? master[i] : params[i], grads[i], &m[i], &v[i], &h);
        if (master) master[i] = p;
        params[i] = p;
    }
}

#ifdef __CUDACC__
template <typename T, int W>
__global__ void adamw_kernel(T* params, float* master, const float* grads, float* m, float* v, size_t n, AdamWStep h) {
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W;
    if (i >= n) return;
    Vec<float, W> g = load_vec<W>(grads + i), mv = load_vec<W>(m + i), vv = load_vec<W>(v + i), p;
    Vec<T, W> pt;
    if (master) p = load_vec<W>(master + i);
    else {
        pt = load_vec<W>(params + i);
        for (int k = 0; k < W; k++) p.v[k] = to_float(pt.v[k]);
    }
    for (int k = 0; k < W; k++) {
        p.v[k] = adamw_param(p.v[k], g.v[k], &mv.v[k], &vv.v[k], &h);
        pt.v[k] = from_float<T>(p.v[k]);  // round to nearest, as Megatron copies master to model params
    }
    store_vec<W>(m + i, mv);
    store_vec<W>(v + i, vv);
    if (master) store_vec<W>(master + i, p);
    store_vec<W>(params + i, pt);
}

static void adamw_update_cuda(const Device* d, void* params, float* master, const float* grads, float* m, float* v, size_t n, AdamWStep h) {
    DTYPE_SWITCH(d->dtype, T, {
        int vec = n % (16 / sizeof(T)) == 0 && aligned16(params) && aligned16(master) && aligned16(grads) && aligned16(m) && aligned16(v);
        VEC_SWITCH(vec, T, W, {
            adamw_kernel<T, W><<<CEIL_DIV(n / W, 256), 256, 0, d->stream>>>((T*)params, master, grads, m, v, n, h);
        });
    });
    cudaCheck(cudaGetLastError());
}
#endif

// One AdamW step over n parameters (one group: the caller passes weight_decay 0 for biases and
// LayerNorm parameters). params: the run's dtype. master: fp32 master weights, or NULL when
// params are their own master (fp32 runs, the CPU) -- then the update reads params. grads: fp32,
// multiplied by grad_scale first (loss-scale unscaling and clipping in one factor). m, v: fp32
// moments. step counts from 1 (bias correction).
static void adamw_update(const Device* d, void* params, float* master, const float* grads, float* m, float* v, size_t n,
                         float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale, int step) {
    if (step < 1) die("adamw_update: step %d, but steps count from 1", step);
    if (n == 0) return;
    AdamWStep h = {lr, beta1, beta2, eps, weight_decay, grad_scale, (float)(1.0 - pow(beta1, step)), (float)(1.0 - pow(beta2, step))};
#ifdef __CUDACC__
    if (d->is_gpu) { adamw_update_cuda(d, params, master, grads, m, v, n, h); return; }
#endif
    (void)d;
    adamw_update_cpu((float*)params, master, grads, m, v, n, h);
}
// <<< optimizer

// >>> checkpoint
// ----------------------------------------------------------------------------
// 5. checkpoint: safetensors checkpoints (Hugging Face's format); written under temporary names and renamed
//
// A safetensors file is an 8-byte little-endian header length, a JSON header
//   {"__metadata__": {"key": "value", ...},
//    "name": {"dtype": "F32", "shape": [3, 4], "data_offsets": [begin, end]}, ...}
// and then the tensors' bytes; offsets count from the end of the header. Reading maps
// the file and checks every offset once, so a bad file fails at open with one line.

#include <setjmp.h>
#include <signal.h>

#define ST_MAX_DIMS 8

typedef struct {
    char name[256];
    char dtype[8];  // "F32", "BF16", "F16", "I32", "I64", ...
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    size_t begin, end;  // byte range within the data region
} STTensor;

typedef struct {
    char path[1024];
    int n;
    STTensor* tensors;
    const uint8_t* data;  // start of the data region (inside the mapping)
    size_t data_size;
    void* map;
    size_t map_size;
    int n_meta;
    char** meta_keys;
    char** meta_values;
} SafeTensors;

// Bytes per element of a safetensors dtype; 0 for a name we don't know.
static size_t st_dtype_size(const char* dtype) {
    static const char* names[] = {"BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "I16", "U16", "F16",
                                  "BF16", "I32",  "U32", "F32", "I64", "U64", "F64"};
    static const size_t sizes[] = {1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 8, 8, 8};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        if (strcmp(dtype, names[i]) == 0) return sizes[i];
    return 0;
}

// The safetensors name of a run's storage type, to save parameters as they are.
static const char* st_dtype_of(DType dt) { return dt == DT_F32 ? "F32" : dt == DT_BF16 ? "BF16" : "F16"; }

static size_t st_numel(const STTensor* t) {
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

// "[3, 4]" for messages.
static const char* st_shape_str(const STTensor* t, char* buf, size_t cap) {
    size_t len = snprintf(buf, cap, "[");
    for (int i = 0; i < t->ndim && len < cap; i++)
        len += snprintf(buf + len, cap - len, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (len < cap) snprintf(buf + len, cap - len, "]");
    return buf;
}

// --- the header's JSON: a small parser for exactly this shape of document

typedef struct {
    const char* s;
    size_t n, i;
    const char* path;
    const char* kind;  // what the text is, for messages: "safetensors header JSON", "JSON"
    jmp_buf* recover;  // set (by st_json_try): a malformed text jumps here instead of exiting
    char error[192];   // then the message
    char* pending;     // and the string being read, which st_json_try frees
} StJson;

static void st_json_fail(StJson* j, const char* what) {
    if (!j->recover) die("%s: malformed %s at byte %zu: %s", j->path, j->kind, j->i, what);
    snprintf(j->error, sizeof(j->error), "malformed %s at byte %zu: %s", j->kind, j->i, what);
    longjmp(*j->recover, 1);
}

// Runs read(j, dest) and returns 0, or -1 with the message in j->error when the text is malformed:
// for text from the network, which must not end the process. dest owns what was read either way.
static int st_json_try(StJson* j, void (*read)(StJson*, void*), void* dest) {
    jmp_buf recover;
    if (setjmp(recover)) {
        free(j->pending);
        j->pending = NULL;
        j->recover = NULL;
        return -1;
    }
    j->recover = &recover;
    read(j, dest);
    j->recover = NULL;
    return 0;
}

static void st_json_ws(StJson* j) {
    while (j->i < j->n && (j->s[j->i] == ' ' || j->s[j->i] == '\t' || j->s[j->i] == '\n' || j->s[j->i] == '\r')) j->i++;
}

static int st_json_peek(StJson* j) {
    st_json_ws(j);
    return j->i < j->n ? (unsigned char)j->s[j->i] : -1;
}

static void st_json_expect(StJson* j, char c) {
    if (st_json_peek(j) != c) {
        char what[32];
        snprintf(what, sizeof(what), "expected '%c'", c);
        st_json_fail(j, what);
    }
    j->i++;
}

static unsigned st_json_hex4(StJson* j) {
    unsigned v = 0;
    for (int k = 0; k < 4; k++, j->i++) {
        char c = j->i < j->n ? j->s[j->i] : 0;
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) st_json_fail(j, "bad \\u escape");
        v = v * 16 + d;
    }
    return v;
}

// A JSON string, unescaped into a new NUL-terminated buffer (UTF-8).
static char* st_json_string(StJson* j) {
    st_json_expect(j, '"');
    size_t end = j->i;
    while (end < j->n && j->s[end] != '"') end += j->s[end] == '\\' ? 2 : 1;
    char* out = (char*)xmalloc(end - j->i + 1);  // unescaping never grows a string
    size_t len = 0;
    j->pending = out;
    for (;;) {
        if (j->i >= j->n) st_json_fail(j, "unterminated string");
        unsigned char c = j->s[j->i++];
        if (c == '"') break;
        if (c < 0x20) st_json_fail(j, "control character in string");
        if (c != '\\') { out[len++] = c; continue; }
        if (j->i >= j->n) st_json_fail(j, "unterminated string");
        char e = j->s[j->i++];
        const char* simple = strchr("\"\\/bfnrt", e);
        if (e && simple) { out[len++] = "\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"]; continue; }
        if (e != 'u') st_json_fail(j, "bad escape in string");
        unsigned cp = st_json_hex4(j);
        if (cp >= 0xD800 && cp < 0xDC00) {  // a surrogate pair spells one code point
            if (j->i + 2 > j->n || j->s[j->i] != '\\' || j->s[j->i + 1] != 'u') st_json_fail(j, "lone surrogate in string");
            j->i += 2;
            unsigned lo = st_json_hex4(j);
            if (lo < 0xDC00 || lo >= 0xE000) st_json_fail(j, "bad surrogate pair in string");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        if (cp < 0x80) out[len++] = cp;
        else if (cp < 0x800) { out[len++] = 0xC0 | (cp >> 6); out[len++] = 0x80 | (cp & 0x3F); }
        else if (cp < 0x10000) { out[len++] = 0xE0 | (cp >> 12); out[len++] = 0x80 | ((cp >> 6) & 0x3F); out[len++] = 0x80 | (cp & 0x3F); }
        else { out[len++] = 0xF0 | (cp >> 18); out[len++] = 0x80 | ((cp >> 12) & 0x3F); out[len++] = 0x80 | ((cp >> 6) & 0x3F); out[len++] = 0x80 | (cp & 0x3F); }
    }
    out[len] = 0;
    j->pending = NULL;
    return out;
}

// A string that must fit in cap bytes: tensor names, field names, dtypes.
static void st_json_short_string(StJson* j, char* buf, size_t cap, const char* what) {
    char* s = st_json_string(j);
    size_t len = strlen(s);
    snprintf(buf, cap, "%s", s);
    free(s);
    if (len >= cap) die("%s: %s longer than %zu bytes in the header: '%.64s...'", j->path, what, cap - 1, buf);
}

static uint64_t st_json_uint(StJson* j) {
    int c = st_json_peek(j);
    if (c < '0' || c > '9') st_json_fail(j, "expected a non-negative integer");
    uint64_t v = 0;
    while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9') {
        unsigned d = j->s[j->i++] - '0';
        if (v > (UINT64_MAX - d) / 10) st_json_fail(j, "integer too large");
        v = v * 10 + d;
    }
    if (j->i < j->n && (j->s[j->i] == '.' || j->s[j->i] == 'e' || j->s[j->i] == 'E')) st_json_fail(j, "expected an integer");
    return v;
}

// Reads "[a, b, ...]" into out (at most cap values); returns the count.
static int st_json_uint_array(StJson* j, uint64_t* out, int cap, const char* what) {
    st_json_expect(j, '[');
    int count = 0;
    if (st_json_peek(j) == ']') { j->i++; return 0; }
    for (;;) {
        uint64_t v = st_json_uint(j);
        if (count == cap) {
            char msg[96];
            snprintf(msg, sizeof(msg), "%s has more than %d entries", what, cap);
            st_json_fail(j, msg);
        }
        out[count++] = v;
        if (st_json_peek(j) == ']') { j->i++; return count; }
        st_json_expect(j, ',');
    }
}

// One tensor entry: {"dtype": ..., "shape": [...], "data_offsets": [b, e]} in any order.
static void st_json_tensor(StJson* j, STTensor* t) {
    int have_dtype = 0, have_shape = 0, have_offsets = 0;
    st_json_expect(j, '{');
    if (st_json_peek(j) != '}') for (;;) {
        char key[32];
        st_json_short_string(j, key, sizeof(key), "field name");
        st_json_expect(j, ':');
        if (strcmp(key, "dtype") == 0) {
            char dtype[32];
            st_json_short_string(j, dtype, sizeof(dtype), "dtype");
            if (!st_dtype_size(dtype)) die("%s: tensor '%s' has unknown dtype '%s'", j->path, t->name, dtype);
            snprintf(t->dtype, sizeof(t->dtype), "%.7s", dtype);  // known dtypes fit
            have_dtype = 1;
        } else if (strcmp(key, "shape") == 0) {
            uint64_t dims[ST_MAX_DIMS];
            t->ndim = st_json_uint_array(j, dims, ST_MAX_DIMS, "shape");
            for (int d = 0; d < t->ndim; d++) {
                if (dims[d] > ((uint64_t)1 << 48)) st_json_fail(j, "shape dimension too large");
                t->shape[d] = (int64_t)dims[d];
            }
            have_shape = 1;
        } else if (strcmp(key, "data_offsets") == 0) {
            uint64_t offsets[2];
            if (st_json_uint_array(j, offsets, 2, "data_offsets") != 2) st_json_fail(j, "data_offsets needs two entries");
            t->begin = offsets[0];
            t->end = offsets[1];
            have_offsets = 1;
        } else {
            die("%s: tensor '%s' has unknown header field '%s'", j->path, t->name, key);
        }
        if (st_json_peek(j) == '}') break;
        st_json_expect(j, ',');
    }
    j->i++;
    if (!have_dtype || !have_shape || !have_offsets)
        die("%s: tensor '%s' lacks %s in the header", j->path, t->name,
            !have_dtype ? "\"dtype\"" : !have_shape ? "\"shape\"" : "\"data_offsets\"");
}

static void st_json_metadata(StJson* j, SafeTensors* st) {
    if (st_json_peek(j) == 'n' && j->n - j->i >= 4 && memcmp(j->s + j->i, "null", 4) == 0) { j->i += 4; return; }
    st_json_expect(j, '{');
    if (st_json_peek(j) == '}') { j->i++; return; }
    for (;;) {
        char* key = st_json_string(j);
        st_json_expect(j, ':');
        if (st_json_peek(j) != '"') die("%s: metadata value of '%.64s' is not a string", j->path, key);
        st->meta_keys = (char**)realloc(st->meta_keys, (st->n_meta + 1) * sizeof(char*));
        st->meta_values = (char**)realloc(st->meta_values, (st->n_meta + 1) * sizeof(char*));
        if (!st->meta_keys || !st->meta_values) die("out of host memory reading %s", j->path);
        st->meta_keys[st->n_meta] = key;
        st->meta_values[st->n_meta] = st_json_string(j);
        st->n_meta++;
        if (st_json_peek(j) == '}') { j->i++; return; }
        st_json_expect(j, ',');
    }
}

static void st_parse_header(SafeTensors* st, const char* header, size_t n) {
    StJson j = {header, n, 0, st->path, "safetensors header JSON"};
    int cap = 0;
    st_json_expect(&j, '{');
    if (st_json_peek(&j) != '}') for (;;) {
        char key[256];
        st_json_short_string(&j, key, sizeof(key), "tensor name");
        st_json_expect(&j, ':');
        if (strcmp(key, "__metadata__") == 0) {
            st_json_metadata(&j, st);
        } else {
            if (st->n == cap) {
                cap = cap ? 2 * cap : 64;
                st->tensors = (STTensor*)realloc(st->tensors, cap * sizeof(STTensor));
                if (!st->tensors) die("out of host memory reading %s", st->path);
            }
            STTensor* t = &st->tensors[st->n++];
            memset(t, 0, sizeof(*t));
            snprintf(t->name, sizeof(t->name), "%s", key);
            st_json_tensor(&j, t);
        }
        if (st_json_peek(&j) == '}') break;
        st_json_expect(&j, ',');
    }
    j.i++;
    if (st_json_peek(&j) != -1) st_json_fail(&j, "text after the closing '}'");
}

// --- reading

static int st_by_begin(const void* a, const void* b) {
    const STTensor *x = *(const STTensor* const*)a, *y = *(const STTensor* const*)b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : (x->end > y->end) - (x->end < y->end);
}

// Every tensor's bytes lie inside the data region, match dtype x shape, and don't overlap.
static void st_check_offsets(const SafeTensors* st) {
    for (int i = 0; i < st->n; i++) {
        const STTensor* t = &st->tensors[i];
        char shape[128];
        size_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] && numel > SIZE_MAX / 16 / (size_t)t->shape[d]) die("%s: tensor '%s' shape %s is too large", st->path, t->name, st_shape_str(t, shape, sizeof(shape)));
            numel *= (size_t)t->shape[d];
        }
        if (t->begin > t->end || t->end > st->data_size)
            die("%s: tensor '%s' data_offsets [%zu, %zu] out of range (data region is %zu bytes; file truncated?)",
                st->path, t->name, t->begin, t->end, st->data_size);
        if (t->end - t->begin != numel * st_dtype_size(t->dtype))
            die("%s: tensor '%s' data_offsets [%zu, %zu] span %zu bytes but %s %s needs %zu",
                st->path, t->name, t->begin, t->end, t->end - t->begin, t->dtype, st_shape_str(t, shape, sizeof(shape)),
                numel * st_dtype_size(t->dtype));
        for (int k = 0; k < i; k++)
            if (strcmp(st->tensors[k].name, t->name) == 0) die("%s: tensor '%s' appears twice in the header", st->path, t->name);
    }
    const STTensor** order = (const STTensor**)xmalloc(st->n * sizeof(STTensor*));
    for (int i = 0; i < st->n; i++) order[i] = &st->tensors[i];
    qsort(order, st->n, sizeof(STTensor*), st_by_begin);
    for (int i = 1; i < st->n; i++)
        if (order[i]->begin < order[i - 1]->end)
            die("%s: tensors '%s' and '%s' overlap in the data region", st->path, order[i - 1]->name, order[i]->name);
    free(order);
}

static void safetensors_open(SafeTensors* st, const char* path) {
    memset(st, 0, sizeof(*st));
    if (strlen(path) >= sizeof(st->path)) die("safetensors path too long: %.64s...", path);
    snprintf(st->path, sizeof(st->path), "%s", path);
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open safetensors file %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) die("cannot stat %s: %s", path, strerror(errno));
    if (S_ISDIR(sb.st_mode)) die("%s is a directory, not a safetensors file", path);
    if (sb.st_size < 8) die("%s: not a safetensors file (%lld bytes, shorter than the 8-byte header length)", path, (long long)sb.st_size);
    st->map_size = (size_t)sb.st_size;
    st->map = mmap(NULL, st->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (st->map == MAP_FAILED) die("cannot mmap %s: %s", path, strerror(errno));
    const uint8_t* bytes = (const uint8_t*)st->map;
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--) header_len = (header_len << 8) | bytes[i];
    if (header_len > st->map_size - 8)
        die("%s: header length %llu runs past the end of the file (%zu bytes)", path, (unsigned long long)header_len, st->map_size);
    st_parse_header(st, (const char*)bytes + 8, header_len);
    st->data = bytes + 8 + header_len;
    st->data_size = st->map_size - 8 - header_len;
    st_check_offsets(st);
}

static const STTensor* safetensors_find(const SafeTensors* st, const char* name) {
    for (int i = 0; i < st->n; i++)
        if (strcmp(st->tensors[i].name, name) == 0) return &st->tensors[i];
    return NULL;
}

static const char* safetensors_meta(const SafeTensors* st, const char* key) {
    for (int i = 0; i < st->n_meta; i++)
        if (strcmp(st->meta_keys[i], key) == 0) return st->meta_values[i];
    return NULL;
}

static const STTensor* st_need(const SafeTensors* st, const char* name) {
    const STTensor* t = safetensors_find(st, name);
    if (!t) die("tensor '%s' not found in %s", name, st->path);
    return t;
}

// Copy a float tensor (F32, BF16 or F16) of exactly n elements into dst as fp32.
static void safetensors_read_floats(const SafeTensors* st, const char* name, float* dst, size_t n) {
    const STTensor* t = st_need(st, name);
    char shape[128];
    if (st_numel(t) != n)
        die("tensor '%s' in %s has shape %s (%zu elements), expected %zu elements", name, st->path,
            st_shape_str(t, shape, sizeof(shape)), st_numel(t), n);
    const uint8_t* src = st->data + t->begin;
    if (strcmp(t->dtype, "F32") == 0) { memcpy(dst, src, n * 4); return; }
    int is_bf16 = strcmp(t->dtype, "BF16") == 0;
    if (!is_bf16 && strcmp(t->dtype, "F16") != 0) die("tensor '%s' in %s has dtype %s, expected F32, BF16 or F16", name, st->path, t->dtype);
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);  // the data region need not be aligned
        dst[i] = is_bf16 ? bf16_to_float(h) : f16_to_float(h);
    }
}

// Copy a tensor's exact bytes, whatever its dtype.
static void safetensors_read_raw(const SafeTensors* st, const char* name, void* dst, size_t nbytes) {
    const STTensor* t = st_need(st, name);
    char shape[128];
    if (t->end - t->begin != nbytes)
        die("tensor '%s' in %s is %s %s (%zu bytes), expected %zu bytes", name, st->path, t->dtype,
            st_shape_str(t, shape, sizeof(shape)), t->end - t->begin, nbytes);
    if (nbytes) memcpy(dst, st->data + t->begin, nbytes);
}

static void safetensors_close(SafeTensors* st) {
    for (int i = 0; i < st->n_meta; i++) { free(st->meta_keys[i]); free(st->meta_values[i]); }
    free(st->meta_keys);
    free(st->meta_values);
    free(st->tensors);
    if (st->map) munmap(st->map, st->map_size);
    memset(st, 0, sizeof(*st));
}

// --- writing: every file goes to path.tmp-<pid>, is fsynced, then renamed over path, so a
// crash or a full disk leaves either the old file or the new one, never half of one.

typedef struct {
    int fd;
    char path[1024];
    char tmp[1100];
} AtomicFile;

// Makes a rename of `path` durable: fsyncs the directory holding it (best effort; some
// filesystems refuse).
static void sync_parent_dir(const char* path) {
    char dir[1100];
    snprintf(dir, sizeof(dir), "%s", path);
    char* slash = strrchr(dir, '/');
    if (slash) *(slash == dir ? slash + 1 : slash) = 0;
    else snprintf(dir, sizeof(dir), ".");
    int dfd = open(dir, O_RDONLY);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
}

static void atomic_file_fail(AtomicFile* f, const char* what) {
    int err = errno;
    if (f->fd >= 0) close(f->fd);
    unlink(f->tmp);
    die("cannot %s %s: %s", what, f->path, strerror(err));
}

static void atomic_file_open(AtomicFile* f, const char* path) {
    if (strlen(path) >= sizeof(f->path)) die("path too long: %.64s...", path);
    snprintf(f->path, sizeof(f->path), "%s", path);
    snprintf(f->tmp, sizeof(f->tmp), "%s.tmp-%d", path, (int)getpid());
    f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (f->fd < 0) die("cannot write %s: %s (creating %s)", path, strerror(errno), f->tmp);
}

static void atomic_file_write(AtomicFile* f, const void* data, size_t n) {
    const char* p = (const char*)data;
    while (n > 0) {
        ssize_t w = write(f->fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            if (w == 0) errno = EIO;
            atomic_file_fail(f, "write");
        }
        p += w;
        n -= (size_t)w;
    }
}

// Tests simulate a crash in the middle of a checkpoint save: with MEGATRON_TEST_CRASH_AT_FILE=k
// in the environment the process kills itself (SIGKILL) before renaming its k-th file.
static void atomic_file_test_crash(void) {
    static int files = 0;
    const char* k = getenv("MEGATRON_TEST_CRASH_AT_FILE");
    if (k && ++files == atoi(k)) raise(SIGKILL);
}

static void atomic_file_commit(AtomicFile* f) {
    atomic_file_test_crash();
    if (fsync(f->fd) != 0) atomic_file_fail(f, "fsync");
    int rc = close(f->fd);
    f->fd = -1;
    if (rc != 0) atomic_file_fail(f, "close");
    if (rename(f->tmp, f->path) != 0) atomic_file_fail(f, "rename into place");
    sync_parent_dir(f->path);
}

static void write_file_atomic(const char* path, const void* data, size_t n) {
    AtomicFile f;
    atomic_file_open(&f, path);
    atomic_file_write(&f, data, n);
    atomic_file_commit(&f);
}

// Removes a file or a directory tree (a replaced or abandoned checkpoint directory). Failures are
// warnings: the checkpoint in force is complete elsewhere.
static int remove_tree_entry(const char* path, const struct stat* sb, int flag, struct FTW* ftw) {
    (void)sb;
    (void)ftw;
    if ((flag == FTW_DP ? rmdir(path) : unlink(path)) != 0) fprintf(stderr, "warning: cannot remove %s: %s\n", path, strerror(errno));
    return 0;
}

static void remove_tree(const char* path) { nftw(path, remove_tree_entry, 16, FTW_DEPTH | FTW_PHYS); }

// ".tmp-<host>-<pid>": this process's name for what it stages beside a checkpoint.
static void staging_suffix(char* out, size_t cap) {
    char host[128] = "host";
    gethostname(host, sizeof(host) - 1);
    host[sizeof(host) - 1] = 0;
    for (char* c = host; *c; c++)
        if (*c == '/' || *c == '-') *c = '_';
    snprintf(out, cap, ".tmp-%s-%d", host, (int)getpid());
}

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

// Swaps two directories in one step (Linux renameat2); -1 with errno where the filesystem cannot
// (tests ask for that case with MEGATRON_TEST_NO_EXCHANGE=1).
static int exchange_dirs(const char* a, const char* b) {
    if (getenv("MEGATRON_TEST_NO_EXCHANGE")) {
        errno = EINVAL;
        return -1;
    }
#ifdef SYS_renameat2
    return (int)syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE);
#else
    (void)a;
    (void)b;
    errno = ENOSYS;
    return -1;
#endif
}

// Puts the finished directory `staged` at `path`: a rename, or where `path` exists (an iteration
// saved again) an atomic exchange, after which the old files go. A crash at any point leaves at
// `path` the old directory or the new one, each whole. Where the filesystem has no exchange (NFS,
// FUSE), the old directory is first renamed aside, which is safe only while the tracker names
// another iteration (`tracked` = 0); otherwise the run stops, its new checkpoint kept aside.
static void publish_dir(const char* staged, const char* path, int tracked) {
    atomic_file_test_crash();
    if (rename(staged, path) != 0) {
        if (errno != EEXIST && errno != ENOTEMPTY) die("cannot rename %s to %s: %s", staged, path, strerror(errno));
        char aside[1400];
        snprintf(aside, sizeof(aside), "%s.old", staged);
        if (exchange_dirs(staged, path) == 0) {
            remove_tree(staged);  // (now the old directory)
        } else if (errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP) {
            die("cannot replace %s: %s (the new checkpoint is complete in %s)", path, strerror(errno), staged);
        } else if (tracked) {
            snprintf(aside, sizeof(aside), "%s.unsaved", path);
            if (rename(staged, aside) != 0) die("cannot rename %s: %s", staged, strerror(errno));
            die("%s is the checkpoint in force and this filesystem cannot replace a directory in one step: the new one is in %s", path, aside);
        } else {
            if (rename(path, aside) != 0 || rename(staged, path) != 0) die("cannot replace %s: %s (the new checkpoint is in %s)", path, strerror(errno), staged);
            remove_tree(aside);
        }
    }
    sync_parent_dir(path);
}

// (Megatron's tracker file, see the checkpoint directory below)
#define CHECKPOINT_TRACKER "latest_checkpointed_iteration.txt"

// The pid in `name` when it is one of the temporaries a save leaves if killed: a staged iteration
// directory of this host (iter_<n>.tmp-<host>-<pid>, with ".old" while it is set aside) or the
// tracker's temporary (see write_file_atomic); 0 otherwise.
static long stale_temporary_pid(const char* name) {
    char suffix[200];
    staging_suffix(suffix, sizeof(suffix));
    *strrchr(suffix, '-') = 0;  // ".tmp-<host>"
    const char* p;
    if (!strncmp(name, "iter_", 5)) {
        for (p = name + 5; *p >= '0' && *p <= '9'; p++) {}
        if (p == name + 5 || strncmp(p, suffix, strlen(suffix)) || p[strlen(suffix)] != '-') return 0;
        p += strlen(suffix) + 1;
    } else if (!strncmp(name, CHECKPOINT_TRACKER ".tmp-", strlen(CHECKPOINT_TRACKER ".tmp-"))) {
        p = name + strlen(CHECKPOINT_TRACKER ".tmp-");
    } else {
        return 0;
    }
    char* end;
    long pid = strtol(p, &end, 10);
    return end != p && (*end == 0 || !strcmp(end, ".old")) && pid > 0 ? pid : 0;
}

// Removes what savers killed on this host left in `dir` (their process gone).
static void remove_stale_temporaries(const char* dir) {
    DIR* d = opendir(dir);
    if (!d) return;
    char path[1400];
    for (struct dirent* e; (e = readdir(d)) != NULL;) {
        long pid = stale_temporary_pid(e->d_name);
        if (!pid || pid == (long)getpid() || kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        remove_tree(path);
    }
    closedir(d);
}

// mkdir -p: creates path and its missing parents.
static void make_dirs(const char* path) {
    char buf[1024];
    if (!*path) die("make_dirs: empty directory path");
    if (strlen(path) >= sizeof(buf)) die("directory path too long: %.64s...", path);
    snprintf(buf, sizeof(buf), "%s", path);
    for (char* p = buf + 1;; p++) {
        if (*p != '/' && *p != 0) continue;
        char saved = *p;
        *p = 0;
        struct stat sb;
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("cannot create directory %s: %s", buf, strerror(errno));
        if (stat(buf, &sb) != 0 || !S_ISDIR(sb.st_mode)) die("cannot create directory %s: a file of that name exists", buf);
        *p = saved;
        if (!saved) break;
    }
}

// Collects tensors and metadata, then writes the file in one go at finish. Tensor data
// is COPIED by st_writer_add, so the caller may reuse its buffer at once.
typedef struct {
    char path[1024];
    int n, cap;
    STTensor* tensors;  // begin/end are the offsets the file will have
    uint8_t** data;
    size_t data_size;
    int n_meta;
    char** meta_keys;
    char** meta_values;
} SafeTensorsWriter;

static void st_writer_begin(SafeTensorsWriter* w, const char* path) {
    memset(w, 0, sizeof(*w));
    if (strlen(path) >= sizeof(w->path)) die("safetensors path too long: %.64s...", path);
    snprintf(w->path, sizeof(w->path), "%s", path);
}

static void st_writer_add(SafeTensorsWriter* w, const char* name, const char* dtype, int ndim, const int64_t* shape, const void* data) {
    if (strlen(name) >= sizeof(w->tensors[0].name)) die("%s: tensor name longer than 255 bytes: %.64s...", w->path, name);
    if (!st_dtype_size(dtype)) die("%s: tensor '%s' has unknown dtype '%s'", w->path, name, dtype);
    if (ndim < 0 || ndim > ST_MAX_DIMS) die("%s: tensor '%s' has %d dimensions (at most %d)", w->path, name, ndim, ST_MAX_DIMS);
    for (int i = 0; i < w->n; i++)
        if (strcmp(w->tensors[i].name, name) == 0) die("%s: tensor '%s' added twice", w->path, name);
    if (w->n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 64;
        w->tensors = (STTensor*)realloc(w->tensors, w->cap * sizeof(STTensor));
        w->data = (uint8_t**)realloc(w->data, w->cap * sizeof(uint8_t*));
        if (!w->tensors || !w->data) die("out of host memory writing %s", w->path);
    }
    STTensor* t = &w->tensors[w->n];
    memset(t, 0, sizeof(*t));
    snprintf(t->name, sizeof(t->name), "%s", name);
    snprintf(t->dtype, sizeof(t->dtype), "%s", dtype);
    t->ndim = ndim;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) die("%s: tensor '%s' has negative dimension %lld", w->path, name, (long long)shape[d]);
        t->shape[d] = shape[d];
    }
    size_t nbytes = st_numel(t) * st_dtype_size(dtype);
    t->begin = w->data_size;
    t->end = w->data_size + nbytes;
    w->data_size = t->end;
    w->data[w->n] = (uint8_t*)xmalloc(nbytes);
    if (nbytes) memcpy(w->data[w->n], data, nbytes);
    w->n++;
}

static void st_writer_meta(SafeTensorsWriter* w, const char* key, const char* value) {
    w->meta_keys = (char**)realloc(w->meta_keys, (w->n_meta + 1) * sizeof(char*));
    w->meta_values = (char**)realloc(w->meta_values, (w->n_meta + 1) * sizeof(char*));
    if (!w->meta_keys || !w->meta_values) die("out of host memory writing %s", w->path);
    w->meta_keys[w->n_meta] = strdup(key);
    w->meta_values[w->n_meta] = strdup(value);
    if (!w->meta_keys[w->n_meta] || !w->meta_values[w->n_meta]) die("out of host memory writing %s", w->path);
    w->n_meta++;
}

// A growing text buffer for JSON: the header here, the REST server's answers.
typedef struct {
    char* s;
    size_t len, cap;
} StText;

static void st_text_put(StText* b, const char* s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = 2 * (b->len + n + 1);
        b->s = (char*)realloc(b->s, b->cap);
        if (!b->s) die("out of host memory building a JSON text");
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = 0;
}

static void st_text_printf(StText* b, const char* fmt, ...) {
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    st_text_put(b, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

static void st_text_json_string(StText* b, const char* s) {
    st_text_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = *s;
        if (c == '"' || c == '\\') { char e[2] = {'\\', (char)c}; st_text_put(b, e, 2); }
        else if (c < 0x20) st_text_printf(b, "\\u%04x", c);
        else st_text_put(b, s, 1);
    }
    st_text_put(b, "\"", 1);
}

static void st_writer_free(SafeTensorsWriter* w) {
    for (int i = 0; i < w->n; i++) free(w->data[i]);
    for (int i = 0; i < w->n_meta; i++) { free(w->meta_keys[i]); free(w->meta_values[i]); }
    free(w->tensors);
    free(w->data);
    free(w->meta_keys);
    free(w->meta_values);
    memset(w, 0, sizeof(*w));
}

// Writes the file (atomically, see above) and frees the writer.
static void st_writer_finish(SafeTensorsWriter* w) {
    StText h = {NULL, 0, 0};
    st_text_put(&h, "{", 1);
    if (w->n_meta) {
        st_text_put(&h, "\"__metadata__\":{", 16);
        for (int i = 0; i < w->n_meta; i++) {
            if (i) st_text_put(&h, ",", 1);
            st_text_json_string(&h, w->meta_keys[i]);
            st_text_put(&h, ":", 1);
            st_text_json_string(&h, w->meta_values[i]);
        }
        st_text_put(&h, "}", 1);
    }
    for (int i = 0; i < w->n; i++) {
        const STTensor* t = &w->tensors[i];
        if (i || w->n_meta) st_text_put(&h, ",", 1);
        st_text_json_string(&h, t->name);
        st_text_printf(&h, ":{\"dtype\":\"%s\",\"shape\":[", t->dtype);
        for (int d = 0; d < t->ndim; d++) st_text_printf(&h, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        st_text_printf(&h, "],\"data_offsets\":[%zu,%zu]}", t->begin, t->end);
    }
    st_text_put(&h, "}", 1);
    while ((8 + h.len) % 8) st_text_put(&h, " ", 1);  // the data starts 8-byte aligned
    uint8_t len_le[8];
    for (int i = 0; i < 8; i++) len_le[i] = (uint8_t)((uint64_t)h.len >> (8 * i));
    AtomicFile f;
    atomic_file_open(&f, w->path);
    atomic_file_write(&f, len_le, 8);
    atomic_file_write(&f, h.s, h.len);
    for (int i = 0; i < w->n; i++) atomic_file_write(&f, w->data[i], w->tensors[i].end - w->tensors[i].begin);
    atomic_file_commit(&f);
    free(h.s);
    st_writer_free(w);
}

// --- a small JSON reader for config files (Hugging Face's config.json): the top-level
// keys of an object with the raw text of each value (12, "gpt2", null, [...], {...}).

typedef struct {
    int n;
    char** keys;
    char** values;
} JsonObject;

static int st_json_digits(StJson* j) {
    size_t start = j->i;
    while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9') j->i++;
    return j->i > start;
}

// A number as JSON spells it: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
static void st_json_number(StJson* j) {
    if (st_json_peek(j) == '-') j->i++;
    if (j->i >= j->n || j->s[j->i] < '0' || j->s[j->i] > '9') st_json_fail(j, "expected a value");
    if (j->s[j->i] == '0') j->i++;
    else st_json_digits(j);
    if (j->i < j->n && j->s[j->i] == '.') {
        j->i++;
        if (!st_json_digits(j)) st_json_fail(j, "expected digits after '.'");
    }
    if (j->i < j->n && (j->s[j->i] == 'e' || j->s[j->i] == 'E')) {
        j->i++;
        if (j->i < j->n && (j->s[j->i] == '+' || j->s[j->i] == '-')) j->i++;
        if (!st_json_digits(j)) st_json_fail(j, "expected digits in the exponent");
    }
}

static void st_json_skip_value(StJson* j, int depth) {
    if (depth > 64) st_json_fail(j, "nested too deeply");
    int c = st_json_peek(j);
    if (c == '"') { free(st_json_string(j)); return; }
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        j->i++;
        if (st_json_peek(j) == close) { j->i++; return; }
        for (;;) {
            if (c == '{') { free(st_json_string(j)); st_json_expect(j, ':'); }
            st_json_skip_value(j, depth + 1);
            if (st_json_peek(j) == close) { j->i++; return; }
            st_json_expect(j, ',');
        }
    }
    const char* literals[] = {"true", "false", "null"};
    for (int k = 0; k < 3; k++) {
        size_t len = strlen(literals[k]);
        if (j->n - j->i >= len && memcmp(j->s + j->i, literals[k], len) == 0) { j->i += len; return; }
    }
    st_json_number(j);
}

// Reads j's text, one object, into the JsonObject dest, which owns each key as soon as it is read.
static void json_object_fill(StJson* j, void* dest) {
    JsonObject* o = (JsonObject*)dest;
    st_json_expect(j, '{');
    if (st_json_peek(j) != '}') for (;;) {
        o->keys = (char**)realloc(o->keys, (o->n + 1) * sizeof(char*));
        o->values = (char**)realloc(o->values, (o->n + 1) * sizeof(char*));
        if (!o->keys || !o->values) die("out of host memory reading %s", j->path);
        o->values[o->n] = NULL;
        o->keys[o->n++] = st_json_string(j);
        st_json_expect(j, ':');
        st_json_ws(j);
        size_t start = j->i;
        st_json_skip_value(j, 0);
        o->values[o->n - 1] = (char*)xmalloc(j->i - start + 1);
        memcpy(o->values[o->n - 1], j->s + start, j->i - start);
        o->values[o->n - 1][j->i - start] = 0;
        if (st_json_peek(j) == '}') break;
        st_json_expect(j, ',');
    }
    j->i++;
    if (st_json_peek(j) != -1) st_json_fail(j, "text after the closing '}'");
}

static void json_object_read(JsonObject* o, const char* path) {
    memset(o, 0, sizeof(*o));
    FILE* f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    size_t cap = 1 << 20, n = 0;
    char* text = (char*)xmalloc(cap);
    n = fread(text, 1, cap, f);
    int too_big = n == cap;
    fclose(f);
    if (too_big) die("%s: larger than %zu bytes, not a config file", path, cap);
    StJson j = {text, n, 0, path, "JSON"};
    json_object_fill(&j, o);
    free(text);
}

// The raw text of a key's value, or NULL when the key is absent.
static const char* json_object_get(const JsonObject* o, const char* key) {
    for (int i = 0; i < o->n; i++)
        if (strcmp(o->keys[i], key) == 0) return o->values[i];
    return NULL;
}

// An integer value; `fallback` when the key is absent or null.
static int64_t json_object_int(const JsonObject* o, const char* key, int64_t fallback, const char* path) {
    const char* v = json_object_get(o, key);
    int64_t x;
    if (!v || strcmp(v, "null") == 0) return fallback;
    if (!parse_int64(v, &x)) die("%s: \"%s\" is %.40s, expected an integer", path, key, v);
    return x;
}

static void json_object_free(JsonObject* o) {
    for (int i = 0; i < o->n; i++) { free(o->keys[i]); free(o->values[i]); }
    free(o->keys);
    free(o->values);
    memset(o, 0, sizeof(*o));
}

// --- metadata values are strings: integers and doubles written so they read back exactly

static void st_writer_meta_int(SafeTensorsWriter* w, const char* key, int64_t value) {
    char text[32];
    snprintf(text, sizeof(text), "%lld", (long long)value);
    st_writer_meta(w, key, text);
}

static void st_writer_meta_double(SafeTensorsWriter* w, const char* key, double value) {
    char text[40];
    snprintf(text, sizeof(text), "%.17g", value);
    st_writer_meta(w, key, text);
}

static const char* safetensors_meta_need(const SafeTensors* st, const char* key) {
    const char* v = safetensors_meta(st, key);
    if (!v) die("%s: metadata \"%s\" is missing (not a checkpoint of this program?)", st->path, key);
    return v;
}

static int64_t safetensors_meta_int(const SafeTensors* st, const char* key) {
    const char* v = safetensors_meta_need(st, key);
    int64_t x;
    if (!parse_int64(v, &x)) die("%s: metadata \"%s\" is '%.40s', expected an integer", st->path, key, v);
    return x;
}

static double safetensors_meta_double(const SafeTensors* st, const char* key) {
    const char* v = safetensors_meta_need(st, key);
    char* end;
    double x = strtod(v, &end);
    if (end == v || *end) die("%s: metadata \"%s\" is '%.40s', expected a number", st->path, key, v);
    return x;
}

// Every flag's value as metadata "--flag": "value" (lists space-separated; unset strings left out).
static void args_write_meta(SafeTensorsWriter* w, const ArgSpec* specs, int n) {
    for (int i = 0; i < n; i++) {
        const ArgSpec* s = &specs[i];
        char text[64];
        switch (s->kind) {
            case ARG_INT: case ARG_FLAG: snprintf(text, sizeof(text), "%d", *(const int*)s->dest); break;
            case ARG_INT64: snprintf(text, sizeof(text), "%lld", (long long)*(const int64_t*)s->dest); break;
            case ARG_FLOAT: snprintf(text, sizeof(text), "%.17g", *(const double*)s->dest); break;
            case ARG_STRING:
                if (*(const char* const*)s->dest) st_writer_meta(w, s->name, *(const char* const*)s->dest);
                continue;
            case ARG_LIST: {
                const ArgList* list = (const ArgList*)s->dest;
                if (!list->n) continue;
                StText joined = {NULL, 0, 0};
                for (int k = 0; k < list->n; k++) {
                    if (k) st_text_put(&joined, " ", 1);
                    st_text_put(&joined, list->values[k], strlen(list->values[k]));
                }
                st_writer_meta(w, s->name, joined.s);
                free(joined.s);
                continue;
            }
        }
        st_writer_meta(w, s->name, text);
    }
}

// --- Megatron's checkpoint directory (checkpointing.py): DIR/iter_0000100/ holds the
// checkpoint of iteration 100 and DIR/latest_checkpointed_iteration.txt names the newest
// complete one. The tracker is written last, so a save that dies midway leaves the
// previous checkpoint in force.

typedef struct {
    const char *save, *load, *export_hf;
    int save_interval, exit_interval, finetune, no_load_optim, no_load_rng;
    int override_scheduler, use_checkpoint_scheduler;  // a resumed run's learning-rate schedule: this run's or the checkpoint's
} CheckpointArgs;

// Registers the checkpoint flags (Megatron's names) and sets their defaults; returns the count.
static int checkpoint_args_table(CheckpointArgs* c, ArgSpec* t) {
    memset(c, 0, sizeof(*c));
    int n = 0;
    t[n++] = ArgSpec{"--save", ARG_STRING, &c->save, "directory to save checkpoints to"};
    t[n++] = ArgSpec{"--save-interval", ARG_INT, &c->save_interval, "iterations between checkpoints (needed with --save; also saved at the end)"};
    t[n++] = ArgSpec{"--load", ARG_STRING, &c->load, "resume from this checkpoint directory, or a Hugging Face GPT-2 directory"};
    t[n++] = ArgSpec{"--finetune", ARG_FLAG, &c->finetune, "load the weights only: iteration 0, fresh optimizer and data position"};
    t[n++] = ArgSpec{"--no-load-optim", ARG_FLAG, &c->no_load_optim, "don't load the optimizer and learning-rate schedule state"};
    t[n++] = ArgSpec{"--no-load-rng", ARG_FLAG, &c->no_load_rng, "accepted for Megatron's scripts: the only random state is --seed"};
    t[n++] = ArgSpec{"--exit-interval", ARG_INT, &c->exit_interval, "save and exit at the first iteration that is a multiple of this"};
    t[n++] = ArgSpec{"--export-hf", ARG_STRING, &c->export_hf, "write the --load checkpoint to DIR as Hugging Face GPT-2, then exit"};
    t[n++] = ArgSpec{"--override-opt-param-scheduler", ARG_FLAG, &c->override_scheduler,
                     "resuming: take this run's learning-rate schedule where it differs from the checkpoint's"};
    t[n++] = ArgSpec{"--override-opt_param-scheduler", ARG_FLAG, &c->override_scheduler, "Megatron's spelling of the above"};
    t[n++] = ArgSpec{"--use-checkpoint-opt-param-scheduler", ARG_FLAG, &c->use_checkpoint_scheduler,
                     "resuming: keep the checkpoint's learning-rate schedule whatever this run's flags say"};
    t[n++] = ArgSpec{"--use-checkpoint-opt_param-scheduler", ARG_FLAG, &c->use_checkpoint_scheduler, "Megatron's spelling of the above"};
    return n;
}

static void checkpoint_args_validate(const CheckpointArgs* c) {
    if (c->save && c->save_interval <= 0) arg_error("--save needs --save-interval (a positive number of iterations)");
    if (!c->save && c->save_interval) arg_error("--save-interval needs --save");
    if (c->exit_interval < 0) arg_error("--exit-interval must be positive");
    if (c->export_hf && !c->load) arg_error("--export-hf needs --load (the checkpoint to export)");
    if ((c->finetune || c->no_load_optim) && !c->load) arg_error("--finetune and --no-load-optim need --load");
    if (c->override_scheduler && c->use_checkpoint_scheduler)
        arg_error("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are exclusive");
}

static void checkpoint_iter_dir(char* out, size_t cap, const char* dir, int64_t iteration) {
    if ((size_t)snprintf(out, cap, "%s/iter_%07lld", dir, (long long)iteration) >= cap) die("checkpoint path too long: %.64s...", dir);
}

// The iteration the tracker names, or -1 when the directory has no tracker.
static int64_t checkpoint_latest(const char* dir) {
    char path[1100], text[64];
    snprintf(path, sizeof(path), "%s/" CHECKPOINT_TRACKER, dir);
    FILE* f = fopen(path, "rb");
    if (!f) {
        if (errno == ENOENT || errno == ENOTDIR) return -1;
        die("cannot read %s: %s", path, strerror(errno));
    }
    size_t n = fread(text, 1, sizeof(text) - 1, f);
    fclose(f);
    text[n] = 0;
    while (n && (text[n - 1] == '\n' || text[n - 1] == ' ' || text[n - 1] == '\r')) text[--n] = 0;
    int64_t iteration;
    if (!parse_int64(text, &iteration) || iteration < 0) die("%s: expected an iteration number, found '%.20s'", path, text);
    return iteration;
}

static void checkpoint_set_latest(const char* dir, int64_t iteration) {
    char path[1100], text[32];
    snprintf(path, sizeof(path), "%s/" CHECKPOINT_TRACKER, dir);
    int n = snprintf(text, sizeof(text), "%lld", (long long)iteration);
    write_file_atomic(path, text, n);
}
// <<< checkpoint

// >>> training
// ----------------------------------------------------------------------------
// 6. training support: the learning-rate schedule, batch ramp-up, fp16 loss scaling,
// FLOPs and the log line, as Megatron-LM's training.py / optimizer_param_scheduler.py.

// Megatron's OptimizerParamScheduler, counted in samples: iteration flags are
// converted by x global batch. The update after `samples` consumed samples uses
// lr_at(samples); the first update of a warmup therefore runs at lr 0.
typedef struct {
    double max_lr, min_lr;
    int64_t warmup_samples, decay_samples;
    const char* style;
} LRSchedule;

static LRSchedule lr_schedule_from_args(const Args* a, int64_t train_samples) {
    LRSchedule s;
    s.max_lr = a->lr;
    s.min_lr = a->min_lr;
    s.style = a->lr_decay_style;
    int64_t gbs = a->global_batch_size;
    s.decay_samples = a->lr_decay_samples ? a->lr_decay_samples : a->lr_decay_iters ? a->lr_decay_iters * gbs : train_samples;
    if (a->lr_warmup_fraction > 0) s.warmup_samples = (int64_t)(a->lr_warmup_fraction * s.decay_samples);
    else s.warmup_samples = a->lr_warmup_samples ? a->lr_warmup_samples : a->lr_warmup_iters * gbs;
    // (Megatron's OptimizerParamScheduler asserts both)
    if (s.decay_samples <= 0) arg_error("the learning-rate decay covers no samples (--lr-decay-iters/--lr-decay-samples)");
    if (s.warmup_samples >= s.decay_samples)
        arg_error("the warmup (%lld samples) must end before the decay does (%lld samples): see --lr-warmup-* and --lr-decay-*, "
                  "whose default is the whole run", (long long)s.warmup_samples, (long long)s.decay_samples);
    return s;
}

// A resumed run's schedule against the one its checkpoint was trained with, as Megatron's
// OptimizerParamScheduler.load_state_dict: they must agree unless a flag says which one wins.
// Returns the schedule to train with.
static LRSchedule lr_schedule_resume(const LRSchedule* mine, const LRSchedule* saved, const CheckpointArgs* ca) {
    const char* differs = mine->max_lr != saved->max_lr ? "peak learning rate (--lr)"
                          : mine->min_lr != saved->min_lr ? "--min-lr"
                          : mine->warmup_samples != saved->warmup_samples ? "warmup samples (--lr-warmup-*)"
                          : mine->decay_samples != saved->decay_samples ? "decay samples (--lr-decay-*, by default the whole run: --train-iters/--train-samples)"
                          : strcmp(mine->style, saved->style) ? "--lr-decay-style" : NULL;
    if (!differs || ca->override_scheduler) return *mine;
    if (ca->use_checkpoint_scheduler) return *saved;
    arg_error("--load %s: this run's learning-rate schedule differs from the checkpoint's in its %s; give --override-opt-param-scheduler "
              "to take this run's or --use-checkpoint-opt-param-scheduler to keep the checkpoint's", ca->load, differs);
    return *mine;
}

static double lr_at(const LRSchedule* s, int64_t samples) {
    if (s->warmup_samples > 0 && samples <= s->warmup_samples)
        return s->max_lr * (double)samples / (double)s->warmup_samples;
    if (!strcmp(s->style, "constant")) return s->max_lr;
    if (!strcmp(s->style, "inverse-square-root")) {
        int64_t warmup = s->warmup_samples > 1 ? s->warmup_samples : 1, step = samples > 1 ? samples : 1;
        double lr = s->max_lr * sqrt((double)warmup) / sqrt((double)step);
        return lr > s->min_lr ? lr : s->min_lr;
    }
    if (samples > s->decay_samples) return s->min_lr;
    double ratio = (double)(samples - s->warmup_samples) / (double)(s->decay_samples - s->warmup_samples);
    double coeff = !strcmp(s->style, "linear") ? 1.0 - ratio : 0.5 * (cos(M_PI * ratio) + 1.0);
    return s->min_lr + coeff * (s->max_lr - s->min_lr);
}

// --rampup-batch-size START INCR SAMPLES: the global batch grows by INCR every
// SAMPLES / ((global - START) / INCR) consumed samples (Megatron's num_microbatches_calculator).
static int global_batch_at(const Args* a, int64_t consumed) {
    if (a->rampup_batch_size.n != 3) return a->global_batch_size;
    int start = atoi(a->rampup_batch_size.values[0]), incr = atoi(a->rampup_batch_size.values[1]);
    int64_t ramp_samples = atoll(a->rampup_batch_size.values[2]);
    int steps = (a->global_batch_size - start) / incr;
    if (consumed >= ramp_samples || steps <= 0) return a->global_batch_size;
    double samples_per_step = (double)ramp_samples / steps;
    int gbs = start + (int)((double)consumed / samples_per_step) * incr;
    return gbs < a->global_batch_size ? gbs : a->global_batch_size;
}

// The iterations that consume `samples`: the ramp's growing batches, then whole global batches.
// Each batch the ramp reaches must be whole micro-batches x data-parallel ranks (Megatron's
// consistency check; one ramp step may skip past a size); more than 2^31 iterations is an error.
static int64_t train_iterations_for_samples(const Args* a, int64_t samples) {
    int64_t unit = (int64_t)a->micro_batch_size * a->data_parallel_size, consumed = 0, iterations = 0;
    for (int g; consumed < samples && (g = global_batch_at(a, consumed)) < a->global_batch_size && iterations <= INT32_MAX; iterations++) {
        if (g % unit)
            arg_error("--rampup-batch-size: the ramp reaches a global batch of %d, not a multiple of --micro-batch-size %d x data-parallel size %d",
                      g, a->micro_batch_size, a->data_parallel_size);
        consumed += g;
    }
    if (consumed < samples) iterations += (samples - consumed - 1) / a->global_batch_size + 1;
    if (iterations > INT32_MAX) arg_error("--train-samples %lld: more than 2^31 iterations", (long long)samples);
    return iterations;
}

// Megatron's DynamicGradScaler (optimizer/grad_scaler.py). A constant scale never moves.
typedef struct {
    double scale, min_scale;
    int window, hysteresis, growth_tracker, hysteresis_tracker, dynamic;
} LossScaler;

// fp16: whether the run really computes in fp16 (the CPU path ignores --fp16).
static LossScaler loss_scaler_from_args(const Args* a, int fp16) {
    LossScaler s;
    memset(&s, 0, sizeof(s));
    s.dynamic = fp16 && a->loss_scale == 0;
    s.scale = !fp16 ? 1.0 : a->loss_scale > 0 ? a->loss_scale : a->initial_loss_scale;
    s.min_scale = a->min_loss_scale;
    s.window = a->loss_scale_window;
    s.hysteresis = s.hysteresis_tracker = a->hysteresis;
    return s;
}

static void loss_scaler_update(LossScaler* s, int found_inf) {
    if (!s->dynamic) return;
    if (found_inf) {
        s->growth_tracker = 0;
        s->hysteresis_tracker--;
        if (s->hysteresis_tracker <= 0) s->scale = fmax(s->scale * 0.5, s->min_scale);
    } else if (++s->growth_tracker == s->window) {
        s->growth_tracker = 0;
        s->hysteresis_tracker = s->hysteresis;
        s->scale *= 2.0;
    }
}

// Model FLOPs per token of a GPT step (forward + backward, no recomputation):
// Megatron-2 §5.1's 72 B s l h^2 (1 + s/6h + V/12hl), per token, with an ffn of 4h.
static double gpt_flops_per_token(int layers, int hidden, int seq, int vocab) {
    double l = layers, h = hidden, s = seq, V = vocab;
    return 72.0 * l * h * h + 12.0 * l * s * h + 6.0 * V * h;
}

// Dense bf16 peak TFLOP/s by device name; 0 when unknown (then no MFU is printed).
static double peak_tflops_for(const char* name) {
    static const struct { const char* key; double tflops; } table[] = {
        {"H200", 989.0}, {"H100 NVL", 835.0}, {"H100 PCIe", 756.0}, {"H100", 989.0}, {"GH200", 989.0},
        {"A100", 312.0}, {"A800", 312.0}, {"L40S", 362.0}, {"A10", 125.0}, {"RTX 4090", 165.2},
    };
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++)
        if (strstr(name, table[i].key)) return table[i].tflops;
    return 0.0;
}

// The figures of one log interval; printed as Megatron's line and, with --log-file,
// appended as a JSONL object or a CSV row.
typedef struct {
    int64_t iteration, train_iters, consumed_samples;
    double ms_per_iter, lr, lm_loss, loss_scale, grad_norm, tokens_per_s, tflops, mfu;
    int global_batch, skipped, nan_iters;
} LogRow;

static void log_print(const LogRow* r) {
    printf(" iteration %8lld/%8lld | consumed samples: %12lld | elapsed time per iteration (ms): %.1f |"
           " learning rate: %.3E | global batch size: %5d | lm loss: %.6E | loss scale: %.1f |"
           " grad norm: %.3f | number of skipped iterations: %3d | number of nan iterations: %3d |"
           " tokens/s: %.0f | TFLOP/s: %.3g",
           (long long)r->iteration, (long long)r->train_iters, (long long)r->consumed_samples, r->ms_per_iter, r->lr,
           r->global_batch, r->lm_loss, r->loss_scale, r->grad_norm, r->skipped, r->nan_iters, r->tokens_per_s, r->tflops);
    if (r->mfu > 0) printf(" | MFU: %.1f%%", 100.0 * r->mfu);
    printf(" |\n");
    fflush(stdout);
}

typedef struct {
    FILE* f;
    int csv;
} LogFile;

static void log_file_open(LogFile* lf, const char* path) {
    lf->f = NULL;
    lf->csv = 0;
    if (!path) return;
    size_t n = strlen(path);
    lf->csv = n > 4 && !strcmp(path + n - 4, ".csv");
    lf->f = fopen(path, "w");
    if (!lf->f) die("--log-file %s: cannot open for writing: %s", path, strerror(errno));
    if (lf->csv) fprintf(lf->f, "kind,iteration,consumed_samples,ms_per_iter,lr,global_batch,lm_loss,loss_scale,grad_norm,skipped,nan_iters,tokens_per_s,tflops,mfu\n");
}

static void log_file_train(LogFile* lf, const LogRow* r) {
    if (!lf->f) return;
    if (lf->csv)
        fprintf(lf->f, "train,%lld,%lld,%.3f,%.6e,%d,%.6e,%.1f,%.6f,%d,%d,%.1f,%.2f,%.4f\n", (long long)r->iteration,
                (long long)r->consumed_samples, r->ms_per_iter, r->lr, r->global_batch, r->lm_loss, r->loss_scale, r->grad_norm,
                r->skipped, r->nan_iters, r->tokens_per_s, r->tflops, r->mfu);
    else
        fprintf(lf->f, "{\"kind\": \"train\", \"iteration\": %lld, \"consumed_samples\": %lld, \"ms_per_iter\": %.3f, \"lr\": %.6e, "
                "\"global_batch\": %d, \"lm_loss\": %.6e, \"loss_scale\": %.1f, \"grad_norm\": %.6f, \"skipped\": %d, "
                "\"nan_iters\": %d, \"tokens_per_s\": %.1f, \"tflops\": %.2f, \"mfu\": %.4f}\n", (long long)r->iteration,
                (long long)r->consumed_samples, r->ms_per_iter, r->lr, r->global_batch, r->lm_loss, r->loss_scale, r->grad_norm,
                r->skipped, r->nan_iters, r->tokens_per_s, r->tflops, r->mfu);
    fflush(lf->f);
}

// Megatron's validation line; perplexity is exp(min(20, loss)).
static void log_validation(LogFile* lf, int64_t iteration, double loss) {
    double ppl = exp(fmin(20.0, loss));
    printf(" validation loss at iteration %lld | lm loss value: %.6E | lm loss PPL: %.6E |\n", (long long)iteration, loss, ppl);
    fflush(stdout);
    if (!lf->f) return;
    if (lf->csv) fprintf(lf->f, "valid,%lld,,,,,%.6e,,,,,,,\n", (long long)iteration, loss);
    else fprintf(lf->f, "{\"kind\": \"valid\", \"iteration\": %lld, \"lm_loss\": %.6e, \"ppl\": %.6e}\n", (long long)iteration, loss, ppl);
    fflush(lf->f);
}
// <<< training

// >>> generation
// ----------------------------------------------------------------------------
// 7. generation: Megatron's text_generation sampling (megatron/text_generation/sampling.py),
// on the host, over the fp32 logits of one position and the unpadded vocabulary of V tokens:
//   greedy (top_k == 1, or temperature 0): the argmax, the first of equal maxima as torch.argmax;
//   otherwise the logits are divided by the temperature, then either top-k keeps the logits
//   >= the k-th largest (ties kept), or top-p walks the tokens by decreasing logit and removes
//   each one whose predecessors' softmax mass already exceeds p (Megatron removes sorted positions
//   whose cumulative probability is > p, shifted right by one: the token that crosses p stays,
//   and so does the first); top-k and top-p are exclusive. One draw from the softmax of what is
//   left follows (torch.multinomial; here the inverse CDF of one mt_uniform of the caller's
//   MT19937, so a seed fixes the text).

typedef struct {
    double temperature;  // 1: the model's distribution; 0: greedy
    int top_k;           // 0: off; 1: greedy
    double top_p;        // 0: off; else in (0, 1]
} SamplingParams;

static SamplingParams sampling_from_args(const GenerationArgs* g) {
    SamplingParams sp = {g->temperature, g->greedy ? 1 : g->top_k, g->top_p};
    return sp;
}

// Megatron's asserts, as one-line errors (callers taking user input check first).
static void sampling_check(const SamplingParams* sp, int V) {
    if (!(sp->temperature >= 0)) die("sampling: temperature %g is negative", sp->temperature);
    if (sp->top_k < 0 || sp->top_k >= V) die("sampling: top_k %d is not in [0, %d) (the vocabulary)", sp->top_k, V);
    if (!(sp->top_p >= 0 && sp->top_p <= 1)) die("sampling: top_p %g is not in [0, 1]", sp->top_p);
    if (sp->top_k > 0 && sp->top_p > 0) die("sampling: top_k and top_p are exclusive");
}

static int argmax_token(const float* logits, int V) {
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

typedef struct { double z; int i; } ScoredToken;

static int scored_token_desc(const void* a, const void* b) {
    const ScoredToken *x = (const ScoredToken*)a, *y = (const ScoredToken*)b;
    if (x->z != y->z) return x->z < y->z ? 1 : -1;
    return x->i - y->i;
}

// Sets z[i] = -inf for the tokens top-k or top-p removes (z: the tempered logits).
static void sampling_filter(double* z, int V, const SamplingParams* sp) {
    ScoredToken* order = (ScoredToken*)xmalloc((size_t)V * sizeof(ScoredToken));
    for (int i = 0; i < V; i++) order[i] = ScoredToken{z[i], i};
    qsort(order, V, sizeof(ScoredToken), scored_token_desc);
    if (sp->top_k > 1) {
        double kth = order[sp->top_k - 1].z;
        for (int i = 0; i < V; i++)
            if (z[i] < kth) z[i] = -INFINITY;
    } else {
        double sum = 0, before = 0;  // softmax mass of the tokens ahead in the order
        for (int r = 0; r < V; r++) sum += exp(order[r].z - order[0].z);
        for (int r = 0; r < V; r++) {
            int removed = r > 0 && before > sp->top_p;
            before += exp(order[r].z - order[0].z) / sum;
            if (removed) z[order[r].i] = -INFINITY;
        }
    }
    free(order);
}

// The next token (Megatron's sample()). Every tensor-parallel rank calls it on the same logits
// with the same rng state, so all draw the same token.
static int sample_token(const float* logits, int V, const SamplingParams* sp, MT19937* rng) {
    sampling_check(sp, V);
    for (int i = 0; i < V; i++)
        if (!isfinite(logits[i])) die("the model's logit for token %d is %f: are the weights finite?", i, logits[i]);
    if (sp->top_k == 1 || sp->temperature == 0) return argmax_token(logits, V);
    double* z = (double*)xmalloc((size_t)V * sizeof(double));
    for (int i = 0; i < V; i++) z[i] = logits[i] / sp->temperature;
    if (sp->top_k > 1 || sp->top_p > 0) sampling_filter(z, V, sp);
    double max = -INFINITY, sum = 0, acc = 0;
    for (int i = 0; i < V; i++) max = fmax(max, z[i]);
    for (int i = 0; i < V; i++) sum += exp(z[i] - max);
    double u = mt_uniform(rng) * sum;
    int token = -1;
    for (int i = 0; i < V && (token < 0 || acc <= u); i++) {
        double w = exp(z[i] - max);
        if (w == 0) continue;
        acc += w;
        token = i;  // the last kept token also takes u when rounding leaves acc just under it
    }
    free(z);
    return token;
}

// log softmax(logits)[token] over the V tokens: Megatron's output log-probabilities (of the
// model's distribution, whatever the sampling).
static double token_logprob(const float* logits, int V, int token) {
    double max = -INFINITY, sum = 0;
    for (int i = 0; i < V; i++) max = fmax(max, logits[i]);
    for (int i = 0; i < V; i++) sum += exp((double)logits[i] - max);
    return logits[token] - max - log(sum);
}
// <<< generation

// >>> evaluation
// ----------------------------------------------------------------------------
// 8. evaluation: Megatron-LM's zero-shot GPT tasks (tasks/zeroshot_gpt), WikiText-103 perplexity and LAMBADA accuracy,
// without the model: the detokenizer, windows, examples and figures. Text is UTF-8 the caller has checked,
// read with Python's whitespace rules (Megatron works on Python str).

// The evaluation flags (tasks/main.py's names and defaults).
typedef struct {
    const char* task;      // WIKITEXT103 or LAMBADA
    ArgList valid_data;    // one file
    int overlapping_eval;  // WikiText window stride (32)
    int strict_lambada;    // LAMBADA label: the whole last word
} EvalArgs;

static int eval_args_table(EvalArgs* e, ArgSpec* t) {
    memset(e, 0, sizeof(*e));
    e->overlapping_eval = 32;
    int n = 0;
    t[n++] = ArgSpec{"--task", ARG_STRING, &e->task, "evaluate --load instead of training: WIKITEXT103 (perplexity) or LAMBADA (accuracy)"};
    t[n++] = ArgSpec{"--valid-data", ARG_LIST, &e->valid_data, "the task's file: wiki.test.tokens, or LAMBADA's jsonl"};
    t[n++] = ArgSpec{"--overlapping-eval", ARG_INT, &e->overlapping_eval, "WIKITEXT103 window stride: targets scored per window after the first (32)"};
    t[n++] = ArgSpec{"--strict-lambada", ARG_FLAG, &e->strict_lambada, "LAMBADA: predict every token of the last word, not only the last token"};
    return n;
}

static void eval_args_validate(const EvalArgs* e) {
    if (!e->task) {
        if (e->valid_data.n || e->strict_lambada) arg_error("--valid-data and --strict-lambada need --task");
        return;
    }
    if (strcmp(e->task, "WIKITEXT103") && strcmp(e->task, "LAMBADA")) arg_error("--task '%s' is not one of WIKITEXT103, LAMBADA", e->task);
    if (e->valid_data.n != 1) arg_error("--task %s needs one --valid-data file", e->task);
    if (e->overlapping_eval < 1) arg_error("--overlapping-eval must be positive");
}

// Once the sequence length is known: a stride longer than a window would leave tokens unscored.
static void eval_args_check_length(const EvalArgs* e, int seq_length) {
    if (!strcmp(e->task, "WIKITEXT103") && e->overlapping_eval > seq_length)
        arg_error("--overlapping-eval %d is above --seq-length %d: tokens between windows would go unscored", e->overlapping_eval, seq_length);
}

// --- Python's whitespace (str.isspace, str.split(), str.strip() and the regex \s agree)

// Bytes of the UTF-8 character that starts with lead byte c.
static int utf8_char_bytes(unsigned char c) { return c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1; }

// Bytes of the whitespace character at s[i] (s has n bytes), or 0. Python's set: \t\n\v\f\r,
// the separators \x1c-\x1f, space, U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029,
// U+202F, U+205F, U+3000.
static int py_space_at(const char* s, size_t n, size_t i) {
    const unsigned char* u = (const unsigned char*)s + i;
    if ((u[0] >= 0x09 && u[0] <= 0x0D) || (u[0] >= 0x1C && u[0] <= 0x20)) return 1;
    if (u[0] == 0xC2 && i + 1 < n) return u[1] == 0x85 || u[1] == 0xA0 ? 2 : 0;
    if (u[0] < 0xE1 || u[0] > 0xE3 || i + 2 >= n) return 0;
    uint32_t cp = (uint32_t)(u[0] & 0x0F) << 12 | (uint32_t)(u[1] & 0x3F) << 6 | (u[2] & 0x3F);
    int space = cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
                cp == 0x205F || cp == 0x3000;
    return space ? 3 : 0;
}

// Narrows [*begin, *end) of s to what str.strip() keeps.
static void py_strip(const char* s, size_t* begin, size_t* end) {
    size_t i = *begin, last;
    int k;
    while (i < *end && (k = py_space_at(s, *end, i))) i += k;
    *begin = last = i;
    while (i < *end) {
        k = py_space_at(s, *end, i);
        i += k ? k : utf8_char_bytes((unsigned char)s[i]);
        if (!k) last = i;
    }
    *end = last;
}

// --- the WikiText detokenizer (detokenizer.py's wikitext_detokenizer) and word count

// A growing NUL-terminated byte string; start it zeroed.
typedef struct {
    char* s;
    size_t n, cap;
} Bytes;

static void bytes_put(Bytes* b, const char* p, size_t len) {
    if (b->n + len + 1 > b->cap) {
        b->cap = (b->n + len + 1) * 2;
        b->s = (char*)realloc(b->s, b->cap);
        if (!b->s) die("out of host memory growing a text to %zu bytes", b->cap);
    }
    memcpy(b->s + b->n, p, len);
    b->n += len;
    b->s[b->n] = 0;
}

// str.replace(from, to): matches found left to right, never overlapping.
static void text_replace(Bytes* out, const char* s, size_t n, const char* from, const char* to) {
    size_t len = strlen(from), i = 0;
    const char* p;
    while ((p = (const char*)memmem(s + i, n - i, from, len)) != NULL) {
        bytes_put(out, s + i, p - s - i);
        bytes_put(out, to, strlen(to));
        i = p - s + len;
    }
    bytes_put(out, s + i, n - i);
}

// re.sub(r"O\s*([^C]*?)\s*C", r"O\1C"): each O and the first C after it enclose their content
// stripped of whitespace; the search goes on after that C.
static void text_trim_pairs(Bytes* out, const char* s, size_t n, char open, char close) {
    size_t i = 0;
    const char* p;
    while ((p = (const char*)memchr(s + i, open, n - i)) != NULL) {
        const char* c = (const char*)memchr(p + 1, close, s + n - p - 1);
        if (!c) break;  // no C after this O: none after a later O either
        size_t begin = p + 1 - s, end = c - s;
        py_strip(s, &begin, &end);
        bytes_put(out, s + i, p + 1 - s - i);
        bytes_put(out, s + begin, end - begin);
        bytes_put(out, c, 1);
        i = c + 1 - s;
    }
    bytes_put(out, s + i, n - i);
}

// re.sub(r"/' [0-9]/", r"/'[0-9]/"): Megatron's rule as written, the literal "[0-9]" included.
static void text_slash_quote_digit(Bytes* out, const char* s, size_t n) {
    size_t i = 0;
    const char* p;
    while ((p = (const char*)memmem(s + i, n - i, "/' ", 3)) != NULL) {
        size_t at = p - s;
        int match = at + 5 <= n && s[at + 3] >= '0' && s[at + 3] <= '9' && s[at + 4] == '/';
        bytes_put(out, s + i, at - i);
        bytes_put(out, match ? "/'[0-9]/" : "/", match ? 8 : 1);
        i = at + (match ? 5 : 1);
    }
    bytes_put(out, s + i, n - i);
}

enum { DETOK_REPLACE, DETOK_PAIRS, DETOK_SLASH_DIGIT };
static const struct { int kind; const char* a; const char* b; } wikitext_rules[] = {
    {DETOK_REPLACE, "s '", "s'"}, {DETOK_SLASH_DIGIT, "", ""},                                     // contractions
    {DETOK_REPLACE, " @-@ ", "-"}, {DETOK_REPLACE, " @,@ ", ","}, {DETOK_REPLACE, " @.@ ", "."},  // number separators
    {DETOK_REPLACE, " : ", ": "}, {DETOK_REPLACE, " ; ", "; "}, {DETOK_REPLACE, " . ", ". "},     // punctuation
    {DETOK_REPLACE, " ! ", "! "}, {DETOK_REPLACE, " ? ", "? "}, {DETOK_REPLACE, " , ", ", "},
    {DETOK_PAIRS, "()", ""}, {DETOK_PAIRS, "[]", ""}, {DETOK_PAIRS, "{}", ""},                     // brackets and quotes
    {DETOK_PAIRS, "\"\"", ""}, {DETOK_PAIRS, "''", ""},
    {DETOK_REPLACE, "= = = =", "===="}, {DETOK_REPLACE, "= = =", "==="}, {DETOK_REPLACE, "= =", "=="},  // miscellaneous
    {DETOK_REPLACE, " \xc2\xb0 ", "\xc2\xb0"}, {DETOK_REPLACE, " \n", "\n"}, {DETOK_REPLACE, "\n ", "\n"},
    {DETOK_REPLACE, " N ", " 1 "}, {DETOK_REPLACE, " 's", "'s"},
};

// Megatron's wikitext_detokenizer: its rules in its order, each over the whole text. Returns a
// new NUL-terminated string of *out_n bytes.
static char* wikitext_detokenize(const char* text, size_t n, size_t* out_n) {
    Bytes cur = {NULL, 0, 0};
    bytes_put(&cur, text, n);
    for (size_t r = 0; r < sizeof(wikitext_rules) / sizeof(wikitext_rules[0]); r++) {
        Bytes next = {NULL, 0, 0};
        bytes_put(&next, "", 0);
        if (wikitext_rules[r].kind == DETOK_REPLACE) text_replace(&next, cur.s, cur.n, wikitext_rules[r].a, wikitext_rules[r].b);
        else if (wikitext_rules[r].kind == DETOK_PAIRS) text_trim_pairs(&next, cur.s, cur.n, wikitext_rules[r].a[0], wikitext_rules[r].a[1]);
        else text_slash_quote_digit(&next, cur.s, cur.n);
        free(cur.s);
        cur = next;
    }
    *out_n = cur.n;
    return cur.s;
}

// num_original_tokens = len(text.strip().split(" ")), on the raw file: WikiText's words, where
// a line end and its neighbours count as one more.
static int64_t wikitext_word_count(const char* text, size_t n) {
    size_t begin = 0, end = n;
    py_strip(text, &begin, &end);
    int64_t count = 1;
    for (size_t i = begin; i < end; i++) count += text[i] == ' ';
    return count;
}

// --- WikiText-103 windows (datasets.py's _LMDataset)

// Window k holds tokens [k*stride, k*stride + s] (s + 1 tokens, EOD past the end). The first
// window scores its s targets, each later one only its last `stride`, those after the previous
// window's: every target is scored once, with at least s - stride tokens of context after the first window.
typedef struct {
    int64_t num_tokens, count;
    int seq_len, stride;
} LMWindows;

static LMWindows lm_windows(int64_t num_tokens, int seq_len, int overlapping_eval) {
    LMWindows w;
    w.num_tokens = num_tokens;
    w.seq_len = seq_len;
    w.stride = overlapping_eval > 1 ? overlapping_eval : 1;
    int64_t after_first = num_tokens - 1 - w.stride > 0 ? num_tokens - 1 - w.stride : 0;
    w.count = CEIL_DIV(after_first, (int64_t)w.stride) + 1;
    return w;
}

// Window k: out[s + 1] tokens and mask[s], 1 where target t (token t + 1) is scored.
// Returns the number of scored targets.
static int lm_window(const LMWindows* w, const int32_t* tokens, int64_t k, int32_t pad, int32_t* out, float* mask) {
    int64_t start = k * w->stride;
    int first_scored = k > 0 && w->seq_len > w->stride ? w->seq_len - w->stride : 0, scored = 0;
    out[0] = start < w->num_tokens ? tokens[start] : pad;
    for (int t = 1; t <= w->seq_len; t++) {
        int real = start + t < w->num_tokens;
        out[t] = real ? tokens[start + t] : pad;
        mask[t - 1] = real && t - 1 >= first_scored ? 1.0f : 0.0f;
        scored += real && t - 1 >= first_scored;
    }
    return scored;
}

// evaluate.py's figures from the loss summed over the num_tokenized - 1 targets.
typedef struct {
    double avg_loss, ppl, adjusted_ppl, token_ratio;
} LMMetrics;

static LMMetrics lm_metrics(double loss_sum, int64_t num_tokenized, int64_t num_original) {
    LMMetrics r;
    r.avg_loss = loss_sum / (double)(num_tokenized - 1);
    r.ppl = exp(fmin(20.0, r.avg_loss));
    // the same total loss per word instead of per BPE token
    r.token_ratio = (double)(num_tokenized - 1) / (double)(num_original - 1);
    r.adjusted_ppl = exp(fmin(20.0, r.avg_loss * r.token_ratio));
    return r;
}

// Python's repr(float), as Megatron prints the token ratio: the fewest digits that read back
// as x, positional for 1e-4 <= |x| < 1e16, else d.ddde+XX.
static void python_float_repr(double x, char* buf, size_t cap) {
    if (!isfinite(x)) { snprintf(buf, cap, "%s", x != x ? "nan" : x > 0 ? "inf" : "-inf"); return; }
    char sci[40], digits[24];
    for (int p = 1; p <= 17; p++) {
        snprintf(sci, sizeof(sci), "%.*e", p - 1, x);
        if (strtod(sci, NULL) == x) break;
    }
    int nd = 0, e10 = atoi(strchr(sci, 'e') + 1);
    for (const char* c = sci + (sci[0] == '-'); *c != 'e'; c++)
        if (*c != '.') digits[nd++] = *c;
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = 0;
    const char* sign = sci[0] == '-' ? "-" : "";
    if (e10 < -4 || e10 >= 16) snprintf(buf, cap, "%s%c%s%se%c%02d", sign, digits[0], nd > 1 ? "." : "", digits + 1, e10 < 0 ? '-' : '+', abs(e10));
    else if (e10 < 0) snprintf(buf, cap, "%s0.%.*s%s", sign, -e10 - 1, "000", digits);
    else if (nd > e10 + 1) snprintf(buf, cap, "%s%.*s.%s", sign, e10 + 1, digits, digits + e10 + 1);
    else snprintf(buf, cap, "%s%s%.*s.0", sign, digits, e10 + 1 - nd, "000000000000000");
}

// --- LAMBADA (datasets.py's _LambadaDataset)

// json.loads(line)["text"] of one JSON-lines record; `where` ("file:line") names it in errors.
static char* jsonl_text_field(const char* line, size_t n, const char* where) {
    StJson j = {line, n, 0, where, "JSON line"};
    char* text = NULL;
    st_json_expect(&j, '{');
    if (st_json_peek(&j) != '}') for (;;) {
        char* key = st_json_string(&j);
        st_json_expect(&j, ':');
        int is_text = strcmp(key, "text") == 0;
        free(key);
        if (is_text && st_json_peek(&j) != '"') st_json_fail(&j, "\"text\" is not a string");
        if (is_text) { free(text); text = st_json_string(&j); }
        else st_json_skip_value(&j, 0);
        if (st_json_peek(&j) == '}') break;
        st_json_expect(&j, ',');
    }
    j.i++;
    if (st_json_peek(&j) != -1) st_json_fail(&j, "text after the closing '}'");
    if (!text) die("%s: the record has no \"text\"", where);
    return text;
}

// --strict-lambada's reading of a text: the last word (text.split()[-1]) and the context before
// it, stripped (byte offsets). Returns 0 when the text has no word.
typedef struct {
    size_t context_begin, context_end, word_begin, word_end;
} LambadaSplit;

static int lambada_split_strict(const char* text, size_t n, LambadaSplit* sp) {
    int found = 0;
    memset(sp, 0, sizeof(*sp));
    for (size_t i = 0; i < n;) {
        int k = py_space_at(text, n, i);
        if (k) { i += k; continue; }
        sp->word_begin = i;
        while (i < n && !py_space_at(text, n, i)) i += utf8_char_bytes((unsigned char)text[i]);
        sp->word_end = i;
        found = 1;
    }
    if (!found) return 0;
    sp->context_begin = 0;
    sp->context_end = sp->word_begin;
    py_strip(text, &sp->context_begin, &sp->context_end);
    return 1;
}

// Text to token ids with the run's tokenizer (which megatron.h does not know): a malloc'd array of *count ids.
typedef int32_t* (*EncodeText)(const void* tokenizer, const char* text, size_t n, size_t* count);

// One example: its tokens, the context's then the label's.
typedef struct {
    int32_t* tokens;
    int num_context, num_label;
} LambadaExample;

// Megatron's get_tokens: the label is the text's last BPE token, or with --strict-lambada the
// BPE tokens of " " + the last word, after those of the context. Megatron scores an empty
// context's example as correct without looking (its first label token is never a target): an error here.
static LambadaExample lambada_example(const char* text, size_t n, int strict, EncodeText encode, const void* tokenizer, const char* where) {
    LambadaExample e;
    LambadaSplit sp;
    size_t n_context, n_label;
    if (!strict) {
        e.tokens = encode(tokenizer, text, n, &n_context);
        if (n_context < 2) die("%s: the text has %zu tokens: no context before the label", where, n_context);
        e.num_context = (int)n_context - 1;
        e.num_label = 1;
        return e;
    }
    if (!lambada_split_strict(text, n, &sp)) die("%s: the text has no word to predict", where);
    int32_t* context = encode(tokenizer, text + sp.context_begin, sp.context_end - sp.context_begin, &n_context);
    if (!n_context) die("%s: no context before the last word", where);
    char* word = (char*)xmalloc(sp.word_end - sp.word_begin + 1);
    word[0] = ' ';
    memcpy(word + 1, text + sp.word_begin, sp.word_end - sp.word_begin);
    int32_t* label = encode(tokenizer, word, sp.word_end - sp.word_begin + 1, &n_label);
    e.tokens = (int32_t*)xmalloc((n_context + n_label) * sizeof(int32_t));
    memcpy(e.tokens, context, n_context * sizeof(int32_t));
    memcpy(e.tokens + n_context, label, n_label * sizeof(int32_t));
    e.num_context = (int)n_context;
    e.num_label = (int)n_label;
    free(context);
    free(label);
    free(word);
    return e;
}

// Every line of a LAMBADA JSON-lines file (its n bytes in text) as an example; *count of them.
static LambadaExample* lambada_read(const char* path, const char* text, size_t n, int strict, EncodeText encode, const void* tokenizer,
                                    int64_t* count) {
    LambadaExample* all = NULL;
    int64_t cap = 0, k = 0;
    for (size_t i = 0; i < n; k++) {
        const char* newline = (const char*)memchr(text + i, '\n', n - i);
        size_t end = newline ? (size_t)(newline - text) : n;
        char where[1300];  // "path:line" for error messages; a longer path is cut
        snprintf(where, sizeof(where), "%s:%lld", path, (long long)k + 1);
        char* record = jsonl_text_field(text + i, end - i, where);
        if (k == cap) {
            cap = cap ? 2 * cap : 1024;
            all = (LambadaExample*)realloc(all, cap * sizeof(LambadaExample));
            if (!all) die("out of host memory reading %s", path);
        }
        all[k] = lambada_example(record, strlen(record), strict, encode, tokenizer, where);
        free(record);
        i = end + 1;
    }
    if (k == 0) die("%s: no examples (the file is empty)", path);
    *count = k;
    return all;
}

// Example e as Megatron's sample: out[T + 1] tokens (pad after the example) and mask[T], 1
// where the target is a label token.
static void lambada_window(const LambadaExample* e, int T, int32_t pad, int32_t* out, float* mask) {
    int len = e->num_context + e->num_label;
    out[0] = len > 0 ? e->tokens[0] : pad;
    for (int t = 1; t <= T; t++) {
        out[t] = t < len ? e->tokens[t] : pad;
        mask[t - 1] = t >= e->num_context && t < len ? 1.0f : 0.0f;
    }
}
// <<< evaluation

// >>> server
// ----------------------------------------------------------------------------
// 9. server: Megatron-LM's REST text-generation server (megatron/text_generation_server.py,
// started by tools/run_text_generation_server.py): PUT /api with a JSON body, answered in JSON.
//
//   request  {"prompts": ["..."], "tokens_to_generate": 64, "temperature": 1.0, "top_k": 0, "top_p": 0.0,
//             "logprobs": false, "random_seed": 1234, "add_BOS": false, "no_log": false}
//   answer   {"text": ["prompt and generation"], "segments": [["each", " token"]], "logprobs": [[...]] or null}
//
// Bad requests get HTTP 400 and one line of plain text, in Megatron's words. Keys the server does not
// know are ignored, as Megatron ignores them; Megatron options that would change the answer and are not
// implemented here (beam_width, stop_on_eol, stop_on_double_eol, prevent_newline_after_colon,
// top_p_decay, top_p_bound) get a 400 when they ask for anything but the default.
// HTTP is libmicrohttpd's (built with USE_MHD); the model is behind a GenerateFn, so this section knows
// no GPT, and the tests drive it with a stand-in.

#define SERVER_MAX_PROMPTS 128    // Megatron's limit
#define SERVER_MAX_BODY (4 << 20)  // bytes of one request body

typedef struct {
    int n_prompts;
    char** prompts;          // UTF-8, as sent
    int tokens_to_generate;  // 64; 0 (with logprobs) scores the prompts
    double temperature;      // (0, 100], 1.0
    int top_k;               // 0..1000; 0: off, 1: greedy
    double top_p;            // [0, 1]; 0: off; not together with top_k
    int logprobs;            // answer log p of every token after the first
    int64_t random_seed;     // 0..2^32-1; -1 when not given (the program behind the server picks one)
    int add_BOS;             // begin each prompt with end-of-document
    int no_log;              // leave the request out of the server's log
} GenerateRequest;

typedef struct {
    char* text;       // the prompt and its generation, decoded (valid UTF-8)
    int n_tokens;     // prompt and generated tokens
    char** segments;  // each token decoded: Megatron's "segments"
    float* logprobs;  // n_tokens - 1 values, log p(token i+1 | tokens 0..i); NULL unless asked
} GeneratedText;

typedef struct {
    int n;                 // one per prompt
    GeneratedText* items;  // filled by the GenerateFn (malloc'd); generate_response_free frees them
} GenerateResponse;

// What the program behind the server supplies: fills out->items[0..n) for req and returns 0, or
// returns non-zero with a message in err (the client gets HTTP 400: a prompt too long for the
// model, ...). Called on the thread that called server_run, one request at a time.
typedef int (*GenerateFn)(void* ctx, const GenerateRequest* req, GenerateResponse* out, char* err, size_t err_cap);

// Called on the same thread after every idle_seconds without a request (may be NULL): a
// tensor-parallel rank 0 tells the other ranks it is alive, so that their wait for the next
// request never runs into --collective-timeout.
typedef void (*IdleFn)(void* ctx);

static void generate_request_free(GenerateRequest* r) {
    for (int i = 0; i < r->n_prompts; i++) free(r->prompts[i]);
    free(r->prompts);
    memset(r, 0, sizeof(*r));
}

static void generate_response_free(GenerateResponse* r) {
    for (int i = 0; i < r->n; i++) {
        GeneratedText* g = &r->items[i];
        for (int k = 0; g->segments && k < g->n_tokens; k++) free(g->segments[k]);
        free(g->segments);
        free(g->text);
        free(g->logprobs);
    }
    free(r->items);
    memset(r, 0, sizeof(*r));
}

// --- the request: the body's keys through JsonObject, then each value checked as Megatron does

static int request_error(char* err, size_t cap, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
    return -1;
}

// Reads a JSON list of strings into the request's prompts.
static void request_read_prompts(StJson* j, void* dest) {
    GenerateRequest* r = (GenerateRequest*)dest;
    st_json_expect(j, '[');
    if (st_json_peek(j) == ']') { j->i++; return; }
    for (;;) {
        if (st_json_peek(j) != '"') st_json_fail(j, "not a string");
        r->prompts = (char**)realloc(r->prompts, (r->n_prompts + 1) * sizeof(char*));
        if (!r->prompts) die("out of host memory reading a request");
        r->prompts[r->n_prompts] = st_json_string(j);
        r->n_prompts++;
        if (st_json_peek(j) == ']') { j->i++; return; }
        st_json_expect(j, ',');
    }
}

// The value of key, checked: 1 when it is absent (out unchanged) or of the type and range asked.
// Values come from JsonObject, so they are well-formed JSON: a number starts with '-' or a digit.
static int json_value_is_number(const char* v) { return v[0] == '-' || (v[0] >= '0' && v[0] <= '9'); }

static int request_int(const JsonObject* o, const char* key, int64_t lo, int64_t hi, int64_t* out) {
    const char* v = json_object_get(o, key);
    if (!v) return 1;
    int64_t x;
    if (!json_value_is_number(v) || strpbrk(v, ".eE") || !parse_int64(v, &x) || x < lo || x > hi) return 0;
    *out = x;
    return 1;
}

static int request_number(const JsonObject* o, const char* key, double lo, double hi, double* out) {
    const char* v = json_object_get(o, key);
    if (!v) return 1;
    if (!json_value_is_number(v)) return 0;
    double x = strtod(v, NULL);
    if (!(x >= lo && x <= hi)) return 0;
    *out = x;
    return 1;
}

static int request_bool(const JsonObject* o, const char* key, int* out) {
    const char* v = json_object_get(o, key);
    if (!v) return 1;
    if (strcmp(v, "true") && strcmp(v, "false")) return 0;
    *out = v[0] == 't';
    return 1;
}

// Megatron's checks of text_generation_server.py's put(), in its order and words.
static int request_check(const JsonObject* o, GenerateRequest* r, char* err, size_t cap) {
    for (int i = 0; i < o->n; i++)
        for (int k = 0; k < i; k++)
            if (!strcmp(o->keys[i], o->keys[k])) return request_error(err, cap, "duplicate key \"%.64s\"", o->keys[i]);
    const char* prompts = json_object_get(o, "prompts");
    if (!prompts) return request_error(err, cap, "prompts argument required");
    if (json_object_get(o, "max_len")) return request_error(err, cap, "max_len is no longer used.  Replace with tokens_to_generate");
    if (json_object_get(o, "sentences")) return request_error(err, cap, "sentences is no longer used.  Replace with prompts");
    StJson j = {prompts, strlen(prompts), 0, "request", "prompts"};
    if (st_json_try(&j, request_read_prompts, r)) return request_error(err, cap, "prompts is not a list of strings");
    if (r->n_prompts == 0) return request_error(err, cap, "prompts is empty");
    if (r->n_prompts > SERVER_MAX_PROMPTS) return request_error(err, cap, "Maximum number of prompts is %d", SERVER_MAX_PROMPTS);
    int64_t tokens = 64, top_k = 0, seed = -1;
    if (!request_int(o, "tokens_to_generate", 0, INT32_MAX, &tokens))
        return request_error(err, cap, "tokens_to_generate must be an integer greater than or equal to 0");
    r->tokens_to_generate = (int)tokens;
    if (!request_bool(o, "logprobs", &r->logprobs)) return request_error(err, cap, "logprobs must be a boolean value");
    if (tokens == 0 && !r->logprobs) return request_error(err, cap, "tokens_to_generate=0 implies logprobs should be True");
    if (!request_number(o, "temperature", DBL_MIN, 100.0, &r->temperature))  // (0, 100]
        return request_error(err, cap, "temperature must be a positive number less than or equal to 100.0");
    if (!request_int(o, "top_k", 0, 1000, &top_k))
        return request_error(err, cap, "top_k must be an integer equal to or greater than 0 and less than or equal to 1000");
    r->top_k = (int)top_k;
    if (!request_number(o, "top_p", 0.0, 1.0, &r->top_p)) return request_error(err, cap, "top_p must be a number from 0 to 1.0");
    if (r->top_p > 0 && r->top_k > 0) return request_error(err, cap, "cannot set both top-k and top-p samplings.");
    if (!request_bool(o, "add_BOS", &r->add_BOS)) return request_error(err, cap, "add_BOS must be a boolean value");
    for (int i = 0; i < r->n_prompts; i++)
        if (!r->prompts[i][0] && !r->add_BOS) return request_error(err, cap, "Empty prompts require add_BOS=true");
    const char* unsupported_switches[] = {"stop_on_eol", "stop_on_double_eol", "prevent_newline_after_colon"};
    for (int i = 0; i < 3; i++) {
        int on = 0;
        if (!request_bool(o, unsupported_switches[i], &on)) return request_error(err, cap, "%s must be a boolean value", unsupported_switches[i]);
        if (on) return request_error(err, cap, "%s is not supported by this server", unsupported_switches[i]);
    }
    const char* unsupported_numbers[] = {"top_p_decay", "top_p_bound"};  // 0: off
    for (int i = 0; i < 2; i++) {
        double off = 0;
        if (!request_number(o, unsupported_numbers[i], 0.0, 0.0, &off)) return request_error(err, cap, "%s is not supported by this server", unsupported_numbers[i]);
    }
    if (!request_int(o, "random_seed", 0, UINT32_MAX, &seed)) return request_error(err, cap, "random_seed must be an integer from 0 to 4294967295");
    r->random_seed = seed;
    if (!request_bool(o, "no_log", &r->no_log)) return request_error(err, cap, "no_log must be a boolean value");
    if (json_object_get(o, "beam_width")) return request_error(err, cap, "beam search (beam_width) is not supported by this server");
    return 0;
}

// A request body into r: 0, or -1 with the message for the client in err (r is then empty).
static int generate_request_parse(const char* body, size_t n, GenerateRequest* r, char* err, size_t cap) {
    memset(r, 0, sizeof(*r));
    r->tokens_to_generate = 64;
    r->temperature = 1.0;
    r->random_seed = -1;
    JsonObject o;
    memset(&o, 0, sizeof(o));
    StJson j = {body, n, 0, "request", "JSON"};
    int status = st_json_try(&j, json_object_fill, &o) ? request_error(err, cap, "%s", j.error) : request_check(&o, r, err, cap);
    json_object_free(&o);
    if (status) generate_request_free(r);
    return status;
}

// --- the answer

// {"text": [...], "segments": [[...], ...], "logprobs": [[...], ...] or null}, malloc'd.
static char* generate_response_json(const GenerateResponse* r, int with_logprobs, size_t* len) {
    StText b = {NULL, 0, 0};
    st_text_put(&b, "{\"text\": [", 10);
    for (int i = 0; i < r->n; i++) {
        if (i) st_text_put(&b, ", ", 2);
        st_text_json_string(&b, r->items[i].text);
    }
    st_text_put(&b, "], \"segments\": [", 16);
    for (int i = 0; i < r->n; i++) {
        st_text_put(&b, i ? ", [" : "[", i ? 3 : 1);
        for (int k = 0; k < r->items[i].n_tokens; k++) {
            if (k) st_text_put(&b, ", ", 2);
            st_text_json_string(&b, r->items[i].segments[k]);
        }
        st_text_put(&b, "]", 1);
    }
    st_text_put(&b, with_logprobs ? "], \"logprobs\": [" : "], \"logprobs\": null}", with_logprobs ? 16 : 20);
    for (int i = 0; with_logprobs && i < r->n; i++) {
        st_text_put(&b, i ? ", [" : "[", i ? 3 : 1);
        for (int k = 0; k + 1 < r->items[i].n_tokens; k++) {
            char number[32] = "null";  // for -inf: JSON has no infinity
            float lp = r->items[i].logprobs[k];
            if (isfinite(lp)) {
                snprintf(number, sizeof(number), "%.9g", lp);
                if (!strpbrk(number, ".e")) strcat(number, ".0");  // -1.0, not -1: a float to Python's json too
            }
            st_text_printf(&b, "%s%s", k ? ", " : "", number);
        }
        st_text_put(&b, "]", 1);
    }
    if (with_logprobs) st_text_put(&b, "]}", 2);
    *len = b.len;
    return b.s;
}

// --- flags

#include <arpa/inet.h>
#include <netdb.h>

typedef struct {
    int port;                  // -1: no server
    const char* bind_address;
} ServerArgs;

static int server_args_table(ServerArgs* s, ArgSpec* t) {
    s->port = -1;
    s->bind_address = "127.0.0.1";
    t[0] = ArgSpec{"--port", ARG_INT, &s->port, "serve Megatron's REST API (PUT /api) on this port until killed (0: any free port)"};
    t[1] = ArgSpec{"--bind-address", ARG_STRING, &s->bind_address, "numeric IPv4/IPv6 address the server listens on (127.0.0.1; 0.0.0.0: all)"};
    return 2;
}

static void server_unavailable(void) { die("--port: built without libmicrohttpd (apt-get install libmicrohttpd-dev, then rebuild)"); }

// --bind-address and --port as a socket address; returns whether it is IPv6.
static int server_address(const ServerArgs* a, struct sockaddr_storage* out) {
    struct addrinfo hints, *found;
    memset(&hints, 0, sizeof(hints));
    hints.ai_flags = AI_NUMERICHOST | AI_PASSIVE;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(a->bind_address, NULL, &hints, &found)) arg_error("--bind-address %s: not a numeric IPv4 or IPv6 address", a->bind_address);
    memset(out, 0, sizeof(*out));
    memcpy(out, found->ai_addr, found->ai_addrlen);
    freeaddrinfo(found);
    int ipv6 = out->ss_family == AF_INET6;
    if (ipv6) ((struct sockaddr_in6*)out)->sin6_port = htons((uint16_t)a->port);
    else ((struct sockaddr_in*)out)->sin_port = htons((uint16_t)a->port);
    return ipv6;
}

static void server_args_validate(const ServerArgs* s) {
    if ((arg_given("--port") || s->port != -1) && (s->port < 0 || s->port > 65535)) arg_error("--port %d: expected 0 to 65535", s->port);
#ifndef USE_MHD
    if (s->port >= 0) server_unavailable();
#endif
    struct sockaddr_storage unused;
    if (s->port >= 0) server_address(s, &unused);
}

// --- HTTP: libmicrohttpd parses requests (headers, chunked bodies, Expect: 100-continue, keep-alive,
// limits) on a thread per connection; those threads hand each valid request to the thread that
// called server_run, which alone runs the model (its GPU, MPI and OpenMP state stay on one thread).

#ifdef USE_MHD
#include <microhttpd.h>
#include <pthread.h>

// A request on its way from a connection's thread to the model's thread, and its answer.
typedef struct {
    const GenerateRequest* req;
    GenerateResponse* out;
    char* err;
    size_t err_cap;
    int status;  // the GenerateFn's
    int done;
} ServerJob;

typedef struct {
    GenerateFn generate;
    void* ctx;
    pthread_mutex_t lock;
    pthread_cond_t changed;  // a job was posted or finished
    ServerJob* job;          // the one posted or running; NULL when the model is free
    int listening;
    char start_error[256];   // libmicrohttpd's last message before it listened
} Server;

// A connection's request body, gathered over the handler's calls.
typedef struct {
    StText body;
    int too_large;
} ServerUpload;

// Posts the job and waits for the model's thread to finish it; one job at a time.
static void server_submit(Server* s, ServerJob* job) {
    pthread_mutex_lock(&s->lock);
    while (s->job) pthread_cond_wait(&s->changed, &s->lock);
    s->job = job;
    pthread_cond_broadcast(&s->changed);
    while (!job->done) pthread_cond_wait(&s->changed, &s->lock);
    pthread_mutex_unlock(&s->lock);
}

static enum MHD_Result server_reply(struct MHD_Connection* c, unsigned status, const char* text, size_t len, const char* type) {
    struct MHD_Response* r = MHD_create_response_from_buffer(len, (void*)text, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED) MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "PUT");
    enum MHD_Result queued = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return queued;
}

static enum MHD_Result server_error(struct MHD_Connection* c, unsigned status, const char* message) {
    char line[640];
    int n = snprintf(line, sizeof(line), "%s\n", message);
    if (status != MHD_HTTP_NOT_FOUND && status != MHD_HTTP_METHOD_NOT_ALLOWED) {
        printf("PUT /api: %u %s\n", status, message);
        fflush(stdout);
    }
    return server_reply(c, status, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1, "text/plain; charset=utf-8");
}

// A complete PUT /api body: validated here, generated on the model's thread, answered.
static enum MHD_Result server_answer(Server* s, struct MHD_Connection* c, const char* body, size_t len) {
    GenerateRequest req;
    char err[512];
    if (generate_request_parse(body, len, &req, err, sizeof(err))) return server_error(c, MHD_HTTP_BAD_REQUEST, err);
    double start = now_seconds();
    GenerateResponse out = {req.n_prompts, (GeneratedText*)xcalloc(req.n_prompts, sizeof(GeneratedText))};
    ServerJob job = {&req, &out, err, sizeof(err), 0, 0};
    server_submit(s, &job);
    enum MHD_Result queued;
    if (job.status) {
        queued = server_error(c, MHD_HTTP_BAD_REQUEST, err);
    } else {
        size_t n;
        char* json = generate_response_json(&out, req.logprobs, &n);
        queued = server_reply(c, MHD_HTTP_OK, json, n, "application/json");
        free(json);
        if (!req.no_log)
            printf("PUT /api: 200, %d prompt%s, tokens_to_generate %d, %.2f s\n", req.n_prompts, req.n_prompts > 1 ? "s" : "",
                   req.tokens_to_generate, now_seconds() - start);
        fflush(stdout);
    }
    generate_response_free(&out);
    generate_request_free(&req);
    return queued;
}

// libmicrohttpd calls this once with the headers, once per piece of body, then once more.
static enum MHD_Result server_handle(void* cls, struct MHD_Connection* c, const char* url, const char* method, const char* version,
                                     const char* data, size_t* data_size, void** state) {
    if (strcmp(url, "/api")) return server_error(c, MHD_HTTP_NOT_FOUND, "not found: the API is PUT /api");
    if (strcmp(method, MHD_HTTP_METHOD_PUT)) return server_error(c, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed: the API is PUT /api");
    ServerUpload* up = (ServerUpload*)*state;
    if (!up) {
        *state = xcalloc(1, sizeof(ServerUpload));
        return MHD_YES;
    }
    if (*data_size) {
        up->too_large |= up->body.len + *data_size > SERVER_MAX_BODY;
        if (!up->too_large) st_text_put(&up->body, data, *data_size);
        *data_size = 0;
        return MHD_YES;
    }
    if (up->too_large) {
        char message[64];
        snprintf(message, sizeof(message), "request body larger than %d bytes", SERVER_MAX_BODY);
        return server_error(c, 413, message);  // Content Too Large
    }
    return server_answer((Server*)cls, c, up->body.s ? up->body.s : "", up->body.len);
}

static void server_completed(void* cls, struct MHD_Connection* c, void** state, enum MHD_RequestTerminationCode why) {
    ServerUpload* up = (ServerUpload*)*state;
    if (up) free(up->body.s);
    free(up);
    *state = NULL;
}

// libmicrohttpd's messages: the reason it could not start goes into our one-line error; later
// ones (a connection it had to drop, ...) are printed as they come.
static void server_log(void* cls, const char* fmt, va_list ap) {
    Server* s = (Server*)cls;
    char line[256];
    vsnprintf(line, sizeof(line), fmt, ap);
    line[strcspn(line, "\n")] = 0;
    pthread_mutex_lock(&s->lock);
    if (s->listening) fprintf(stderr, "libmicrohttpd: %s\n", line);
    else snprintf(s->start_error, sizeof(s->start_error), "%s", line);
    pthread_mutex_unlock(&s->lock);
}

// Waits on s->changed (s->lock held) for at most `seconds`; returns whether the time ran out.
static int server_wait(Server* s, double seconds) {
    if (!(seconds > 0)) {
        pthread_cond_wait(&s->changed, &s->lock);
        return 0;
    }
    double until = now_seconds() + seconds;
    struct timespec deadline = {(time_t)until, (long)((until - (time_t)until) * 1e9)};
    return pthread_cond_timedwait(&s->changed, &s->lock, &deadline) == ETIMEDOUT;
}

// Serves until the process is killed, running every generation on the calling thread. Prints
// "serving PUT http://ADDRESS:PORT/api" once it listens (the port the system chose for --port 0).
static void server_run(const ServerArgs* a, GenerateFn generate, IdleFn idle, double idle_seconds, void* ctx) {
    struct sockaddr_storage addr;
    int ipv6 = server_address(a, &addr);
    Server s;
    memset(&s, 0, sizeof(s));
    s.generate = generate;
    s.ctx = ctx;
    pthread_mutex_init(&s.lock, NULL);
    pthread_condattr_t monotonic;  // idle deadlines on the clock now_seconds reads
    pthread_condattr_init(&monotonic);
    pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC);
    pthread_cond_init(&s.changed, &monotonic);
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG | (ipv6 ? MHD_USE_IPv6 : 0);
    struct MHD_Daemon* daemon = MHD_start_daemon(flags, (uint16_t)a->port, NULL, NULL, server_handle, &s,
                                                 MHD_OPTION_SOCK_ADDR, (struct sockaddr*)&addr,
                                                 MHD_OPTION_CONNECTION_LIMIT, (unsigned)64,
                                                 MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120,
                                                 MHD_OPTION_NOTIFY_COMPLETED, server_completed, NULL,
                                                 MHD_OPTION_EXTERNAL_LOGGER, server_log, &s, MHD_OPTION_END);
    if (!daemon) die("cannot serve on %s port %d: %s", a->bind_address, a->port, s.start_error[0] ? s.start_error : "libmicrohttpd did not start");
    pthread_mutex_lock(&s.lock);
    s.listening = 1;
    pthread_mutex_unlock(&s.lock);
    const union MHD_DaemonInfo* info = MHD_get_daemon_info(daemon, MHD_DAEMON_INFO_BIND_PORT);
    printf("serving PUT http://%s%s%s:%u/api (Megatron's text generation API); stop with Ctrl-C\n", ipv6 ? "[" : "", a->bind_address,
           ipv6 ? "]" : "", (unsigned)info->port);
    fflush(stdout);
    for (;;) {
        pthread_mutex_lock(&s.lock);
        int idle_now = 0;
        while (!s.job && !idle_now) idle_now = server_wait(&s, idle ? idle_seconds : 0);
        ServerJob* job = s.job;
        pthread_mutex_unlock(&s.lock);
        if (!job) {
            idle(ctx);
            continue;
        }
        job->status = generate(ctx, job->req, job->out, job->err, job->err_cap);
        pthread_mutex_lock(&s.lock);
        job->done = 1;
        s.job = NULL;
        pthread_cond_broadcast(&s.changed);
        pthread_mutex_unlock(&s.lock);
    }
}
#else
static void server_run(const ServerArgs* a, GenerateFn generate, IdleFn idle, double idle_seconds, void* ctx) { server_unavailable(); }
#endif
// <<< server

#endif  // MEGATRON_H
