/*
dev/cuda/crossentropy.cu: the fused softmax cross-entropy over the vocabulary (loss and, in
place of the bf16 logits, their gradient), from a three-pass kernel to megatron.h's. The check
runs on CHECK_ROWS rows (every column), the timing on all B T rows.
    make -C dev/cuda crossentropy && dev/cuda/crossentropy
*/
#include "common.h"

#define CHECK_ROWS 1024

// ---------------------------------------------------------------- v1: three passes

// A block per row: the row's maximum, then its sum of exp, then the gradient: three reads of
// the row (the second and third mostly from L2), one value per load.
template <typename T>
__global__ void crossentropy_v1_kernel(float* losses, T* logits, const int* targets, const float* dloss, int V, int Vp) {
    __shared__ float scratch[32];
    int n = blockIdx.x, target = targets[n];
    T* x = logits + (size_t)n * Vp;
    float x_target = to_float(x[target]);  // before the gradient overwrites it
    float m = -FLT_MAX, s = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, to_float(x[i]));
    m = block_reduce<true>(m, scratch);
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(to_float(x[i]) - m);
    s = block_reduce<false>(s, scratch);
    if (threadIdx.x == 0) losses[n] = logf(s) + m - x_target;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x)
        x[i] = from_float<T>(i < V ? expf(to_float(x[i]) - m) / s * dloss[n] - (i == target ? dloss[n] : 0.0f) : 0.0f);
}

static void crossentropy_v1(const Device* d, float* losses, void* logits, const int* targets, const float* dloss, int N, int V, int Vp) {
    DTYPE_SWITCH(d->dtype, T, crossentropy_v1_kernel<T><<<N, 1024, 0, d->stream>>>(losses, (T*)logits, targets, dloss, V, Vp));
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------- v2: online softmax, then the gradient

// (max, sum) of exp: merge two partial results of the online softmax.
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
    float m_new = fmaxf(m, m2);
    s = s * expf(m - m_new) + s2 * expf(m2 - m_new);
    m = m_new;
}

// A block of 1024 threads per row. Pass 1 reads the row once in 16-byte loads keeping each
// thread's running max and sum of exp; pass 2 rereads it (from L2) and writes the gradient.
// Measured at 40% of copy: over 32 registers, so one block per SM, and each thread waits on one
// load at a time (latency-bound, not bandwidth-bound).
template <typename T>
__global__ void __launch_bounds__(1024) crossentropy_v2_kernel(float* losses, T* logits, const int* targets, const float* dloss, int V, int Vp) {
    constexpr int W = 16 / sizeof(T);
    __shared__ float warp_m[32], warp_s[32];
    int n = blockIdx.x, target = targets[n];
    T* x = logits + (size_t)n * Vp;
    float x_target = threadIdx.x == 0 ? to_float(x[target]) : 0.0f;
    float m = -FLT_MAX, s = 0.0f;
    for (int i = threadIdx.x * W; i < V; i += blockDim.x * W) {
        Vec<T, W> p = load_vec<W>(x + i);
        float chunk_m = -FLT_MAX, chunk_s = 0.0f;
        for (int j = 0; j < W; j++)
            if (i + j < V) chunk_m = fmaxf(chunk_m, to_float(p.v[j]));
        for (int j = 0; j < W; j++)
            if (i + j < V) chunk_s += expf(to_float(p.v[j]) - chunk_m);
        online_merge(m, s, chunk_m, chunk_s);
    }
    for (int offset = 16; offset > 0; offset /= 2)
        online_merge(m, s, __shfl_xor_sync(0xffffffff, m, offset), __shfl_xor_sync(0xffffffff, s, offset));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { warp_m[warp] = m; warp_s[warp] = s; }
    __syncthreads();
    m = warp_m[0];
    s = warp_s[0];
    for (int w = 1; w < (int)blockDim.x / 32; w++) online_merge(m, s, warp_m[w], warp_s[w]);
    if (threadIdx.x == 0) losses[n] = logf(s) + m - x_target;
    float scale = dloss[n] / s;
    for (int i = threadIdx.x * W; i < Vp; i += blockDim.x * W) {
        Vec<T, W> p = load_vec<W>(x + i);
        for (int j = 0; j < W; j++) {
            int col = i + j;
            p.v[j] = from_float<T>(col < V ? expf(to_float(p.v[j]) - m) * scale - (col == target ? dloss[n] : 0.0f) : 0.0f);
        }
        store_vec<W>(x + i, p);
    }
}

