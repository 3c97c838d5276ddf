/*
dev/cuda/layernorm.cu: LayerNorm forward and backward, from the plainest kernel to megatron.h's
(bf16 storage, fp32 statistics and parameter gradients, as a --bf16 run).
    make -C dev/cuda layernorm && dev/cuda/layernorm
*/
#include "common.h"

// ---------------------------------------------------------------- forward

// v1: one thread per row, three passes over it. Neighbouring threads read addresses a row
// apart, so every load is a transaction of its own.
template <typename T>
__global__ void layernorm_forward_v1_kernel(T* out, float* mean, float* rstd, const T* inp, const T* weight, const T* bias, int N, int C) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= N) return;
    const T* x = inp + (size_t)r * C;
    float sum = 0, sq = 0;
    for (int c = 0; c < C; c++) sum += to_float(x[c]);
    float m = sum / C;
    for (int c = 0; c < C; c++) sq += (to_float(x[c]) - m) * (to_float(x[c]) - m);
    float s = 1.0f / sqrtf(sq / C + (float)LAYERNORM_EPS);
    for (int c = 0; c < C; c++) out[(size_t)r * C + c] = from_float<T>((to_float(x[c]) - m) * s * to_float(weight[c]) + to_float(bias[c]));
    mean[r] = m;
    rstd[r] = s;
}

static void layernorm_forward_v1(const Device* d, void* out, float* mean, float* rstd, const void* inp, const void* weight,
                                 const void* bias, int N, int C) {
    DTYPE_SWITCH(d->dtype, T, layernorm_forward_v1_kernel<T><<<CEIL_DIV(N, 256), 256, 0, d->stream>>>(
        (T*)out, mean, rstd, (const T*)inp, (const T*)weight, (const T*)bias, N, C));
    cudaCheck(cudaGetLastError());
}

// v2: a warp per row, 16-byte loads; three passes over the row in loops of run-time length, the
// second and third mostly from L1.
template <typename T, int W>
__global__ void layernorm_forward_v2_kernel(T* out, float* mean, float* rstd, const T* inp, const T* weight, const T* bias, int N, int C) {
    int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= N) return;
    const T* x = inp + (size_t)r * C;
    float sum = 0, sq = 0;
    for (int c = lane * W; c < C; c += 32 * W) {
        Vec<T, W> xv = load_vec<W>(x + c);
        for (int k = 0; k < W; k++) sum += to_float(xv.v[k]);
    }
    float m = warp_sum(sum) / C;
    for (int c = lane * W; c < C; c += 32 * W) {
        Vec<T, W> xv = load_vec<W>(x + c);
        for (int k = 0; k < W; k++) sq += (to_float(xv.v[k]) - m) * (to_float(xv.v[k]) - m);
    }
    float s = 1.0f / sqrtf(warp_sum(sq) / C + (float)LAYERNORM_EPS);
    for (int c = lane * W; c < C; c += 32 * W) {
        Vec<T, W> xv = load_vec<W>(x + c), wv = load_vec<W>(weight + c), bv = load_vec<W>(bias + c), ov;
        for (int k = 0; k < W; k++) ov.v[k] = from_float<T>((to_float(xv.v[k]) - m) * s * to_float(wv.v[k]) + to_float(bv.v[k]));
        store_vec<W>(out + (size_t)r * C + c, ov);
    }
    mean[r] = m;
    rstd[r] = s;
}

static void layernorm_forward_v2(const Device* d, void* out, float* mean, float* rstd, const void* inp, const void* weight,
                                 const void* bias, int N, int C) {
    DTYPE_SWITCH(d->dtype, T, layernorm_forward_v2_kernel<T, 16 / sizeof(T)><<<CEIL_DIV(N, 8), 256, 0, d->stream>>>(
        (T*)out, mean, rstd, (const T*)inp, (const T*)weight, (const T*)bias, N, C));
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------- backward

// v1: one thread per row for dinp (two passes over its row, uncoalesced as the forward's v1).
template <typename T>
__global__ void layernorm_backward_dinp_v1_kernel(T* dinp, const T* dout, const T* inp, const T* weight, const float* mean,
                                                  const float* rstd, int N, int C) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= N) return;
    const T *x = inp + (size_t)r * C, *dy = dout + (size_t)r * C;
    float m = mean[r], s = rstd[r], sum_g = 0, sum_gx = 0;
    for (int c = 0; c < C; c++) {
        float g = to_float(dy[c]) * to_float(weight[c]);
        sum_g += g;
        sum_gx += g * (to_float(x[c]) - m) * s;
    }
    for (int c = 0; c < C; c++) {
        float xhat = (to_float(x[c]) - m) * s;
        T* dx = dinp + (size_t)r * C + c;
        *dx = from_float<T>(to_float(*dx) + s * (to_float(dy[c]) * to_float(weight[c]) - sum_g / C - xhat * sum_gx / C));
    }
}

