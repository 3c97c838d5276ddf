/*
dev/cuda/common.h: what every kernel ladder in dev/cuda shares.

Each program (layernorm.cu, attention.cu, ...) runs the versions of one kernel family, from the
plainest to the one megatron.h uses (called through megatron.h, never a copy), at GPT-2 124M's
training shape (B16 T1024, C 768, 12 heads, V 50304) and the Megatron-2 Table 1 row-1 model's
(B4 T2048, C 2304, 24 heads, V 51200). For each version:
  - a check against megatron.h's CPU reference (in double where it is a template) on fresh
    random inputs, outputs poisoned with NaN first where the version writes them whole: the
    error is ||out - ref|| / ||ref|| (METHOD.md), the largest over the version's outputs;
  - the median time of BENCH_REPS launches after BENCH_WARMUP, each after the L2 cache is
    flushed, timed with CUDA events;
  - GB/s from the fewest bytes the operation must move (each input read once, each output written
    once) or TFLOP/s, against a ceiling measured in the same run: a device-to-device copy (bytes
    read + written) or a cuBLASLt bf16 GEMM.
Before a memory-bound kernel's first version at a shape comes a line "v0": a device-to-device copy
of the same bytes, timed the same way. A launch of tens of microseconds pays a few of them to
start and drain, so that line is the ceiling at this size, where the 2 GiB copy's is not.
One line per version, whitespace-separated, the description last (run_all.sh reads them):
  kernel shape version time_us rate unit %ceiling error tolerance ok|FAIL description
The program exits 1 if any check failed.
*/
#ifndef DEV_CUDA_COMMON_H
#define DEV_CUDA_COMMON_H

#include "../../test/test.h"  // megatron.h and rel_error

#define BENCH_WARMUP 3
#define BENCH_REPS 21

// Tolerances on ||out - ref|| / ||ref|| (METHOD.md): fp32 arithmetic from the same inputs; one
// rounding to bf16 at the end; attention, whose probabilities are rounded to bf16 inside too
// (as test/test_attention.cu).
#define TOL_F32 1e-5
#define TOL_BF16 1e-2
#define TOL_ATTENTION_BF16 2e-2

// The two model shapes (Vp: the vocabulary padded to a multiple of 128; L: layers, for the
// parameter count of AdamW and the gradient norm).
typedef struct {
    const char* name;
    int B, T, C, NH, V, Vp, L;
} Shape;

static const Shape SHAPES[] = {
    {"gpt2", 16, 1024, 768, 12, 50257, 50304, 12},
    {"1.7b", 4, 2048, 2304, 24, 51200, 51200, 24},
};
#define N_SHAPES ((int)(sizeof(SHAPES) / sizeof(SHAPES[0])))

// GPT's parameters: per layer 12C^2 + 13C (QKV, projections, MLP, two LayerNorms), word and
// position embeddings, final LayerNorm.
static size_t shape_params(const Shape* s) {
    size_t C = s->C;
    return (size_t)s->L * (12 * C * C + 13 * C) + ((size_t)s->Vp + s->T) * C + 2 * C;
}

typedef struct {
    Device dev;
    cudaEvent_t start, stop;
    void* flush;  // written before every timed launch: nothing of the last one stays in L2
    size_t flush_bytes;
    double copy_gbps, gemm_tflops;
    int failures;
    void *copy_src, *copy_dst;  // the v0 lines' copies, grown as needed
    size_t copy_bytes;
    char copied[64];  // the kernel and shape of the last v0 line
} Bench;

static Bench bench;

