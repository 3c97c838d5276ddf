/*
test_layers.cu: embedding, LayerNorm, GELU, bias-dropout-add, dropout, AdamW and the
gradient norm.

CPU: each backward against central finite differences in double (the loss is
sum(out * G) for a random G), AdamW against the scalar formula over a few steps, the
gradient norm against a plain double sum, dropout's keep rate.
GPU (when one is found): CUDA against the CPU reference in fp32, bf16 and fp16, outputs
poisoned with NaN first, on shapes that take the 16-byte path and shapes that take the
scalar fallback; determinism (two runs, same bits) of the backward reductions.

  g++ -x c++ -std=c++17 -O2 -fopenmp -o build/test_layers test/test_layers.cu
  nvcc -std=c++17 -O2 -arch=sm_90 -Xcompiler -fopenmp -o build/test_layers test/test_layers.cu -lcublasLt -lcublas
*/
#include "../megatron.h"
#include "test.h"

static MT19937 rng;

// Host buffers live until free_host(): tests allocate freely and free once.
static void* host_blocks[512];
static int host_count = 0;

template <typename real> static real* host(size_t n) {
    if (host_count == 512) die("test: too many host buffers");
    real* p = (real*)xcalloc(n, sizeof(real));
    host_blocks[host_count++] = p;
    return p;
}

static void free_host(void) {
    while (host_count) free(host_blocks[--host_count]);
}

// n values offset + scale * N(0, 1).
template <typename real> static real* host_normal(size_t n, double scale, double offset = 0) {
    real* x = host<real>(n);
    for (size_t i = 0; i < n; i++) x[i] = (real)(offset + scale * mt_normal(&rng));
    return x;
}

template <typename real> static real* host_copy(const real* x, size_t n) {
    real* y = host<real>(n);
    memcpy(y, x, n * sizeof(real));
    return y;
}