// Needs Vp a multiple of 16 bytes (true for the shapes here).
static void crossentropy_v2(const Device* d, float* losses, void* logits, const int* targets, const float* dloss, int N, int V, int Vp) {
    DTYPE_SWITCH(d->dtype, T, crossentropy_v2_kernel<T><<<N, 1024, 0, d->stream>>>(losses, (T*)logits, targets, dloss, V, Vp));
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------- the ladder

static const struct {
    const char *version, *what;
    void (*fn)(const Device*, float*, void*, const int*, const float*, int, int, int);
} VERSIONS[] = {
    {"v1", "a block per row: max, sum of exp, gradient: three reads of the row", crossentropy_v1},
    {"v2", "online softmax (max and sum in one read), 16-byte loads, then the gradient", crossentropy_v2},
    {"v3", "megatron.h: the row staged in shared memory by cp.async (one DRAM read), 512 threads, 2 blocks/SM", crossentropy_forward_backward},
};

static int* random_targets(int n, int V, uint32_t seed) {
    MT19937 mt;
    mt_seed(&mt, seed);
    int* t = halloc<int>(n);
    for (int i = 0; i < n; i++) t[i] = (int)(mt_uniform(&mt) * V);
    return t;
}

static void run_shape(const Shape* sh) {
    DType dt = DT_BF16;
    int N = sh->B * sh->T, V = sh->V, Vp = sh->Vp, Nc = CHECK_ROWS;
    size_t es = dtype_size(dt);
    bench.dev.dtype = dt;

    size_t ncheck = (size_t)Nc * Vp;
    float *logits = host_random(ncheck, dt, 31, 2), *dloss = halloc<float>(Nc);
    int* targets = random_targets(Nc, V, 32);
    for (int n = 0; n < Nc; n++) dloss[n] = 1.0f / Nc;
    double *grad_ref = to_double(logits, ncheck), *losses_ref = halloc<double>(Nc);
    crossentropy_forward_backward_cpu(losses_ref, grad_ref, targets, to_double(dloss, Nc), Nc, V, Vp);
    void* d_logits = dalloc(ncheck * es);
    float *d_losses = (float*)dalloc(Nc * sizeof(float)), *d_dloss = (float*)upload(dloss, Nc, DT_F32);
    int* d_targets = (int*)dalloc(Nc * sizeof(int));
    dev_upload(&bench.dev, d_targets, targets, Nc * sizeof(int));

    // timing: all rows, logits random on the device (the gradient overwrites them; the time does not depend on the values)
    int* t_targets_host = random_targets(N, V, 33);
    float* t_dloss_host = halloc<float>(N);
    for (int n = 0; n < N; n++) t_dloss_host[n] = 1.0f / N;
    void* t_logits = device_random((size_t)N * Vp, dt, 34, 4);
    float *t_losses = (float*)dalloc(N * sizeof(float)), *t_dloss = (float*)upload(t_dloss_host, N, DT_F32);
    int* t_targets = (int*)dalloc(N * sizeof(int));
    dev_upload(&bench.dev, t_targets, t_targets_host, N * sizeof(int));
    double bytes = 2.0 * N * Vp * es + 3.0 * N * sizeof(float);

    for (const auto& v : VERSIONS) {
        upload_to(d_logits, logits, ncheck, dt);
        poison(d_losses, Nc * sizeof(float));
        v.fn(&bench.dev, d_losses, d_logits, d_targets, d_dloss, Nc, V, Vp);
        Check c = check_start();
        check_output(&c, download(d_losses, Nc, DT_F32), losses_ref, Nc, TOL_F32);
        check_output(&c, download(d_logits, ncheck, dt), grad_ref, ncheck, TOL_BF16);
        double us = time_us([&] { v.fn(&bench.dev, t_losses, t_logits, t_targets, t_dloss, N, V, Vp); });
        report("crossentropy", sh->name, v.version, v.what, us, bytes, 0, c);
    }
    free_all();
    free_host_all();
}

int main(void) {
    bench_init(0);
    print_header("softmax cross-entropy, forward and backward fused (bf16 logits)");
    for (int s = 0; s < N_SHAPES; s++) run_shape(&SHAPES[s]);
    return bench_finish();
}
