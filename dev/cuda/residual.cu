/*
dev/cuda/residual.cu: the elementwise fusions of a transformer layer, from the plainest kernel
to megatron.h's: GELU (tanh) forward and backward over the MLP's [B T, 4C], and
bias-dropout-add forward and backward as the training loop calls them (out = residual +
dropout(x + bias); backward: dx = mask(dout), dbias += column sums, the residual's gradient
already in place). Dropout at p = 0 (dev/bench_gpt.sh) and p = 0.1 (Megatron's default), whose
mask costs a 64-bit hash per element.
    make -C dev/cuda residual && dev/cuda/residual
*/
#include "common.h"

// ---------------------------------------------------------------- GELU v1: one element per thread

template <typename T>
__global__ void gelu_v1_kernel(T* out, const T* a, const T* b, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_float(a[i]);
    out[i] = from_float<T>(b ? to_float(b[i]) * gelu_derivative(x) : gelu_value(x));
}

static void gelu_forward_v1(const Device* d, void* out, const void* inp, size_t n) {
    DTYPE_SWITCH(d->dtype, T, gelu_v1_kernel<T><<<CEIL_DIV(n, 256), 256, 0, d->stream>>>((T*)out, (const T*)inp, (const T*)NULL, n));
    cudaCheck(cudaGetLastError());
}

static void gelu_backward_v1(const Device* d, void* dinp, const void* inp, const void* dout, size_t n) {
    DTYPE_SWITCH(d->dtype, T, gelu_v1_kernel<T><<<CEIL_DIV(n, 256), 256, 0, d->stream>>>((T*)dinp, (const T*)inp, (const T*)dout, n));
    cudaCheck(cudaGetLastError());
}

// ---------------------------------------------------------------- bias-dropout-add v1: one element per thread

template <typename T>
__global__ void residual_forward_v1_kernel(T* out, const T* residual, const T* x, const T* bias, float p, uint64_t seed, size_t n, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = from_float<T>(to_float(residual[i]) + (to_float(x[i]) + to_float(bias[i % C])) * dropout_factor(seed, i, p));
}

static void residual_forward_v1(const Device* d, void* out, const void* residual, const void* x, const void* bias, float p, uint64_t seed, int N, int C) {
    size_t n = (size_t)N * C;
    DTYPE_SWITCH(d->dtype, T, residual_forward_v1_kernel<T><<<CEIL_DIV(n, 256), 256, 0, d->stream>>>(
        (T*)out, (const T*)residual, (const T*)x, (const T*)bias, p, seed, n, C));
    cudaCheck(cudaGetLastError());
}

// v1 backward: dx elementwise, then dbias by a thread per channel walking all N rows (dout read twice).
template <typename T>
__global__ void residual_dx_v1_kernel(T* dx, const T* dout, float p, uint64_t seed, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dx[i] = from_float<T>(to_float(dout[i]) * dropout_factor(seed, i, p));
}

template <typename T>
__global__ void residual_dbias_v1_kernel(float* dbias, const T* dout, float p, uint64_t seed, int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float sum = 0;
    for (int r = 0; r < N; r++) sum += to_float(dout[(size_t)r * C + c]) * dropout_factor(seed, (size_t)r * C + c, p);
    dbias[c] += sum;
}

static void residual_backward_v1(const Device* d, void* dx, float* dbias, const void* dout, float p, uint64_t seed, int N, int C) {
    size_t n = (size_t)N * C;
    DTYPE_SWITCH(d->dtype, T, {
        residual_dx_v1_kernel<T><<<CEIL_DIV(n, 256), 256, 0, d->stream>>>((T*)dx, (const T*)dout, p, seed, n);
        residual_dbias_v1_kernel<T><<<CEIL_DIV(C, 128), 128, 0, d->stream>>>(dbias, (const T*)dout, p, seed, N, C);
    });
    cudaCheck(cudaGetLastError());
}

static void residual_backward_megatron(const Device* d, void* dx, float* dbias, const void* dout, float p, uint64_t seed, int N, int C) {
    residual_dropout_backward(d, NULL, dx, dbias, dout, p, seed, N, C);
}

// ---------------------------------------------------------------- the ladders

static const struct {
    const char *version, *what;
    void (*forward)(const Device*, void*, const void*, size_t);
    void (*backward)(const Device*, void*, const void*, const void*, size_t);
} GELU[] = {
    {"v1", "one element per thread", gelu_forward_v1, gelu_backward_v1},
    {"v2", "megatron.h: 16-byte loads and stores", gelu_forward, gelu_backward},
};

static const struct {
    const char *version, *what;
    void (*fn)(const Device*, void*, const void*, const void*, const void*, float, uint64_t, int, int);
} RESIDUAL_FORWARD[] = {
    {"v1", "one element per thread", residual_forward_v1},
    {"v2", "megatron.h: 16-byte loads and stores", residual_dropout_forward},
};