static double dot(const double* a, const double* b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

// got - base, elementwise (what a += function added).
static double* added(const double* got, const double* base, size_t n) {
    double* d = host<double>(n);
    for (size_t i = 0; i < n; i++) d[i] = got[i] - base[i];
    return d;
}


#define FD_TOL 1e-6

// ---------------------------------------------------------------------------- CPU

static void test_embedding_fd(void) {
    int B = 2, T = 3, C = 5, V = 4, N = B * T;
    int tokens[] = {1, 3, 1, 0, 1, 2};
    double *wte = host_normal<double>(V * C, 1), *wpe = host_normal<double>(T * C, 1), *G = host_normal<double>(N * C, 1);
    double* out = host<double>(N * C);
    auto loss = [&]() {
        embedding_forward_cpu(out, tokens, wte, wpe, B, T, C);
        return dot(out, G, N * C);
    };
    double *dwte0 = host_normal<double>(V * C, 1), *dwpe0 = host_normal<double>(T * C, 1);
    double *dwte = host_copy(dwte0, V * C), *dwpe = host_copy(dwpe0, T * C);
    embedding_backward_cpu(dwte, dwpe, G, tokens, B, T, C);
    check_close("embedding cpu fd dwte (+=)", added(dwte, dwte0, V * C), central_differences(wte, V * C, 1e-6, loss), V * C, FD_TOL);
    check_close("embedding cpu fd dwpe (+=)", added(dwpe, dwpe0, T * C), central_differences(wpe, T * C, 1e-6, loss), T * C, FD_TOL);
    free_host();
}

static void test_layernorm_fd(void) {
    int N = 4, C = 7;
    double *inp = host_normal<double>(N * C, 2, 0.5), *weight = host_normal<double>(C, 0.3, 1), *bias = host_normal<double>(C, 0.3);
    double *G = host_normal<double>(N * C, 1), *out = host<double>(N * C), *mean = host<double>(N), *rstd = host<double>(N);
    auto loss = [&]() {
        layernorm_forward_cpu(out, mean, rstd, inp, weight, bias, N, C);
        return dot(out, G, N * C);
    };
    loss();  // mean and rstd at the unperturbed point
    double *dinp0 = host_normal<double>(N * C, 1), *dweight0 = host_normal<double>(C, 1), *dbias0 = host_normal<double>(C, 1);
    double *dinp = host_copy(dinp0, N * C), *dweight = host_copy(dweight0, C), *dbias = host_copy(dbias0, C);
    double *dinp_sum0 = host_normal<double>(C, 1), *dinp_sum = host_copy(dinp_sum0, C), *want_sum = host<double>(C);
    layernorm_backward_cpu(dinp, dweight, dbias, dinp_sum, G, inp, weight, mean, rstd, N, C);
    for (int c = 0; c < C; c++) {
        want_sum[c] = dinp_sum0[c];
        for (int r = 0; r < N; r++) want_sum[c] += dinp[r * C + c];
    }
    check_close("layernorm cpu dinp_sum (+=): the column sums of the updated dinp", dinp_sum, want_sum, C, 1e-12);
    check_close("layernorm cpu fd dinp (+=)", added(dinp, dinp0, N * C), central_differences(inp, N * C, 1e-6, loss), N * C, FD_TOL);
    check_close("layernorm cpu fd dweight (+=)", added(dweight, dweight0, C), central_differences(weight, C, 1e-6, loss), C, FD_TOL);
    check_close("layernorm cpu fd dbias (+=)", added(dbias, dbias0, C), central_differences(bias, C, 1e-6, loss), C, FD_TOL);
    free_host();
}

static void test_gelu_fd(void) {
    int n = 13;
    double *inp = host_normal<double>(n, 2), *G = host_normal<double>(n, 1), *out = host<double>(n), *dinp = host<double>(n);
    auto loss = [&]() {
        gelu_forward_cpu(out, inp, n);
        return dot(out, G, n);
    };
    gelu_backward_cpu(dinp, inp, G, n);
    check_close("gelu cpu fd dinp", dinp, central_differences(inp, n, 1e-6, loss), n, FD_TOL);
    double x = 1.0, want = 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    check(fabs(gelu_value(x) - want) < 1e-15, "gelu cpu value at 1", "%.17g != %.17g", gelu_value(x), want);
    free_host();
}

static void test_residual_dropout_fd(void) {
    int N = 4, C = 6;
    size_t n = (size_t)N * C;
    float p = 0.3f;
    uint64_t seed = 1234;
    double *residual = host_normal<double>(n, 1), *x = host_normal<double>(n, 1), *bias = host_normal<double>(C, 1);
    double *G = host_normal<double>(n, 1), *out = host<double>(n);
    auto loss = [&]() {
        residual_dropout_forward_cpu(out, residual, x, bias, p, seed, n, C);
        return dot(out, G, n);
    };
    double *dresidual0 = host_normal<double>(n, 1), *dbias0 = host_normal<double>(C, 1);
    double *dresidual = host_copy(dresidual0, n), *dbias = host_copy(dbias0, C), *dx = host<double>(n);
    residual_dropout_backward_cpu(dresidual, dx, dbias, G, p, seed, N, C);
    check_close("residual_dropout cpu fd dresidual (+=)", added(dresidual, dresidual0, n), central_differences(residual, n, 1e-6, loss), n, FD_TOL);
    check_close("residual_dropout cpu fd dx", dx, central_differences(x, n, 1e-6, loss), n, FD_TOL);
    check_close("residual_dropout cpu fd dbias (+=)", added(dbias, dbias0, C), central_differences(bias, C, 1e-6, loss), C, FD_TOL);
    int dropped = 0;
    for (size_t i = 0; i < n; i++) dropped += dx[i] == 0;
    check(dropped > 0 && dropped < (int)n, "residual_dropout cpu mask drops some, keeps some", "%d of %zu dropped", dropped, n);
    free_host();
}

static void test_dropout_cpu(void) {
    Device cpu;
    device_init(&cpu, "cpu", DT_F32);
    size_t n = 100000;
    float p = 0.1f;
    float *x = host<float>(n), *g = host_normal<float>(n, 1), *g0 = host_copy(g, n);
    for (size_t i = 0; i < n; i++) x[i] = 1.0f;
    dropout_forward(&cpu, x, p, 7, n);
    size_t kept = 0, bad = 0;
    for (size_t i = 0; i < n; i++) {
        kept += x[i] != 0;
        bad += x[i] != 0 && x[i] != 1.0f / (1.0f - p);
    }
    // binomial: mean n(1-p) = 90000, sd 95
    check(fabs((double)kept - n * (1 - p)) < 500 && !bad, "dropout cpu keep rate and scale", "kept %zu of %zu, %zu bad values", kept, n, bad);
    dropout_backward(&cpu, g, p, 7, n);
    size_t mismatch = 0;
    for (size_t i = 0; i < n; i++) mismatch += g[i] != g0[i] * x[i];
    check(!mismatch, "dropout cpu backward uses the forward's mask", "%zu mismatches", mismatch);
    free_host();
}

// AdamW over 3 steps against the formula written out in double.
static void test_adamw_cpu(void) {
    Device cpu;
    device_init(&cpu, "cpu", DT_F32);
    int n = 10, steps = 3;
    float lr = 1e-2f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, wd = 0.1f, scale = 0.5f;
    float *params = host_normal<float>(n, 1), *master_params = host_copy(params, n), *master = host_copy(params, n);
    float *m = host<float>(n), *v = host<float>(n), *m2 = host<float>(n), *v2 = host<float>(n);
    double *want = host<double>(n), *wm = host<double>(n), *wv = host<double>(n);
    for (int i = 0; i < n; i++) want[i] = params[i];
    for (int t = 1; t <= steps; t++) {
        float* grads = host_normal<float>(n, 1);
        adamw_update(&cpu, params, NULL, grads, m, v, n, lr, beta1, beta2, eps, wd, scale, t);
        adamw_update(&cpu, master_params, master, grads, m2, v2, n, lr, beta1, beta2, eps, wd, scale, t);
        for (int i = 0; i < n; i++) {
            double g = (double)grads[i] * scale;
            wm[i] = beta1 * wm[i] + (1 - (double)beta1) * g;
            wv[i] = beta2 * wv[i] + (1 - (double)beta2) * g * g;
            double m_hat = wm[i] / (1 - pow(beta1, t)), v_hat = wv[i] / (1 - pow(beta2, t));
            want[i] -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * want[i]);
        }
    }
    check_close("adamw cpu 3 steps vs formula", params, want, n, 1e-6);
    check_close("adamw cpu moments m", m, wm, n, 1e-6);
    check_close("adamw cpu moments v", v, wv, n, 1e-6);
    check(!memcmp(params, master, n * sizeof(float)) && !memcmp(params, master_params, n * sizeof(float)),
          "adamw cpu with master weights: same result, params = master", "differs");
    free_host();
}

