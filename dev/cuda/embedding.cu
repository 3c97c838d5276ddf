/*
dev/cuda/embedding.cu: token + position embedding forward and its backward into fp32 dwte and
dwpe, from the plainest kernels to megatron.h's. The backward must be deterministic in
megatron.h (no float atomics): rows are grouped by token by sorting (token, row) keys. Tokens are
drawn log-uniformly over the vocabulary (P(token < k) = ln(k+1) / ln(V+1)), a heavy head as in
text: a few tokens take long runs of rows.
    make -C dev/cuda embedding && dev/cuda/embedding
*/
#include "common.h"

// ---------------------------------------------------------------- forward v1: one element per thread

template <typename T>
__global__ void embedding_forward_v1_kernel(T* out, const int* tokens, const T* wte, const T* wpe, int B, int C, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    size_t r = i / C, c = i % C;
    out[i] = from_float<T>(to_float(wte[(size_t)tokens[r] * C + c]) + to_float(wpe[(r / B) * C + c]));
}

static void embedding_forward_v1(const Device* d, void* out, const int* tokens, const void* wte, const void* wpe, int B, int T, int C) {
    size_t n = (size_t)B * T * C;
    DTYPE_SWITCH(d->dtype, T_, embedding_forward_v1_kernel<T_><<<CEIL_DIV(n, 256), 256, 0, d->stream>>>(
        (T_*)out, tokens, (const T_*)wte, (const T_*)wpe, B, C, n));
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------- backward v1: float atomics

template <typename T>
__global__ void embedding_backward_v1_kernel(float* dwte, float* dwpe, const T* dout, const int* tokens, int B, int C, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    size_t r = i / C, c = i % C;
    float g = to_float(dout[i]);
    atomicAdd(dwte + (size_t)tokens[r] * C + c, g);
    atomicAdd(dwpe + (r / B) * C + c, g);
}

static void embedding_backward_v1(const Device* d, float* dwte, float* dwpe, const void* dout, const int* tokens, int B, int T, int C) {
    size_t n = (size_t)B * T * C;
    DTYPE_SWITCH(d->dtype, T_, embedding_backward_v1_kernel<T_><<<CEIL_DIV(n, 256), 256, 0, d->stream>>>(
        dwte, dwpe, (const T_*)dout, tokens, B, C, n));
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------- backward v2: the previous megatron.h sort

// A bitonic sort of all the keys padded to a power of two P: tiles of BITONIC_TILE keys sort in
// shared memory, every merge stride of a tile or more takes a pass over global memory (for
// 16384 rows: 4 tile launches and 6 global ones). The segment sums after it are megatron.h's.
#define BITONIC_TILE 2048

__global__ void embedding_keys_v2_kernel(uint64_t* keys, const int* tokens, int N, unsigned P) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < P) keys[i] = i < (unsigned)N ? ((uint64_t)(uint32_t)tokens[i] << 32) | i : UINT64_MAX;
}

// All steps with stride j < tile for merge sizes k_first .. k_last, in shared memory.
__global__ void bitonic_tile_v2_kernel(uint64_t* keys, unsigned k_first, unsigned k_last) {
    __shared__ uint64_t tile[BITONIC_TILE];
    unsigned n = 2 * blockDim.x, base = blockIdx.x * n;
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) tile[i] = keys[base + i];
    __syncthreads();
    for (unsigned k = k_first; k <= k_last; k *= 2)
        for (unsigned j = (k < n ? k : n) / 2; j > 0; j /= 2) {
            bitonic_exchange(tile, base, threadIdx.x, j, k);
            __syncthreads();
        }
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) keys[base + i] = tile[i];
}

__global__ void bitonic_global_v2_kernel(uint64_t* keys, unsigned j, unsigned k) {
    bitonic_exchange(keys, 0, blockIdx.x * blockDim.x + threadIdx.x, j, k);
}

static void embedding_backward_v2(const Device* d, float* dwte, float* dwpe, const void* dout, const int* tokens, int B, int T, int C) {
    int N = B * T;
    unsigned P = 2;
    while (P < (unsigned)N) P *= 2;
    uint64_t* keys = (uint64_t*)pool_alloc(d, P * sizeof(uint64_t));
    embedding_keys_v2_kernel<<<CEIL_DIV(P, 256), 256, 0, d->stream>>>(keys, tokens, N, P);
    unsigned tile = P < BITONIC_TILE ? P : BITONIC_TILE;
    bitonic_tile_v2_kernel<<<P / tile, tile / 2, 0, d->stream>>>(keys, 2, tile);
    for (unsigned k = 2 * tile; k <= P; k *= 2) {
        for (unsigned j = k / 2; j >= tile; j /= 2) bitonic_global_v2_kernel<<<P / 2 / 256, 256, 0, d->stream>>>(keys, j, k);
        bitonic_tile_v2_kernel<<<P / tile, tile / 2, 0, d->stream>>>(keys, k, k);
    }
    embedding_backward_sorted(d, dwte, dwpe, dout, keys, B, T, C);  // the first N keys: padding sorts last
    pool_free(d, keys);
}