static int compare_doubles(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

// Median microseconds of `launch` (a callable that enqueues work on bench.dev.stream).
template <typename F>
static double time_us(F launch) {
    double us[BENCH_REPS];
    for (int i = 0; i < BENCH_WARMUP; i++) launch();
    for (int i = 0; i < BENCH_REPS; i++) {
        cudaCheck(cudaMemsetAsync(bench.flush, i & 0xff, bench.flush_bytes, bench.dev.stream));
        cudaCheck(cudaEventRecord(bench.start, bench.dev.stream));
        launch();
        cudaCheck(cudaEventRecord(bench.stop, bench.dev.stream));
        cudaCheck(cudaEventSynchronize(bench.stop));
        cudaCheck(cudaGetLastError());
        float ms;
        cudaCheck(cudaEventElapsedTime(&ms, bench.start, bench.stop));
        us[i] = 1e3 * ms;
    }
    qsort(us, BENCH_REPS, sizeof(double), compare_doubles);
    return us[BENCH_REPS / 2];
}

// ---- memory: device buffers live until free_to(a mark) or free_all(), host ones until free_host_all()

static void* dev_buffers[256];
static int dev_buffer_count = 0;

static void* dalloc(size_t bytes) {
    if (dev_buffer_count == 256) die("dev/cuda: too many device buffers");
    return dev_buffers[dev_buffer_count++] = dev_malloc(&bench.dev, bytes);
}

static int dev_mark(void) { return dev_buffer_count; }

// Frees the device buffers allocated since mark.
static void free_to(int mark) {
    cudaCheck(cudaDeviceSynchronize());
    while (dev_buffer_count > mark) dev_free(&bench.dev, dev_buffers[--dev_buffer_count]);
}

static void free_all(void) { free_to(0); }

static void* host_buffers[256];
static int host_buffer_count = 0;

template <typename X>
static X* halloc(size_t n) {
    if (host_buffer_count == 256) die("dev/cuda: too many host buffers");
    return (X*)(host_buffers[host_buffer_count++] = xmalloc(n * sizeof(X)));
}

static void free_host_all(void) {
    while (host_buffer_count) free(host_buffers[--host_buffer_count]);
}

// NaN in fp32, bf16 and fp16: an element a kernel did not write fails the check.
static void poison(void* p, size_t bytes) { cudaCheck(cudaMemsetAsync(p, 0xff, bytes, bench.dev.stream)); }

// ---- random inputs (never zeros: they hide unwritten outputs and run faster than real data)

// n draws of offset + scale * N(0, 1), rounded through dt (what the GPU will hold). 64 slices
// with their own generators, drawn in parallel: the same values whatever the thread count.
static float* host_random(size_t n, DType dt, uint32_t seed, double scale = 1, double offset = 0) {
    float* x = halloc<float>(n);
    #pragma omp parallel for
    for (int slice = 0; slice < 64; slice++) {
        MT19937 mt;
        mt_seed(&mt, seed * 64 + slice);
        for (size_t i = n * slice / 64; i < n * (slice + 1) / 64; i++) x[i] = (float)(offset + scale * mt_normal(&mt));
    }
    void* tmp = xmalloc(n * dtype_size(dt));
    floats_to_dtype(tmp, x, n, dt);
    dtype_to_floats(x, tmp, n, dt);
    free(tmp);
    return x;
}

static double* to_double(const float* x, size_t n) {
    double* y = halloc<double>(n);
    for (size_t i = 0; i < n; i++) y[i] = x[i];
    return y;
}

static void* upload(const float* x, size_t n, DType dt) {
    void* tmp = xmalloc(n * dtype_size(dt));
    floats_to_dtype(tmp, x, n, dt);
    void* p = dalloc(n * dtype_size(dt));
    dev_upload(&bench.dev, p, tmp, n * dtype_size(dt));
    free(tmp);
    return p;
}

// Into an existing device buffer (state a version updates in place, reset before each check).
static void upload_to(void* p, const float* x, size_t n, DType dt) {
    void* tmp = xmalloc(n * dtype_size(dt));
    floats_to_dtype(tmp, x, n, dt);
    dev_upload(&bench.dev, p, tmp, n * dtype_size(dt));
    free(tmp);
}

static float* download(const void* p, size_t n, DType dt) {
    void* tmp = xmalloc(n * dtype_size(dt));
    float* x = halloc<float>(n);
    dev_download(&bench.dev, tmp, p, n * dtype_size(dt));
    dtype_to_floats(x, tmp, n, dt);
    free(tmp);
    return x;
}

// Uniform values in offset + scale * [-1, 1) from the dropout hash, written on the device: for
// timing buffers too large to fill from the host quickly.
template <typename T>
__global__ void random_fill_kernel(T* x, size_t n, uint64_t seed, float scale, float offset) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = from_float<T>(offset + scale * ((float)hash_u32(seed, i) * 4.656612873077393e-10f - 1.0f));
}

static void* device_random(size_t n, DType dt, uint64_t seed, float scale = 1, float offset = 0) {
    void* p = dalloc(n * dtype_size(dt));
    DTYPE_SWITCH(dt, T, random_fill_kernel<T><<<4 * bench.dev.sm_count, 256, 0, bench.dev.stream>>>((T*)p, n, seed, scale, offset));
    cudaCheck(cudaGetLastError());
    return p;
}

// ---- checks and the result line

// The outputs of one version: the one furthest over (or nearest to) its tolerance is reported.
typedef struct {
    double error, tolerance;
} Check;

static Check check_start(void) { return Check{0, 1}; }

template <typename A, typename B>
static void check_output(Check* c, const A* got, const B* want, size_t n, double tolerance) {
    double e = rel_error(got, want, n);
    if (!(e / tolerance <= c->error / c->tolerance)) *c = Check{e, tolerance};
}

static void print_header(const char* family) {
    printf("== %s on %s\n", family, bench.dev.name);
    printf("%-16s %-6s %-4s %10s %9s %-7s %7s %9s %9s %-5s %s\n", "kernel", "shape", "ver", "time_us", "rate", "unit",
           "%ceil", "error", "tol", "check", "what");
}