// v2: a warp per row; lane l takes channels l, l + 32, ...: neighbouring lanes, neighbouring elements.
template <typename T>
__global__ void layernorm_backward_dinp_v2_kernel(T* dinp, const T* dout, const T* inp, const T* weight, const float* mean,
                                                  const float* rstd, int N, int C) {
    int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= N) return;
    const T *x = inp + (size_t)r * C, *dy = dout + (size_t)r * C;
    float m = mean[r], s = rstd[r], sum_g = 0, sum_gx = 0;
    for (int c = lane; c < C; c += 32) {
        float g = to_float(dy[c]) * to_float(weight[c]);
        sum_g += g;
        sum_gx += g * (to_float(x[c]) - m) * s;
    }
    sum_g = warp_sum(sum_g);
    sum_gx = warp_sum(sum_gx);
    for (int c = lane; c < C; c += 32) {
        float xhat = (to_float(x[c]) - m) * s;
        T* dx = dinp + (size_t)r * C + c;
        *dx = from_float<T>(to_float(*dx) + s * (to_float(dy[c]) * to_float(weight[c]) - sum_g / C - xhat * sum_gx / C));
    }
}

// dweight and dbias for v1 and v2: thread c adds down all N rows, reading x and dout again.
template <typename T>
__global__ void layernorm_backward_params_kernel(float* dweight, float* dbias, const T* dout, const T* inp, const float* mean,
                                                 const float* rstd, int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float dw = 0, db = 0;
    for (int r = 0; r < N; r++) {
        float dy = to_float(dout[(size_t)r * C + c]);
        dw += dy * (to_float(inp[(size_t)r * C + c]) - mean[r]) * rstd[r];
        db += dy;
    }
    dweight[c] += dw;
    dbias[c] += db;
}

static void layernorm_backward_v1(const Device* d, void* dinp, float* dweight, float* dbias, const void* dout, const void* inp,
                                  const void* weight, const float* mean, const float* rstd, int N, int C) {
    DTYPE_SWITCH(d->dtype, T, {
        layernorm_backward_dinp_v1_kernel<T><<<CEIL_DIV(N, 256), 256, 0, d->stream>>>((T*)dinp, (const T*)dout, (const T*)inp,
                                                                                       (const T*)weight, mean, rstd, N, C);
        layernorm_backward_params_kernel<T><<<CEIL_DIV(C, 128), 128, 0, d->stream>>>(dweight, dbias, (const T*)dout, (const T*)inp, mean, rstd, N, C);
    });
    cudaCheck(cudaGetLastError());
}

static void layernorm_backward_v2(const Device* d, void* dinp, float* dweight, float* dbias, const void* dout, const void* inp,
                                  const void* weight, const float* mean, const float* rstd, int N, int C) {
    DTYPE_SWITCH(d->dtype, T, {
        layernorm_backward_dinp_v2_kernel<T><<<CEIL_DIV(N, 8), 256, 0, d->stream>>>((T*)dinp, (const T*)dout, (const T*)inp,
                                                                                    (const T*)weight, mean, rstd, N, C);
        layernorm_backward_params_kernel<T><<<CEIL_DIV(C, 128), 128, 0, d->stream>>>(dweight, dbias, (const T*)dout, (const T*)inp, mean, rstd, N, C);
    });
    cudaCheck(cudaGetLastError());
}