static void test_grad_norm_cpu(void) {
    Device cpu;
    device_init(&cpu, "cpu", DT_F32);
    size_t n = 100003;
    float* g = host_normal<float>(n, 1);
    double want = 0;
    for (size_t i = 0; i < n; i++) want += (double)g[i] * g[i];
    float got = grad_norm_squared(&cpu, g, n);
    check(fabs(got - want) / want < 1e-7, "grad_norm_squared cpu", "%.9g vs %.9g", got, want);
    check(grad_norm_squared(&cpu, g, 0) == 0, "grad_norm_squared cpu n=0", "not 0");
    const float* ranges[3] = {g, g + 10, g + 5000};
    size_t lengths[3] = {7, 4000, n - 5000};
    double each = 0;
    for (int r = 0; r < 3; r++) each += grad_norm_squared(&cpu, ranges[r], lengths[r]);
    double all = grad_norm_squared_ranges(&cpu, ranges, lengths, 3);
    check(!memcmp(&all, &each, sizeof(all)), "grad_norm_squared_ranges cpu = sum of ranges", "%.17g vs %.17g", all, each);
    g[5] = INFINITY;
    check(!isfinite(grad_norm_squared(&cpu, g, n)), "grad_norm_squared cpu inf propagates", "finite");
    free_host();
}

// ---------------------------------------------------------------------------- GPU

#ifdef __CUDACC__
static Device gpu;

static void* gpu_blocks[256];
static int gpu_count = 0;

static void* gpu_alloc(size_t bytes) {
    if (gpu_count == 256) die("test: too many GPU buffers");
    void* p = dev_malloc(&gpu, bytes);
    cudaCheck(cudaMemset(p, 0xff, bytes));  // NaN in fp32, bf16 and fp16
    gpu_blocks[gpu_count++] = p;
    return p;
}

static void free_gpu(void) {
    while (gpu_count) dev_free(&gpu, gpu_blocks[--gpu_count]);
}