static void report(const char* kernel, const char* shape, const char* version, const char* what, double us, double bytes,
                   double flops, Check c);

// The v0 line: a device-to-device copy moving `bytes` (half read, half written).
static void report_copy(const char* kernel, const char* shape, double bytes) {
    size_t half = (size_t)(bytes / 2);
    if (half > bench.copy_bytes) {
        cudaCheck(cudaFree(bench.copy_src));
        cudaCheck(cudaFree(bench.copy_dst));
        cudaCheck(cudaMalloc(&bench.copy_src, half));
        cudaCheck(cudaMalloc(&bench.copy_dst, half));
        bench.copy_bytes = half;
    }
    double us = time_us([&] { cudaCheck(cudaMemcpyAsync(bench.copy_dst, bench.copy_src, half, cudaMemcpyDeviceToDevice, bench.dev.stream)); });
    report(kernel, shape, "v0", "a device-to-device copy of the same bytes: the ceiling at this size", us, 2.0 * half, 0, Check{0, 1});
}

// One version's line. flops > 0: TFLOP/s against the GEMM ceiling; else GB/s against the copy,
// after the v0 line at a kernel's first version at this shape.
static void report(const char* kernel, const char* shape, const char* version, const char* what, double us, double bytes,
                   double flops, Check c) {
    char key[64];
    snprintf(key, sizeof(key), "%s %s", kernel, shape);
    if (flops == 0 && strcmp(key, bench.copied)) {
        snprintf(bench.copied, sizeof(bench.copied), "%s", key);
        report_copy(kernel, shape, bytes);
    }
    int ok = c.error <= c.tolerance;
    double rate = flops > 0 ? flops / us * 1e-6 : bytes / us * 1e-3;
    double ceiling = flops > 0 ? bench.gemm_tflops : bench.copy_gbps;
    printf("%-16s %-6s %-4s %10.2f %9.1f %-7s %6.1f%% %9.2e %9.1e %-5s %s\n", kernel, shape, version, us, rate,
           flops > 0 ? "TFLOP/s" : "GB/s", 100 * rate / ceiling, c.error, c.tolerance, ok ? "ok" : "FAIL", what);
    fflush(stdout);
    if (!ok) bench.failures++;
}

// ---- ceilings

// Device-to-device copy of 2 GiB: bytes read plus bytes written over the median time.
static double measure_copy_gbps(void) {
    size_t bytes = (size_t)2 << 30;
    void* src = device_random(bytes / 4, DT_F32, 1);
    void* dst = dalloc(bytes);
    double us = time_us([&] { cudaCheck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, bench.dev.stream)); });
    free_all();
    return 2.0 * bytes / us * 1e-3;
}

// An 8192^3 bf16 GEMM through megatron.h's cuBLASLt path (fp32 accumulation), random operands.
static double measure_gemm_tflops(void) {
    int n = 8192;
    DType saved = bench.dev.dtype;
    bench.dev.dtype = DT_BF16;
    void *a = device_random((size_t)n * n, DT_BF16, 2), *b = device_random((size_t)n * n, DT_BF16, 3), *c = dalloc((size_t)n * n * 2);
    double us = time_us([&] { matmul_forward(&bench.dev, c, a, b, NULL, n, n, n, NULL); });
    free_all();
    bench.dev.dtype = saved;
    return 2.0 * n * n * (double)n / us * 1e-6;
}

// Device, flush buffer, the copy ceiling (and the GEMM ceiling when want_gemm); prints them.
static void bench_init(int want_gemm) {
    device_init(&bench.dev, "cuda", DT_BF16);
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, bench.dev.device_id));
    bench.flush_bytes = 4 * (size_t)prop.l2CacheSize;
    cudaCheck(cudaMalloc(&bench.flush, bench.flush_bytes));
    cudaCheck(cudaEventCreate(&bench.start));
    cudaCheck(cudaEventCreate(&bench.stop));
    bench.copy_gbps = measure_copy_gbps();
    printf("ceiling copy %.1f GB/s\n", bench.copy_gbps);
    if (want_gemm) {
        bench.gemm_tflops = measure_gemm_tflops();
        printf("ceiling gemm_bf16 %.1f TFLOP/s\n", bench.gemm_tflops);
    }
}

static int bench_finish(void) {
    printf("%s\n", bench.failures ? "some checks FAILED" : "all checks passed");
    cudaCheck(cudaFree(bench.flush));
    cudaCheck(cudaFree(bench.copy_src));
    cudaCheck(cudaFree(bench.copy_dst));
    device_free(&bench.dev);
    return bench.failures ? 1 : 0;
}

#endif