// v3 and v4 run one of megatron.h's row kernels into per-chunk partial rows, then its column sums.
template <typename Rows>
static void layernorm_backward_chunks(const Device* d, float* dweight, float* dbias, int N, int C, Rows rows) {
    int chunks = row_chunks(N);
    float* partials = (float*)pool_alloc(d, 2 * (size_t)chunks * C * sizeof(float));
    rows(partials, chunks);
    column_sum(d, dweight, dbias, NULL, 2, partials, chunks, C);
    pool_free(d, partials);
}

// v3: the previous megatron.h kernel, now megatron.h's path for rows too wide for registers:
// one row at a time per block, reread from L1 after the two sums, per-channel sums in shared memory.
// (The shapes here are 16-byte multiples, narrow enough for registers.)
static void layernorm_backward_v3(const Device* d, void* dinp, float* dweight, float* dbias, const void* dout, const void* inp,
                                  const void* weight, const float* mean, const float* rstd, int N, int C) {
    layernorm_backward_chunks(d, dweight, dbias, N, C, [&](float* partials, int chunks) {
        DTYPE_SWITCH(d->dtype, T, layernorm_backward_smem<T, 16 / sizeof(T)>(d, partials, chunks, (T*)dinp, (const T*)dout, (const T*)inp,
                                                                            (const T*)weight, mean, rstd, N, C));
    });
}

// v4: megatron.h's register-row kernel with the compiler's own register count.
static void layernorm_backward_v4(const Device* d, void* dinp, float* dweight, float* dbias, const void* dout, const void* inp,
                                  const void* weight, const float* mean, const float* rstd, int N, int C) {
    layernorm_backward_chunks(d, dweight, dbias, N, C, [&](float* partials, int chunks) {
        DTYPE_SWITCH(d->dtype, T, layernorm_backward_rows<T, 16 / sizeof(T), 255, 2>(d, partials, chunks, (T*)dinp, (const T*)dout, (const T*)inp,
                                                                                  (const T*)weight, mean, rstd, N, C));
    });
}

// v5: megatron.h's (without its dinp_sum)
static void layernorm_backward_megatron(const Device* d, void* dinp, float* dweight, float* dbias, const void* dout, const void* inp,
                                        const void* weight, const float* mean, const float* rstd, int N, int C) {
    layernorm_backward(d, dinp, dweight, dbias, NULL, dout, inp, weight, mean, rstd, N, C);
}

// ---------------------------------------------------------------- the ladder

typedef void (*ForwardFn)(const Device*, void*, float*, float*, const void*, const void*, const void*, int, int);
typedef void (*BackwardFn)(const Device*, void*, float*, float*, const void*, const void*, const void*, const float*, const float*, int, int);

static const struct {
    const char *version, *what;
    ForwardFn fn;
} FORWARD[] = {
    {"v1", "one thread per row, three passes, uncoalesced", layernorm_forward_v1},
    {"v2", "a warp per row, 16-byte loads, the 2nd and 3rd pass from L1", layernorm_forward_v2},
    {"v3", "megatron.h: the row in registers (one read), a team of warps per row where it is wide", layernorm_forward},
};

static const struct {
    const char *version, *what;
    BackwardFn fn;
} BACKWARD[] = {
    {"v1", "a thread per row for dinp + a thread per channel for dweight/dbias (x, dout read twice)", layernorm_backward_v1},
    {"v2", "a warp per row for dinp + the same channel kernel", layernorm_backward_v2},
    {"v3", "previous megatron.h: a block per chunk of rows, one row at a time, sums in shared memory", layernorm_backward_v3},
    {"v4", "warp teams hold whole rows in registers, sums in registers", layernorm_backward_v4},
    {"v5", "megatron.h: v4, capped at 168 registers (__maxnreg__) where a row team is several warps", layernorm_backward_megatron},
};