// x rounded in place through storage type dt (what the GPU will see).
static float* rounded(float* x, size_t n, DType dt) {
    void* tmp = xmalloc(n * 4);
    floats_to_dtype(tmp, x, n, dt);
    dtype_to_floats(x, tmp, n, dt);
    free(tmp);
    return x;
}

static void* upload(const float* x, size_t n, DType dt) {
    void* tmp = xmalloc(n * 4);
    floats_to_dtype(tmp, x, n, dt);
    void* p = gpu_alloc(n * dtype_size(dt));
    dev_upload(&gpu, p, tmp, n * dtype_size(dt));
    free(tmp);
    return p;
}

static float* download(const void* p, size_t n, DType dt) {
    void* tmp = xmalloc(n * 4);
    float* x = host<float>(n);
    dev_download(&gpu, tmp, p, n * dtype_size(dt));
    dtype_to_floats(x, tmp, n, dt);
    free(tmp);
    return x;
}

static int same_bits(const void* a, const void* b, size_t bytes) {
    void *ha = xmalloc(bytes), *hb = xmalloc(bytes);
    dev_download(&gpu, ha, a, bytes);
    dev_download(&gpu, hb, b, bytes);
    int same = !memcmp(ha, hb, bytes);
    free(ha);
    free(hb);
    return same;
}

// Random values as the GPU stores them in dt.
static float* rand_dt(size_t n, DType dt, double scale = 1, double offset = 0) { return rounded(host_normal<float>(n, scale, offset), n, dt); }

static double tol(DType dt) { return dt == DT_F32 ? 1e-5 : 2e-2; }  // for outputs stored in dt
#define F32_TOL 1e-5  // fp32 outputs (parameter gradients, statistics) from identical inputs

static char name_buf[256];
static const char* name(const char* what, DType dt, int a, int b) {
    snprintf(name_buf, sizeof(name_buf), "%s %s (%d, %d)", what, dtype_name(dt), a, b);
    return name_buf;
}

static void test_embedding_gpu(DType dt, int B, int T, int C, int V) {
    gpu.dtype = dt;
    int N = B * T;
    int* tokens = host<int>(N);
    for (int i = 0; i < N; i++) tokens[i] = mt_uniform(&rng) < 0.3 ? 3 % V : (int)(mt_uniform(&rng) * V);  // one long run
    float *wte = rand_dt(V * C, dt), *wpe = rand_dt(T * C, dt), *out = host<float>(N * C);
    int* d_tokens = (int*)gpu_alloc(N * sizeof(int));
    dev_upload(&gpu, d_tokens, tokens, N * sizeof(int));
    void* d_out = gpu_alloc(N * C * dtype_size(dt));
    embedding_forward(&gpu, d_out, d_tokens, upload(wte, V * C, dt), upload(wpe, T * C, dt), B, T, C);
    embedding_forward_cpu(out, tokens, wte, wpe, B, T, C);
    check_close(name("embedding gpu forward", dt, N, C), download(d_out, N * C, dt), out, N * C, tol(dt));

    float *dout = rand_dt(N * C, dt), *dwte = host_normal<float>(V * C, 1), *dwpe = host_normal<float>(T * C, 1);
    void* d_dout = upload(dout, N * C, dt);
    void *d_dwte[2], *d_dwpe[2];
    for (int run = 0; run < 2; run++) {
        d_dwte[run] = upload(dwte, V * C, DT_F32);
        d_dwpe[run] = upload(dwpe, T * C, DT_F32);
        embedding_backward(&gpu, (float*)d_dwte[run], (float*)d_dwpe[run], d_dout, d_tokens, B, T, C);
    }
    embedding_backward_cpu(dwte, dwpe, dout, tokens, B, T, C);
    check_close(name("embedding gpu backward dwte", dt, N, C), download(d_dwte[0], V * C, DT_F32), dwte, V * C, F32_TOL);
    check_close(name("embedding gpu backward dwpe", dt, N, C), download(d_dwpe[0], T * C, DT_F32), dwpe, T * C, F32_TOL);
    check(same_bits(d_dwte[0], d_dwte[1], V * C * 4) && same_bits(d_dwpe[0], d_dwpe[1], T * C * 4),
          name("embedding gpu backward deterministic", dt, N, C), "two runs differ");
    free_gpu();
    free_host();
}