static const struct {
    const char *version, *what;
    void (*fn)(const Device*, void*, float*, const void*, float, uint64_t, int, int);
} RESIDUAL_BACKWARD[] = {
    {"v1", "dx one element per thread + a thread per channel for dbias (dout read twice)", residual_backward_v1},
    {"v2", "megatron.h: a block per chunk of rows, one row's loads in flight per thread", residual_backward_megatron},
};

static void run_gelu(const Shape* sh) {
    DType dt = DT_BF16;
    size_t n = (size_t)sh->B * sh->T * 4 * sh->C, es = dtype_size(dt);
    bench.dev.dtype = dt;
    float *inp = host_random(n, dt, 41, 2), *dout = host_random(n, dt, 42);
    double *inp_d = to_double(inp, n), *out_ref = halloc<double>(n), *dinp_ref = halloc<double>(n);
    gelu_forward_cpu(out_ref, inp_d, n);
    gelu_backward_cpu(dinp_ref, inp_d, to_double(dout, n), n);
    void *d_inp = upload(inp, n, dt), *d_dout = upload(dout, n, dt), *d_out = dalloc(n * es);
    for (const auto& v : GELU) {
        poison(d_out, n * es);
        v.forward(&bench.dev, d_out, d_inp, n);
        Check c = check_start();
        check_output(&c, download(d_out, n, dt), out_ref, n, TOL_BF16);
        report("gelu_fwd", sh->name, v.version, v.what, time_us([&] { v.forward(&bench.dev, d_out, d_inp, n); }), 2.0 * n * es, 0, c);
    }
    for (const auto& v : GELU) {
        poison(d_out, n * es);
        v.backward(&bench.dev, d_out, d_inp, d_dout, n);
        Check c = check_start();
        check_output(&c, download(d_out, n, dt), dinp_ref, n, TOL_BF16);
        report("gelu_bwd", sh->name, v.version, v.what, time_us([&] { v.backward(&bench.dev, d_out, d_inp, d_dout, n); }), 3.0 * n * es, 0, c);
    }
    free_all();
    free_host_all();
}

static void run_residual(const Shape* sh, float p, const char* forward_name, const char* backward_name) {
    DType dt = DT_BF16;
    int N = sh->B * sh->T, C = sh->C;
    size_t n = (size_t)N * C, es = dtype_size(dt);
    uint64_t seed = 1234;
    bench.dev.dtype = dt;
    float *residual = host_random(n, dt, 51), *x = host_random(n, dt, 52), *bias = host_random(C, dt, 53), *dout = host_random(n, dt, 54);
    float* dbias0 = host_random(C, DT_F32, 55);
    double *out_ref = halloc<double>(n), *dx_ref = halloc<double>(n), *dbias_ref = to_double(dbias0, C);
    residual_dropout_forward_cpu(out_ref, to_double(residual, n), to_double(x, n), to_double(bias, C), p, seed, n, C);
    residual_dropout_backward_cpu((double*)NULL, dx_ref, dbias_ref, to_double(dout, n), p, seed, N, C);
    void *d_residual = upload(residual, n, dt), *d_x = upload(x, n, dt), *d_bias = upload(bias, C, dt), *d_out = dalloc(n * es);
    void *d_dout = upload(dout, n, dt), *d_dx = dalloc(n * es);
    float* d_dbias = (float*)dalloc(C * sizeof(float));
    for (const auto& v : RESIDUAL_FORWARD) {
        poison(d_out, n * es);
        auto run = [&] { v.fn(&bench.dev, d_out, d_residual, d_x, d_bias, p, seed, N, C); };
        run();
        Check c = check_start();
        check_output(&c, download(d_out, n, dt), out_ref, n, TOL_BF16);
        report(forward_name, sh->name, v.version, v.what, time_us(run), 3.0 * n * es + C * es, 0, c);
    }
    for (const auto& v : RESIDUAL_BACKWARD) {
        poison(d_dx, n * es);
        upload_to(d_dbias, dbias0, C, DT_F32);
        auto run = [&] { v.fn(&bench.dev, d_dx, d_dbias, d_dout, p, seed, N, C); };
        run();
        Check c = check_start();
        check_output(&c, download(d_dx, n, dt), dx_ref, n, TOL_BF16);
        check_output(&c, download(d_dbias, C, DT_F32), dbias_ref, C, TOL_F32);
        report(backward_name, sh->name, v.version, v.what, time_us(run), 2.0 * n * es + 2.0 * C * sizeof(float), 0, c);
    }
    free_all();
    free_host_all();
}

int main(void) {
    bench_init(0);
    print_header("GELU and bias-dropout-add (bf16)");
    for (int s = 0; s < N_SHAPES; s++) {
        run_gelu(&SHAPES[s]);
        run_residual(&SHAPES[s], 0.0f, "residual_fwd", "residual_bwd");
        run_residual(&SHAPES[s], 0.1f, "residual_fwd_p.1", "residual_bwd_p.1");
    }
    return bench_finish();
}