static void run_shape(const Shape* sh) {
    DType dt = DT_BF16;
    int N = sh->B * sh->T, C = sh->C;
    size_t NC = (size_t)N * C, es = dtype_size(dt);
    bench.dev.dtype = dt;

    float *x = host_random(NC, dt, 1, 1, 0.3), *weight = host_random(C, dt, 2, 0.1, 1), *bias = host_random(C, dt, 3, 0.1);
    double *x_d = to_double(x, NC), *weight_d = to_double(weight, C), *bias_d = to_double(bias, C);
    double *out_ref = halloc<double>(NC), *mean_ref = halloc<double>(N), *rstd_ref = halloc<double>(N);
    layernorm_forward_cpu(out_ref, mean_ref, rstd_ref, x_d, weight_d, bias_d, N, C);
    void *d_x = upload(x, NC, dt), *d_weight = upload(weight, C, dt), *d_bias = upload(bias, C, dt), *d_out = dalloc(NC * es);
    float *d_mean = (float*)dalloc(N * sizeof(float)), *d_rstd = (float*)dalloc(N * sizeof(float));
    double forward_bytes = 2.0 * NC * es + 2.0 * C * es + 2.0 * N * sizeof(float);
    for (const auto& v : FORWARD) {
        poison(d_out, NC * es);
        poison(d_mean, N * sizeof(float));
        poison(d_rstd, N * sizeof(float));
        v.fn(&bench.dev, d_out, d_mean, d_rstd, d_x, d_weight, d_bias, N, C);
        Check c = check_start();
        check_output(&c, download(d_out, NC, dt), out_ref, NC, TOL_BF16);
        check_output(&c, download(d_mean, N, DT_F32), mean_ref, N, TOL_F32);
        check_output(&c, download(d_rstd, N, DT_F32), rstd_ref, N, TOL_F32);
        double us = time_us([&] { v.fn(&bench.dev, d_out, d_mean, d_rstd, d_x, d_weight, d_bias, N, C); });
        report("layernorm_fwd", sh->name, v.version, v.what, us, forward_bytes, 0, c);
    }

    // Backward from the statistics as the forward stores them (fp32), the same for every version.
    float *mean = halloc<float>(N), *rstd = halloc<float>(N);
    for (int r = 0; r < N; r++) mean[r] = (float)mean_ref[r], rstd[r] = (float)rstd_ref[r];
    float *dout = host_random(NC, dt, 4), *dinp0 = host_random(NC, dt, 5), *dweight0 = host_random(C, DT_F32, 6), *dbias0 = host_random(C, DT_F32, 7);
    double *dinp_ref = to_double(dinp0, NC), *dweight_ref = to_double(dweight0, C), *dbias_ref = to_double(dbias0, C);
    layernorm_backward_cpu(dinp_ref, dweight_ref, dbias_ref, (double*)NULL, to_double(dout, NC), x_d, weight_d, to_double(mean, N), to_double(rstd, N), N, C);
    void *d_dout = upload(dout, NC, dt), *d_dinp = dalloc(NC * es);
    float *d_dweight = (float*)dalloc(C * sizeof(float)), *d_dbias = (float*)dalloc(C * sizeof(float));
    float *d_mean_f = (float*)upload(mean, N, DT_F32), *d_rstd_f = (float*)upload(rstd, N, DT_F32);
    double backward_bytes = 4.0 * NC * es + C * es + 2.0 * N * sizeof(float) + 4.0 * C * sizeof(float);
    for (const auto& v : BACKWARD) {
        upload_to(d_dinp, dinp0, NC, dt);
        upload_to(d_dweight, dweight0, C, DT_F32);
        upload_to(d_dbias, dbias0, C, DT_F32);
        auto run = [&] { v.fn(&bench.dev, d_dinp, d_dweight, d_dbias, d_dout, d_x, d_weight, d_mean_f, d_rstd_f, N, C); };
        run();
        Check c = check_start();
        check_output(&c, download(d_dinp, NC, dt), dinp_ref, NC, TOL_BF16);
        check_output(&c, download(d_dweight, C, DT_F32), dweight_ref, C, TOL_F32);
        check_output(&c, download(d_dbias, C, DT_F32), dbias_ref, C, TOL_F32);
        report("layernorm_bwd", sh->name, v.version, v.what, time_us(run), backward_bytes, 0, c);
    }
    free_all();
    free_host_all();
}

int main(void) {
    bench_init(0);
    print_header("LayerNorm (bf16)");
    for (int s = 0; s < N_SHAPES; s++) run_shape(&SHAPES[s]);
    return bench_finish();
}