static void test_layernorm_gpu(DType dt, int N, int C) {
    gpu.dtype = dt;
    float *inp = rand_dt(N * C, dt, 1, 0.3), *weight = rand_dt(C, dt, 0.1, 1), *bias = rand_dt(C, dt, 0.1);
    float *out = host<float>(N * C), *mean = host<float>(N), *rstd = host<float>(N);
    void *d_inp = upload(inp, N * C, dt), *d_weight = upload(weight, C, dt), *d_out = gpu_alloc(N * C * dtype_size(dt));
    float *d_mean = (float*)gpu_alloc(N * 4), *d_rstd = (float*)gpu_alloc(N * 4);
    layernorm_forward(&gpu, d_out, d_mean, d_rstd, d_inp, d_weight, upload(bias, C, dt), N, C);
    layernorm_forward_cpu(out, mean, rstd, inp, weight, bias, N, C);
    check_close(name("layernorm gpu forward out", dt, N, C), download(d_out, N * C, dt), out, N * C, tol(dt));
    check_close(name("layernorm gpu forward mean", dt, N, C), download(d_mean, N, DT_F32), mean, N, F32_TOL);
    check_close(name("layernorm gpu forward rstd", dt, N, C), download(d_rstd, N, DT_F32), rstd, N, F32_TOL);

    float *dout = rand_dt(N * C, dt), *dinp = rand_dt(N * C, dt), *dweight = host_normal<float>(C, 1), *dbias = host_normal<float>(C, 1);
    float* dinp_sum = host_normal<float>(C, 1);
    void* d_dout = upload(dout, N * C, dt);
    void *d_dinp[2], *d_dweight[2], *d_dbias[2], *d_dinp_sum[2];
    for (int run = 0; run < 2; run++) {
        d_dinp[run] = upload(dinp, N * C, dt);
        d_dweight[run] = upload(dweight, C, DT_F32);
        d_dbias[run] = upload(dbias, C, DT_F32);
        d_dinp_sum[run] = upload(dinp_sum, C, DT_F32);
        layernorm_backward(&gpu, d_dinp[run], (float*)d_dweight[run], (float*)d_dbias[run], (float*)d_dinp_sum[run], d_dout, d_inp, d_weight,
                           d_mean, d_rstd, N, C);
    }
    layernorm_backward_cpu(dinp, dweight, dbias, (float*)NULL, dout, inp, weight, mean, rstd, N, C);
    // dinp_sum: the column sums of the GPU's own dinp (the values it rounded and stored)
    float* gpu_dinp = download(d_dinp[0], N * C, dt);
    double* want_sum = host<double>(C);
    for (int c = 0; c < C; c++) {
        want_sum[c] = dinp_sum[c];
        for (int r = 0; r < N; r++) want_sum[c] += gpu_dinp[(size_t)r * C + c];
    }
    check_close(name("layernorm gpu backward dinp_sum", dt, N, C), download(d_dinp_sum[0], C, DT_F32), want_sum, C, F32_TOL);
    check_close(name("layernorm gpu backward dinp", dt, N, C), download(d_dinp[0], N * C, dt), dinp, N * C, tol(dt));
    check_close(name("layernorm gpu backward dweight", dt, N, C), download(d_dweight[0], C, DT_F32), dweight, C, F32_TOL);
    check_close(name("layernorm gpu backward dbias", dt, N, C), download(d_dbias[0], C, DT_F32), dbias, C, F32_TOL);
    check(same_bits(d_dinp[0], d_dinp[1], N * C * dtype_size(dt)) && same_bits(d_dweight[0], d_dweight[1], C * 4) &&
              same_bits(d_dbias[0], d_dbias[1], C * 4) && same_bits(d_dinp_sum[0], d_dinp_sum[1], C * 4),
          name("layernorm gpu backward deterministic", dt, N, C), "two runs differ");
    free_gpu();
    free_host();
}