// ---------------------------------------------------------------- the ladder

typedef void (*ForwardFn)(const Device*, void*, const int*, const void*, const void*, int, int, int);
typedef void (*BackwardFn)(const Device*, float*, float*, const void*, const int*, int, int, int);

static const struct {
    const char *version, *what;
    ForwardFn fn;
} FORWARD[] = {
    {"v1", "one element per thread", embedding_forward_v1},
    {"v2", "megatron.h: a block per row, 16-byte loads", embedding_forward},
};

static const struct {
    const char *version, *what;
    BackwardFn fn;
} BACKWARD[] = {
    {"v1", "fp32 atomicAdd per element (not reproducible)", embedding_backward_v1},
    {"v2", "previous megatron.h: bitonic sort with global merge passes, then segment sums", embedding_backward_v2},
    {"v3", "megatron.h: tiles sorted in shared memory, merged by rank (2 launches), then segment sums", embedding_backward},
};

// Log-uniform tokens in [0, V); also counts the distinct ones (*unique).
static int* random_tokens(int n, int V, uint32_t seed, int* unique) {
    MT19937 mt;
    mt_seed(&mt, seed);
    int* tokens = halloc<int>(n);
    char* seen = (char*)xcalloc(V, 1);
    *unique = 0;
    for (int i = 0; i < n; i++) {
        int t = (int)floor(exp(mt_uniform(&mt) * log(V + 1.0))) - 1;
        tokens[i] = t < 0 ? 0 : t >= V ? V - 1 : t;
        if (!seen[tokens[i]]) (*unique)++, seen[tokens[i]] = 1;
    }
    free(seen);
    return tokens;
}

static void run_shape(const Shape* sh) {
    DType dt = DT_BF16;
    int B = sh->B, T = sh->T, C = sh->C, N = B * T, Vp = sh->Vp, unique;
    size_t NC = (size_t)N * C, VC = (size_t)Vp * C, TC = (size_t)T * C, es = dtype_size(dt);
    bench.dev.dtype = dt;
    int* tokens = random_tokens(N, sh->V, 91, &unique);
    float *wte = host_random(VC, dt, 92, 0.02), *wpe = host_random(TC, dt, 93, 0.01), *dout = host_random(NC, dt, 94);
    float *dwte0 = host_random(VC, DT_F32, 95), *dwpe0 = host_random(TC, DT_F32, 96);
    double *out_ref = halloc<double>(NC), *dwte_ref = to_double(dwte0, VC), *dwpe_ref = to_double(dwpe0, TC);
    embedding_forward_cpu(out_ref, tokens, to_double(wte, VC), to_double(wpe, TC), B, T, C);
    embedding_backward_cpu(dwte_ref, dwpe_ref, to_double(dout, NC), tokens, B, T, C);
    int* d_tokens = (int*)dalloc(N * sizeof(int));
    dev_upload(&bench.dev, d_tokens, tokens, N * sizeof(int));
    void *d_wte = upload(wte, VC, dt), *d_wpe = upload(wpe, TC, dt), *d_out = dalloc(NC * es), *d_dout = upload(dout, NC, dt);
    float *d_dwte = (float*)dalloc(VC * sizeof(float)), *d_dwpe = (float*)dalloc(TC * sizeof(float));
    printf("(%s: %d rows, %d distinct tokens)\n", sh->name, N, unique);

    double forward_bytes = 2.0 * NC * es + TC * es + N * sizeof(int);
    for (const auto& v : FORWARD) {
        poison(d_out, NC * es);
        auto run = [&] { v.fn(&bench.dev, d_out, d_tokens, d_wte, d_wpe, B, T, C); };
        run();
        Check c = check_start();
        check_output(&c, download(d_out, NC, dt), out_ref, NC, TOL_BF16);
        report("embedding_fwd", sh->name, v.version, v.what, time_us(run), forward_bytes, 0, c);
    }
    // dout read, tokens read, the distinct dwte rows and all dwpe rows read and written
    double backward_bytes = NC * es + N * sizeof(int) + 2.0 * ((double)unique * C + TC) * sizeof(float);
    for (const auto& v : BACKWARD) {
        upload_to(d_dwte, dwte0, VC, DT_F32);
        upload_to(d_dwpe, dwpe0, TC, DT_F32);
        auto run = [&] { v.fn(&bench.dev, d_dwte, d_dwpe, d_dout, d_tokens, B, T, C); };
        run();
        Check c = check_start();
        check_output(&c, download(d_dwte, VC, DT_F32), dwte_ref, VC, TOL_F32);
        check_output(&c, download(d_dwpe, TC, DT_F32), dwpe_ref, TC, TOL_F32);
        report("embedding_bwd", sh->name, v.version, v.what, time_us(run), backward_bytes, 0, c);
    }
    free_all();
    free_host_all();
}

int main(void) {
    bench_init(0);
    print_header("token and position embedding (bf16, fp32 gradients)");
    for (int s = 0; s < N_SHAPES; s++) run_shape(&SHAPES[s]);
    return bench_finish();
}