static void test_gelu_gpu(DType dt, size_t n) {
    gpu.dtype = dt;
    float *inp = rand_dt(n, dt, 2), *dout = rand_dt(n, dt), *out = host<float>(n), *dinp = host<float>(n);
    void *d_inp = upload(inp, n, dt), *d_out = gpu_alloc(n * dtype_size(dt)), *d_dinp = gpu_alloc(n * dtype_size(dt)), *d_dout = upload(dout, n, dt);
    gelu_forward(&gpu, d_out, d_inp, n);
    gelu_backward(&gpu, d_dinp, d_inp, d_dout, n);
    gelu_backward(&gpu, d_dout, d_inp, d_dout, n);  // in place
    gelu_forward_cpu(out, inp, n);
    gelu_backward_cpu(dinp, inp, dout, n);
    check_close(name("gelu gpu forward", dt, (int)n, 0), download(d_out, n, dt), out, n, tol(dt));
    check_close(name("gelu gpu backward", dt, (int)n, 0), download(d_dinp, n, dt), dinp, n, tol(dt));
    check(same_bits(d_dinp, d_dout, n * dtype_size(dt)), name("gelu gpu backward in place", dt, (int)n, 0), "differs from out of place");
    free_gpu();
    free_host();
}

static void test_residual_dropout_gpu(DType dt, int N, int C) {
    gpu.dtype = dt;
    size_t n = (size_t)N * C;
    float p = 0.1f;
    uint64_t seed = 42;
    float *residual = rand_dt(n, dt), *x = rand_dt(n, dt), *bias = rand_dt(C, dt), *out = host<float>(n);
    void *d_x = upload(x, n, dt), *d_out = gpu_alloc(n * dtype_size(dt));
    residual_dropout_forward(&gpu, d_out, upload(residual, n, dt), d_x, upload(bias, C, dt), p, seed, N, C);
    residual_dropout_forward_cpu(out, residual, x, bias, p, seed, n, C);
    check_close(name("residual_dropout gpu forward", dt, N, C), download(d_out, n, dt), out, n, tol(dt));

    dropout_forward(&gpu, d_x, p, seed, n);
    residual_dropout_forward_cpu(x, (const float*)NULL, x, (const float*)NULL, p, seed, n, 1);
    check_close(name("dropout gpu forward in place", dt, N, C), download(d_x, n, dt), x, n, tol(dt));

    float *dout = rand_dt(n, dt), *dresidual = rand_dt(n, dt), *dbias = host_normal<float>(C, 1), *dx = host<float>(n);
    void *d_dout = upload(dout, n, dt), *d_dresidual = upload(dresidual, n, dt), *d_dx = gpu_alloc(n * dtype_size(dt));
    float* d_dbias = (float*)upload(dbias, C, DT_F32);
    residual_dropout_backward(&gpu, d_dresidual, d_dx, d_dbias, d_dout, p, seed, N, C);
    residual_dropout_backward_cpu(dresidual, dx, dbias, dout, p, seed, N, C);
    check_close(name("residual_dropout gpu backward dresidual", dt, N, C), download(d_dresidual, n, dt), dresidual, n, tol(dt));
    check_close(name("residual_dropout gpu backward dx", dt, N, C), download(d_dx, n, dt), dx, n, tol(dt));
    check_close(name("residual_dropout gpu backward dbias", dt, N, C), download(d_dbias, C, DT_F32), dbias, C, F32_TOL);

    // dresidual == dout ("already there"), no bias, dx written over dout
    residual_dropout_backward(&gpu, d_dout, d_dout, NULL, d_dout, p, seed, N, C);
    check_close(name("residual_dropout gpu backward in place, no bias", dt, N, C), download(d_dout, n, dt), dx, n, tol(dt));
    free_gpu();
    free_host();
}

static void test_adamw_gpu(DType dt, size_t n) {
    gpu.dtype = dt;
    int use_master = dt != DT_F32;
    float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, wd = 0.1f, scale = 0.7f;
    float *params = host_normal<float>(n, 1), *m = host<float>(n), *v = host<float>(n);
    float* ref = host_copy(params, n);  // the CPU's fp32 params: the GPU's master, or its fp32 params
    void* d_params = upload(params, n, dt);
    float *d_master = use_master ? (float*)upload(params, n, DT_F32) : NULL, *d_m = (float*)upload(m, n, DT_F32), *d_v = (float*)upload(v, n, DT_F32);
    for (int t = 1; t <= 3; t++) {
        float* grads = host_normal<float>(n, 1);
        adamw_update(&gpu, d_params, d_master, (const float*)upload(grads, n, DT_F32), d_m, d_v, n, lr, beta1, beta2, eps, wd, scale, t);
        adamw_update_cpu(ref, NULL, grads, m, v, n, AdamWStep{lr, beta1, beta2, eps, wd, scale, (float)(1 - pow(beta1, t)), (float)(1 - pow(beta2, t))});
    }
    float* got = download(use_master ? (void*)d_master : d_params, n, DT_F32);
    check_close(name("adamw gpu 3 steps", dt, (int)n, use_master), got, ref, n, 1e-6);
    check_close(name("adamw gpu m", dt, (int)n, use_master), download(d_m, n, DT_F32), m, n, 1e-6);
    check_close(name("adamw gpu v", dt, (int)n, use_master), download(d_v, n, DT_F32), v, n, 1e-6);
    if (use_master) {  // params must be master rounded to nearest
        uint16_t *want = host<uint16_t>(n), *have = host<uint16_t>(n);
        floats_to_dtype(want, got, n, dt);
        dev_download(&gpu, have, d_params, n * 2);
        check(!memcmp(want, have, n * 2), name("adamw gpu params = rounded master", dt, (int)n, 1), "differ");
    }
    free_gpu();
    free_host();
}

static void test_grad_norm_gpu(size_t n) {
    float* g = host_normal<float>(n, 1);
    float* d_g = (float*)upload(g, n, DT_F32);
    float got = grad_norm_squared(&gpu, d_g, n), again = grad_norm_squared(&gpu, d_g, n), want = grad_norm_squared_cpu(g, n);
    check(fabs(got - want) / want < 1e-6, name("grad_norm_squared gpu", DT_F32, (int)n, 0), "%.9g vs %.9g", got, want);
    check(!memcmp(&got, &again, 4), name("grad_norm_squared gpu deterministic", DT_F32, (int)n, 0), "%.9g vs %.9g", got, again);
    const float* ranges[3] = {d_g, d_g + 3, d_g + n / 2};
    size_t lengths[3] = {1, n / 2 - 3, n - n / 2};
    double each = 0;
    for (int r = 0; r < 3; r++) each += grad_norm_squared(&gpu, ranges[r], lengths[r]);
    double all = grad_norm_squared_ranges(&gpu, ranges, lengths, 3);
    check(!memcmp(&all, &each, sizeof(all)), name("grad_norm_squared_ranges gpu = sum of ranges", DT_F32, (int)n, 0), "%.17g vs %.17g", all, each);
    free_gpu();
    free_host();
}

static void test_gpu(void) {
    if (!gpu_available()) {
        printf("skip gpu tests: no GPU\n");
        return;
    }
    device_init(&gpu, "cuda", DT_F32);
    DType dtypes[] = {DT_F32, DT_BF16, DT_F16};
    for (DType dt : dtypes) {
        test_embedding_gpu(dt, 4, 64, 768, 97);     // 16-byte path
        test_embedding_gpu(dt, 8, 300, 64, 1000);   // 3 sort tiles, the last one padded
        test_embedding_gpu(dt, 8, 1024, 256, 5000); // 8 sort tiles
        test_embedding_gpu(dt, 3, 5, 37, 11);       // scalar fallback
        test_layernorm_gpu(dt, 1000, 768);
        test_layernorm_gpu(dt, 50, 5000);           // fp32: rows too wide for registers (shared-memory kernel)
        test_layernorm_gpu(dt, 4100, 2304);         // several rows per block, teams of 3 warps
        test_layernorm_gpu(dt, 37, 37);
        test_gelu_gpu(dt, 100000);
        test_gelu_gpu(dt, 1001);
        test_residual_dropout_gpu(dt, 300, 768);
        test_residual_dropout_gpu(dt, 7, 37);
        test_residual_dropout_gpu(dt, 4100, 768);   // several row batches per block, the last one short
        test_adamw_gpu(dt, 4096 * 3);
        test_adamw_gpu(dt, 1001);
    }
    test_grad_norm_gpu(1 << 20);
    test_grad_norm_gpu(1000003);
    device_free(&gpu);
}
#endif

int main(void) {
    mt_seed(&rng, 1234);
    test_embedding_fd();
    test_layernorm_fd();
    test_gelu_fd();
    test_residual_dropout_fd();
    test_dropout_cpu();
    test_adamw_cpu();
    test_grad_norm_cpu();
#ifdef __CUDACC__
    test_gpu();
#else
    printf("skip gpu tests: no GPU (built without CUDA)\n");
#endif
    return test_summary();
}
