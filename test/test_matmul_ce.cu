/*
test_matmul_ce.cu: the linear layer (matmul) and the fused softmax cross-entropy.
CPU: the blocked GEMM against plain loops, backward against central finite differences in
double, padded vocabulary columns taking no part, results independent of the thread count.
GPU (when one is found): cuBLASLt and the cross-entropy kernel against the CPU reference in
fp32, bf16 and fp16, gradient accumulation, bitwise determinism, the GELU forward with cuBLASLt's
epilogue and with the GELU kernel; the backward through the GELU with the DGELU epilogue and with our
GELU-gradient pass. `--bench` times these on GPT-2 124M's and the 1.7B model's shapes (bf16) after the
checks, `--bench-only` without them.
*/
#include "../megatron.h"
#include "test.h"

// The three products with plain loops in double.
static void naive_forward(double* out, const double* inp, const double* weight, const double* bias, int N, int C, int OC) {
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double sum = bias ? bias[o] : 0;
            for (int c = 0; c < C; c++) sum += inp[n * C + c] * weight[o * C + c];
            out[n * OC + o] = sum;
        }
}

static void naive_backward(double* dinp, double* dweight, double* dbias, const double* dout, const double* inp, const double* weight,
                           int N, int C, int OC) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            double sum = 0;
            for (int o = 0; o < OC; o++) sum += dout[n * OC + o] * weight[o * C + c];
            dinp[n * C + c] = sum;
        }
    for (int o = 0; o < OC; o++) {
        for (int c = 0; c < C; c++) {
            double sum = 0;
            for (int n = 0; n < N; n++) sum += dout[n * OC + o] * inp[n * C + c];
            dweight[o * C + c] = sum;
        }
        double sum = 0;
        for (int n = 0; n < N; n++) sum += dout[n * OC + o];
        dbias[o] = sum;
    }
}

// The blocked GEMM (float and double) against plain loops, on shapes that cross every block edge.
template <typename real>
static void test_gemm_shape(int N, int C, int OC, double tol) {
    MT19937 mt;
    mt_seed(&mt, 1000 + N + C + OC);
    size_t n_in = (size_t)N * C, n_w = (size_t)OC * C, n_out = (size_t)N * OC;
    double *inp = (double*)xmalloc(8 * n_in), *w = (double*)xmalloc(8 * n_w), *b = (double*)xmalloc(8 * OC), *dout = (double*)xmalloc(8 * n_out);
    fill_normal(inp, n_in, &mt, 1.0);
    fill_normal(w, n_w, &mt, 1.0);
    fill_normal(b, OC, &mt, 1.0);
    fill_normal(dout, n_out, &mt, 1.0);
    double *out_ref = (double*)xmalloc(8 * n_out), *dinp_ref = (double*)xmalloc(8 * n_in), *dw_ref = (double*)xmalloc(8 * n_w), *db_ref = (double*)xmalloc(8 * OC);
    naive_forward(out_ref, inp, w, b, N, C, OC);
    naive_backward(dinp_ref, dw_ref, db_ref, dout, inp, w, N, C, OC);

    real *inp_r = (real*)xmalloc(sizeof(real) * n_in), *w_r = (real*)xmalloc(sizeof(real) * n_w), *b_r = (real*)xmalloc(sizeof(real) * OC);
    real *dout_r = (real*)xmalloc(sizeof(real) * n_out), *out = (real*)xmalloc(sizeof(real) * n_out), *dinp = (real*)xmalloc(sizeof(real) * n_in);
    real *dw = (real*)xcalloc(n_w, sizeof(real)), *db = (real*)xcalloc(OC, sizeof(real));
    for (size_t i = 0; i < n_in; i++) inp_r[i] = (real)inp[i];
    for (size_t i = 0; i < n_w; i++) w_r[i] = (real)w[i];
    for (int i = 0; i < OC; i++) b_r[i] = (real)b[i];
    for (size_t i = 0; i < n_out; i++) dout_r[i] = (real)dout[i];
    for (size_t i = 0; i < n_out; i++) out[i] = NAN;
    for (size_t i = 0; i < n_in; i++) dinp[i] = NAN;
    matmul_forward_cpu<real>(out, inp_r, w_r, b_r, N, C, OC, (real*)NULL);
    matmul_backward_cpu<real>(dinp, dw, db, dout_r, inp_r, w_r, N, C, OC, GRAD_ADD);
    char name[128];
    const char* type = sizeof(real) == 8 ? "double" : "float";
    snprintf(name, sizeof(name), "cpu gemm %s N=%d C=%d OC=%d forward", type, N, C, OC);
    check_close(name, out, out_ref, n_out, tol);
    snprintf(name, sizeof(name), "cpu gemm %s N=%d C=%d OC=%d dinp", type, N, C, OC);
    check_close(name, dinp, dinp_ref, n_in, tol);
    snprintf(name, sizeof(name), "cpu gemm %s N=%d C=%d OC=%d dweight", type, N, C, OC);
    check_close(name, dw, dw_ref, n_w, tol);
    snprintf(name, sizeof(name), "cpu gemm %s N=%d C=%d OC=%d dbias", type, N, C, OC);
    check_close(name, db, db_ref, OC, tol);
    free(inp); free(w); free(b); free(dout); free(out_ref); free(dinp_ref); free(dw_ref); free(db_ref);
    free(inp_r); free(w_r); free(b_r); free(dout_r); free(out); free(dinp); free(dw); free(db);
}

// out = residual + inp @ w^T + bias, into a separate buffer and in place, against plain loops.
static void test_matmul_residual_cpu(void) {
    const int N = 37, C = 300, OC = 45;
    MT19937 mt;
    mt_seed(&mt, 11);
    double *inp = (double*)xmalloc(8 * N * C), *w = (double*)xmalloc(8 * OC * C), b[OC], res[N * OC], want[N * OC], out[N * OC];
    fill_normal(inp, N * C, &mt, 1.0);
    fill_normal(w, OC * C, &mt, 1.0);
    fill_normal(b, OC, &mt, 1.0);
    fill_normal(res, N * OC, &mt, 1.0);
    for (int with_bias = 0; with_bias < 2; with_bias++) {
        naive_forward(want, inp, w, with_bias ? b : NULL, N, C, OC);
        for (int i = 0; i < N * OC; i++) want[i] += res[i];
        matmul_forward_residual_cpu<double>(out, res, inp, w, with_bias ? b : NULL, N, C, OC);
        check_close(with_bias ? "cpu matmul + residual + bias" : "cpu matmul + residual", out, want, N * OC, 1e-13);
        memcpy(out, res, sizeof(out));
        matmul_forward_residual_cpu<double>(out, out, inp, w, with_bias ? b : NULL, N, C, OC);
        check_close(with_bias ? "cpu matmul + residual + bias, in place" : "cpu matmul + residual, in place", out, want, N * OC, 1e-13);
    }
    free(inp);
    free(w);
}

// Backward against central differences of L = sum(R * out) + sum(out^2) / 2, so dout = R + out.
static void test_matmul_finite_differences(void) {
    const int N = 6, C = 10, OC = 13;
    MT19937 mt;
    mt_seed(&mt, 7);
    double inp[N * C], w[OC * C], b[OC], R[N * OC], out[N * OC], dout[N * OC];
    double dinp[N * C], dw[OC * C] = {0}, db[OC] = {0};
    fill_normal(inp, N * C, &mt, 1.0);
    fill_normal(w, OC * C, &mt, 1.0);
    fill_normal(b, OC, &mt, 1.0);
    fill_normal(R, N * OC, &mt, 1.0);
    auto loss = [&]() {
        matmul_forward_cpu<double>(out, inp, w, b, N, C, OC, (double*)NULL);
        double L = 0;
        for (int i = 0; i < N * OC; i++) L += R[i] * out[i] + 0.5 * out[i] * out[i];
        return L;
    };
    loss();
    for (int i = 0; i < N * OC; i++) dout[i] = R[i] + out[i];
    matmul_backward_cpu<double>(dinp, dw, db, dout, inp, w, N, C, OC, GRAD_ADD);
    double* fd_inp = central_differences(inp, N * C, 1e-5, loss);
    double* fd_w = central_differences(w, OC * C, 1e-5, loss);
    double* fd_b = central_differences(b, OC, 1e-5, loss);
    check_close("cpu matmul dinp vs finite differences", dinp, fd_inp, N * C, 1e-7);
    check_close("cpu matmul dweight vs finite differences", dw, fd_w, OC * C, 1e-7);
    check_close("cpu matmul dbias vs finite differences", db, fd_b, OC, 1e-7);
    free(fd_inp); free(fd_w); free(fd_b);

    // gelu_out is gelu_tanh(out), and out keeps the pre-activation
    double gelu_out[N * OC], out_plain[N * OC], want[N * OC];
    loss();
    memcpy(out_plain, out, sizeof(out));
    matmul_forward_cpu<double>(out, inp, w, b, N, C, OC, gelu_out);
    for (int i = 0; i < N * OC; i++) want[i] = 0.5 * out_plain[i] * (1 + tanh(sqrt(2 / M_PI) * (out_plain[i] + 0.044715 * pow(out_plain[i], 3))));
    check(!memcmp(out, out_plain, sizeof(out)), "cpu matmul gelu_out keeps the pre-activation in out", "out changed");
    check_close("cpu matmul gelu_out = gelu_tanh(out)", gelu_out, want, N * OC, 1e-15);

    // accumulation: a second backward adds the same parameter gradients again
    double dw2[OC * C], db2[OC];
    memcpy(dw2, dw, sizeof(dw));
    memcpy(db2, db, sizeof(db));
    matmul_backward_cpu<double>((double*)NULL, dw2, db2, dout, inp, w, N, C, OC, GRAD_ADD);
    for (int i = 0; i < OC * C; i++) dw[i] *= 2;
    for (int i = 0; i < OC; i++) db[i] *= 2;
    check_close("cpu matmul backward accumulates dweight", dw2, dw, OC * C, 1e-15);
    check_close("cpu matmul backward accumulates dbias", db2, db, OC, 1e-15);
}

// The MLP's second linear through its GELU: y = gelu(pre0 + b1) @ w^T, L = sum(R * y); the backward to
// pre0 and b1 (the first linear's output and bias) against central differences, and its accumulation.
static void test_matmul_dgelu_finite_differences(void) {
    const int N = 5, C = 12, OC = 7;
    MT19937 mt;
    mt_seed(&mt, 9);
    double pre0[N * C], b1[C], w[OC * C], R[N * OC], pre[N * C], act[N * C], y[N * OC], dpre[N * C], db1[C] = {0};
    fill_normal(pre0, N * C, &mt, 1.5);
    fill_normal(b1, C, &mt, 0.5);
    fill_normal(w, OC * C, &mt, 1.0);
    fill_normal(R, N * OC, &mt, 1.0);
    auto loss = [&]() {
        for (int i = 0; i < N * C; i++) pre[i] = pre0[i] + b1[i % C];
        gelu_forward_cpu(act, pre, N * C);
        matmul_forward_cpu<double>(y, act, w, (const double*)NULL, N, C, OC, (double*)NULL);
        double L = 0;
        for (int i = 0; i < N * OC; i++) L += R[i] * y[i];
        return L;
    };
    loss();
    matmul_backward_dgelu_cpu<double>(dpre, db1, R, w, pre, N, C, OC);
    double* fd_pre = central_differences(pre0, N * C, 1e-5, loss);
    double* fd_b1 = central_differences(b1, C, 1e-5, loss);
    check_close("cpu matmul dgelu dpre vs finite differences", dpre, fd_pre, N * C, 1e-8);
    check_close("cpu matmul dgelu dbias vs finite differences", db1, fd_b1, C, 1e-8);
    double db2[C], twice[C];
    memcpy(db2, db1, sizeof(db1));
    loss();  // pre as it was (the differences left it perturbed)
    matmul_backward_dgelu_cpu<double>(dpre, db2, R, w, pre, N, C, OC);
    for (int i = 0; i < C; i++) twice[i] = 2 * db1[i];
    check_close("cpu matmul dgelu accumulates dbias", db2, twice, C, 1e-15);
    free(fd_pre); free(fd_b1);
}

// Same bits with 1 and 2 threads: every output sums k in the same order.
static void test_matmul_thread_independence(void) {
#ifdef _OPENMP
    const int N = 300, C = 600, OC = 700;
    MT19937 mt;
    mt_seed(&mt, 11);
    float *inp = (float*)xmalloc(4L * N * C), *w = (float*)xmalloc(4L * OC * C), *dout = (float*)xmalloc(4L * N * OC);
    float *out1 = (float*)xmalloc(4L * N * OC), *out2 = (float*)xmalloc(4L * N * OC);
    float *dw1 = (float*)xcalloc((size_t)OC * C, 4), *dw2 = (float*)xcalloc((size_t)OC * C, 4);
    fill_normal(inp, (size_t)N * C, &mt, 1.0);
    fill_normal(w, (size_t)OC * C, &mt, 1.0);
    fill_normal(dout, (size_t)N * OC, &mt, 1.0);
    int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    matmul_forward_cpu<float>(out1, inp, w, (const float*)NULL, N, C, OC, (float*)NULL);
    matmul_backward_cpu<float>((float*)NULL, dw1, (float*)NULL, dout, inp, w, N, C, OC, GRAD_ADD);
    omp_set_num_threads(threads > 1 ? threads : 2);
    matmul_forward_cpu<float>(out2, inp, w, (const float*)NULL, N, C, OC, (float*)NULL);
    matmul_backward_cpu<float>((float*)NULL, dw2, (float*)NULL, dout, inp, w, N, C, OC, GRAD_ADD);
    omp_set_num_threads(threads);
    check(!memcmp(out1, out2, 4L * N * OC) && !memcmp(dw1, dw2, 4L * OC * C), "cpu matmul same bits with 1 and 2 threads", "results differ");
    free(inp); free(w); free(dout); free(out1); free(out2); free(dw1); free(dw2);
#endif
}

// GRAD_SET writes dweight over whatever the buffer held (NaN here): the same as GRAD_ADD onto zeros.
static void test_grad_set_cpu(void) {
    int N = 9, C = 6, OC = 5;
    MT19937 mt;
    mt_seed(&mt, 5);
    float *inp = (float*)xmalloc(4 * N * C), *w = (float*)xmalloc(4 * OC * C), *dout = (float*)xmalloc(4 * N * OC);
    float *set = (float*)xmalloc(4 * OC * C), *add = (float*)calloc(OC * C, 4);
    fill_normal(inp, N * C, &mt, 1.0);
    fill_normal(w, OC * C, &mt, 1.0);
    fill_normal(dout, N * OC, &mt, 1.0);
    for (int i = 0; i < OC * C; i++) set[i] = NAN;
    matmul_backward_cpu<float>((float*)NULL, set, (float*)NULL, dout, inp, w, N, C, OC, GRAD_SET);
    matmul_backward_cpu<float>((float*)NULL, add, (float*)NULL, dout, inp, w, N, C, OC, GRAD_ADD);
    check(!memcmp(set, add, 4 * OC * C), "matmul cpu backward GRAD_SET over NaN equals GRAD_ADD onto zeros", "they differ");
    free(inp); free(w); free(dout); free(set); free(add);
}

// The dispatchers on a CPU Device run the fp32 references.
static void test_cpu_dispatch(void) {
    const int N = 9, C = 20, OC = 24, V = 30, Vp = 32;
    Device d;
    device_init(&d, "cpu", DT_F32);
    MT19937 mt;
    mt_seed(&mt, 3);
    float inp[N * C], w[OC * C], b[OC], dout[N * OC], out[2][N * OC], gelu[2][N * OC], dinp[2][N * C], dw[2][OC * C] = {}, db[2][OC] = {};
    float logits[2][N * Vp], losses[2][N], dloss[N];
    int targets[N];
    fill_normal(inp, N * C, &mt, 1.0);
    fill_normal(w, OC * C, &mt, 1.0);
    fill_normal(b, OC, &mt, 1.0);
    fill_normal(dout, N * OC, &mt, 1.0);
    fill_normal(logits[0], N * Vp, &mt, 1.0);
    memcpy(logits[1], logits[0], sizeof(logits[0]));
    for (int n = 0; n < N; n++) {
        targets[n] = (int)(mt_u32(&mt) % V);
        dloss[n] = 1.0f / N;
    }
    float dpre[2][N * C], dpre_bias[2][C] = {};
    matmul_forward(&d, out[0], inp, w, b, N, C, OC, gelu[0]);
    matmul_backward(&d, dinp[0], dw[0], db[0], dout, inp, w, N, C, OC, GRAD_ADD);
    matmul_backward_dgelu(&d, dpre[0], dpre_bias[0], dout, w, inp, N, C, OC);
    crossentropy_forward_backward(&d, losses[0], logits[0], targets, dloss, N, V, Vp);
    matmul_forward_cpu<float>(out[1], inp, w, b, N, C, OC, gelu[1]);
    matmul_backward_cpu<float>(dinp[1], dw[1], db[1], dout, inp, w, N, C, OC, GRAD_ADD);
    matmul_backward_dgelu_cpu<float>(dpre[1], dpre_bias[1], dout, w, inp, N, C, OC);
    crossentropy_forward_backward_cpu<float>(losses[1], logits[1], targets, dloss, N, V, Vp);
    int same = !memcmp(out[0], out[1], sizeof(out[0])) && !memcmp(gelu[0], gelu[1], sizeof(gelu[0])) && !memcmp(dinp[0], dinp[1], sizeof(dinp[0])) &&
               !memcmp(dw[0], dw[1], sizeof(dw[0])) && !memcmp(db[0], db[1], sizeof(db[0])) && !memcmp(losses[0], losses[1], sizeof(losses[0])) &&
               !memcmp(logits[0], logits[1], sizeof(logits[0])) && !memcmp(dpre[0], dpre[1], sizeof(dpre[0])) &&
               !memcmp(dpre_bias[0], dpre_bias[1], sizeof(dpre_bias[0]));
    check(same, "cpu dispatchers run the fp32 references", "results differ");
    device_free(&d);
}

// Cross-entropy backward against central differences of L = sum_n dloss[n] * losses[n], with padding.
static void test_crossentropy_cpu(void) {
    const int N = 3, V = 7, Vp = 8;
    MT19937 mt;
    mt_seed(&mt, 5);
    double logits[N * Vp], grad[N * Vp], losses[N], dloss[N];
    int targets[N] = {0, 6, 3};
    fill_normal(logits, N * Vp, &mt, 2.0);
    for (int n = 0; n < N; n++) dloss[n] = 0.5 + mt_uniform(&mt);
    auto loss = [&]() {
        double copy[N * Vp], L = 0;
        memcpy(copy, logits, sizeof(copy));
        crossentropy_forward_backward_cpu<double>(losses, copy, targets, (const double*)NULL, N, V, Vp);
        for (int n = 0; n < N; n++) L += dloss[n] * losses[n];
        return L;
    };
    memcpy(grad, logits, sizeof(grad));
    crossentropy_forward_backward_cpu<double>(losses, grad, targets, dloss, N, V, Vp);
    double* fd = central_differences(logits, N * Vp, 1e-5, loss);
    check_close("cpu cross-entropy gradient vs finite differences", grad, fd, N * Vp, 1e-8);
    free(fd);
    int pad_zero = 1;
    for (int n = 0; n < N; n++) pad_zero &= grad[n * Vp + V] == 0.0;
    check(pad_zero, "cpu cross-entropy gradient is 0 on padded columns", "nonzero");

    // the loss itself, written out
    double want[N];
    for (int n = 0; n < N; n++) {
        double sum = 0;
        for (int i = 0; i < V; i++) sum += exp(logits[n * Vp + i]);
        want[n] = log(sum) - logits[n * Vp + targets[n]];
    }
    loss();
    check_close("cpu cross-entropy loss = logsumexp - logit[target]", losses, want, N, 1e-14);

    // padded logits take no part, whatever their values
    double before[N];
    memcpy(before, losses, sizeof(before));
    for (int n = 0; n < N; n++) logits[n * Vp + V] = n == 0 ? NAN : 1e30;
    loss();
    check(!memcmp(before, losses, sizeof(before)), "cpu cross-entropy loss independent of padded logits", "loss changed");
}

#ifdef __CUDACC__
static void round_to_dtype(float* x, size_t n, DType dt) {
    void* tmp = xmalloc(n * dtype_size(dt));
    floats_to_dtype(tmp, x, n, dt);
    dtype_to_floats(x, tmp, n, dt);
    free(tmp);
}

// n normal samples (standard deviation scale) from mt in a new host buffer, rounded to dt: the values
// a dt tensor holds.
static float* random_in_dtype(size_t n, MT19937* mt, double scale, DType dt) {
    float* x = (float*)xmalloc(4 * n);
    fill_normal(x, n, mt, scale);
    round_to_dtype(x, n, dt);
    return x;
}

// Host floats -> a new device buffer in dtype.
static void* upload_as(const Device* d, const float* x, size_t n, DType dt) {
    void* tmp = xmalloc(n * dtype_size(dt));
    floats_to_dtype(tmp, x, n, dt);
    void* p = dev_malloc(d, n * dtype_size(dt));
    dev_upload(d, p, tmp, n * dtype_size(dt));
    free(tmp);
    return p;
}

static void download_as(const Device* d, float* x, const void* p, size_t n, DType dt) {
    void* tmp = xmalloc(n * dtype_size(dt));
    dev_download(d, tmp, p, n * dtype_size(dt));
    dtype_to_floats(x, tmp, n, dt);
    free(tmp);
}

static void poison(const Device* d, void* p, size_t n, DType dt) {
    float* nans = (float*)xmalloc(n * 4);
    for (size_t i = 0; i < n; i++) nans[i] = NAN;
    void* tmp = xmalloc(n * dtype_size(dt));
    floats_to_dtype(tmp, nans, n, dt);
    dev_upload(d, p, tmp, n * dtype_size(dt));
    free(tmp);
    free(nans);
}

static int same_bytes(const Device* d, const void* p, const void* q, size_t bytes) {
    char *a = (char*)xmalloc(bytes), *b = (char*)xmalloc(bytes);
    dev_download(d, a, p, bytes);
    dev_download(d, b, q, bytes);
    int same = !memcmp(a, b, bytes);
    free(a);
    free(b);
    return same;
}

static double tolerance(DType dt) { return dt == DT_F32 ? 1e-5 : 2e-2; }

// qkv_bias_backward's GPU sums (column_sums_kernel over a strided column map and with row weights)
// against double sums, called twice: the q part added each time, the v part set, the k part untouched.
static void test_qkv_bias_gpu(const Device* d, int N, int NH, int HS, int OC) {
    DType dt = d->dtype;
    MT19937 mt;
    mt_seed(&mt, 77 + N + NH * HS + dt);
    int Ca = NH * HS;
    float* dqkv = random_in_dtype((size_t)N * 3 * Ca, &mt, 1.0, dt);
    float* weight = random_in_dtype((size_t)OC * Ca, &mt, 1.0, dt);
    float *dproj_bias = (float*)xmalloc(OC * 4), *bias = (float*)xmalloc(3 * Ca * 4), *got = (float*)xmalloc(3 * Ca * 4);
    fill_normal(dproj_bias, OC, &mt, 1.0);
    fill_normal(bias, 3 * Ca, &mt, 1.0);
    double* want = (double*)xmalloc(3 * Ca * sizeof(double));
    for (int j = 0; j < 3 * Ca; j++) {
        int part = j % (3 * HS) / HS, c = j / (3 * HS) * HS + j % HS;
        double sum = 0;
        if (part == 0) for (int r = 0; r < N; r++) sum += 2.0 * dqkv[(size_t)r * 3 * Ca + j];
        if (part == 2) for (int o = 0; o < OC; o++) sum += (double)dproj_bias[o] * weight[(size_t)o * Ca + c];
        want[j] = part == 0 ? bias[j] + sum : part == 1 ? bias[j] : sum;
    }
    void *dqkv_g = upload_as(d, dqkv, (size_t)N * 3 * Ca, dt), *weight_g = upload_as(d, weight, (size_t)OC * Ca, dt);
    float *dproj_bias_g = (float*)dev_malloc(d, OC * 4), *bias_g = (float*)dev_malloc(d, 3 * Ca * 4);
    dev_upload(d, dproj_bias_g, dproj_bias, OC * 4);
    dev_upload(d, bias_g, bias, 3 * Ca * 4);
    for (int call = 0; call < 2; call++) qkv_bias_backward(d, bias_g, dqkv_g, dproj_bias_g, weight_g, 0.0f, N, NH, HS, OC);
    dev_download(d, got, bias_g, 3 * Ca * 4);
    char name[160];
    snprintf(name, sizeof(name), "qkv_bias_backward %s N=%d NH=%d HS=%d OC=%d: q summed twice, k kept, v = dproj_bias @ weight",
             dtype_name(dt), N, NH, HS, OC);
    check_close(name, got, want, 3 * Ca, 1e-5);
    dev_free(d, dqkv_g); dev_free(d, weight_g); dev_free(d, dproj_bias_g); dev_free(d, bias_g);
    free(dqkv); free(weight); free(dproj_bias); free(bias); free(got); free(want);
}

// GPU forward (with/without bias and gelu_out) and backward (twice: accumulation) vs the CPU on dtype-rounded inputs.
static void test_matmul_gpu(const Device* d, int N, int C, int OC, int use_bias, int use_gelu) {
    DType dt = d->dtype;
    size_t n_in = (size_t)N * C, n_w = (size_t)OC * C, n_out = (size_t)N * OC, es = dtype_size(dt);
    MT19937 mt;
    mt_seed(&mt, 100 + N + C + OC + use_bias + 2 * use_gelu);
    float *inp = random_in_dtype(n_in, &mt, 1.0, dt), *w = random_in_dtype(n_w, &mt, 0.2, dt);
    float *b = random_in_dtype(OC, &mt, 1.0, dt), *dout = random_in_dtype(n_out, &mt, 1.0, dt);
    float *dw0 = random_in_dtype(n_w, &mt, 1.0, DT_F32), *db0 = random_in_dtype(OC, &mt, 1.0, DT_F32);

    // CPU reference
    float *out_ref = (float*)xmalloc(4 * n_out), *gelu_ref = (float*)xmalloc(4 * n_out), *dinp_ref = (float*)xmalloc(4 * n_in);
    float *dw_ref = (float*)xmalloc(4 * n_w), *db_ref = (float*)xmalloc(4 * OC);
    memcpy(dw_ref, dw0, 4 * n_w);
    memcpy(db_ref, db0, 4 * OC);
    matmul_forward_cpu<float>(out_ref, inp, w, use_bias ? b : NULL, N, C, OC, use_gelu ? gelu_ref : NULL);
    GradWrite first = use_bias ? GRAD_ADD : GRAD_SET;  // without bias the first backward writes dweight over NaN
    matmul_backward_cpu<float>(dinp_ref, dw_ref, use_bias ? db_ref : NULL, dout, inp, w, N, C, OC, first);
    matmul_backward_cpu<float>((float*)NULL, dw_ref, use_bias ? db_ref : NULL, dout, inp, w, N, C, OC, GRAD_ADD);

    // GPU
    void *d_inp = upload_as(d, inp, n_in, dt), *d_w = upload_as(d, w, n_w, dt), *d_b = upload_as(d, b, OC, dt), *d_dout = upload_as(d, dout, n_out, dt);
    void *d_out = dev_malloc(d, n_out * es), *d_gelu = dev_malloc(d, n_out * es), *d_dinp = dev_malloc(d, n_in * es);
    void *d_out2 = dev_malloc(d, n_out * es), *d_gelu2 = dev_malloc(d, n_out * es);
    float *d_dw = (float*)dev_malloc(d, 4 * n_w), *d_db = (float*)dev_malloc(d, 4 * OC), *d_dw2 = (float*)dev_malloc(d, 4 * n_w), *d_db2 = (float*)dev_malloc(d, 4 * OC);
    void* d_dinp2 = dev_malloc(d, n_in * es);
    poison(d, d_out, n_out, dt);
    poison(d, d_gelu, n_out, dt);
    poison(d, d_dinp, n_in, dt);
    if (first == GRAD_SET) poison(d, d_dw, n_w, DT_F32);
    else dev_upload(d, d_dw, dw0, 4 * n_w);
    dev_upload(d, d_db, db0, 4 * OC);
    matmul_forward(d, d_out, d_inp, d_w, use_bias ? d_b : NULL, N, C, OC, use_gelu ? d_gelu : NULL);
    matmul_backward(d, d_dinp, d_dw, use_bias ? d_db : NULL, d_dout, d_inp, d_w, N, C, OC, first);
    matmul_backward(d, NULL, d_dw, use_bias ? d_db : NULL, d_dout, d_inp, d_w, N, C, OC, GRAD_ADD);
    dev_sync(d);

    float *got = (float*)xmalloc(4 * (n_out > n_w ? n_out : n_w));
    double tol = tolerance(dt);
    char name[160], shape[96];
    snprintf(shape, sizeof(shape), "%s N=%d C=%d OC=%d%s%s %s", dtype_name(dt), N, C, OC, use_bias ? " bias" : "", use_gelu ? " gelu" : "",
             use_gelu ? (matmul_gelu_epilogue_enabled ? "GELU epilogue" : "GELU kernel") : "");
    download_as(d, got, d_out, n_out, dt);
    snprintf(name, sizeof(name), "gpu matmul forward %s", shape);
    check_close(name, got, out_ref, n_out, tol);
    if (use_gelu) {
        download_as(d, got, d_gelu, n_out, dt);
        snprintf(name, sizeof(name), "gpu matmul gelu_out %s", shape);
        check_close(name, got, gelu_ref, n_out, tol);
    }
    download_as(d, got, d_dinp, n_in, dt);
    snprintf(name, sizeof(name), "gpu matmul dinp %s", shape);
    check_close(name, got, dinp_ref, n_in, tol);
    dev_download(d, got, d_dw, 4 * n_w);
    snprintf(name, sizeof(name), "gpu matmul dweight (%s, then +=) %s", first == GRAD_SET ? "= over NaN" : "+=", shape);
    check_close(name, got, dw_ref, n_w, dt == DT_F32 ? 1e-5 : 1e-3);
    if (use_bias) {
        dev_download(d, got, d_db, 4 * OC);
        snprintf(name, sizeof(name), "gpu matmul dbias (+= twice) %s", shape);
        check_close(name, got, db_ref, OC, dt == DT_F32 ? 1e-5 : 1e-3);
    }

    // determinism: the same calls again give the same bits
    poison(d, d_out2, n_out, dt);
    poison(d, d_gelu2, n_out, dt);
    poison(d, d_dinp2, n_in, dt);
    if (first == GRAD_SET) poison(d, d_dw2, n_w, DT_F32);
    else dev_upload(d, d_dw2, dw0, 4 * n_w);
    dev_upload(d, d_db2, db0, 4 * OC);
    matmul_forward(d, d_out2, d_inp, d_w, use_bias ? d_b : NULL, N, C, OC, use_gelu ? d_gelu2 : NULL);
    matmul_backward(d, d_dinp2, d_dw2, use_bias ? d_db2 : NULL, d_dout, d_inp, d_w, N, C, OC, first);
    matmul_backward(d, NULL, d_dw2, use_bias ? d_db2 : NULL, d_dout, d_inp, d_w, N, C, OC, GRAD_ADD);
    dev_sync(d);
    int same = same_bytes(d, d_out, d_out2, n_out * es) && same_bytes(d, d_dinp, d_dinp2, n_in * es) && same_bytes(d, d_dw, d_dw2, 4 * n_w);
    if (use_gelu) same = same && same_bytes(d, d_gelu, d_gelu2, n_out * es);
    if (use_bias) same = same && same_bytes(d, d_db, d_db2, 4 * OC);
    snprintf(name, sizeof(name), "gpu matmul bitwise deterministic %s", shape);
    check(same, name, "two runs differ");

    dev_free(d, d_inp); dev_free(d, d_w); dev_free(d, d_b); dev_free(d, d_dout); dev_free(d, d_out); dev_free(d, d_gelu);
    dev_free(d, d_dinp); dev_free(d, d_out2); dev_free(d, d_gelu2); dev_free(d, d_dw); dev_free(d, d_db); dev_free(d, d_dw2);
    dev_free(d, d_db2); dev_free(d, d_dinp2);
    free(inp); free(w); free(b); free(dout); free(dw0); free(db0); free(out_ref); free(gelu_ref); free(dinp_ref);
    free(dw_ref); free(db_ref); free(got);
}

// GPU out = residual + inp @ w^T (+ bias) vs the CPU on dtype-rounded inputs, in place too, and bitwise reruns.
static void test_matmul_residual_gpu(const Device* d, int N, int C, int OC, int use_bias) {
    DType dt = d->dtype;
    size_t n_in = (size_t)N * C, n_w = (size_t)OC * C, n_out = (size_t)N * OC, es = dtype_size(dt);
    MT19937 mt;
    mt_seed(&mt, 200 + N + C + OC + use_bias);
    float *inp = random_in_dtype(n_in, &mt, 1.0, dt), *w = random_in_dtype(n_w, &mt, 0.2, dt);
    float *b = random_in_dtype(OC, &mt, 1.0, dt), *res = random_in_dtype(n_out, &mt, 1.0, dt);
    float *ref = (float*)xmalloc(4 * n_out), *got = (float*)xmalloc(4 * n_out);
    matmul_forward_residual_cpu<float>(ref, res, inp, w, use_bias ? b : NULL, N, C, OC);
    void *d_inp = upload_as(d, inp, n_in, dt), *d_w = upload_as(d, w, n_w, dt), *d_b = upload_as(d, b, OC, dt), *d_res = upload_as(d, res, n_out, dt);
    void *d_out = dev_malloc(d, n_out * es), *d_out2 = dev_malloc(d, n_out * es);
    char shape[96], name[160];
    snprintf(shape, sizeof(shape), "%s%s N=%d C=%d OC=%d", dtype_name(dt), use_bias ? " bias" : "", N, C, OC);
    poison(d, d_out, n_out, dt);
    matmul_forward_residual(d, d_out, d_res, d_inp, d_w, use_bias ? d_b : NULL, N, C, OC);
    download_as(d, got, d_out, n_out, dt);
    snprintf(name, sizeof(name), "gpu matmul + residual %s", shape);
    check_close(name, got, ref, n_out, tolerance(dt));
    poison(d, d_out2, n_out, dt);
    matmul_forward_residual(d, d_out2, d_res, d_inp, d_w, use_bias ? d_b : NULL, N, C, OC);
    snprintf(name, sizeof(name), "gpu matmul + residual bitwise deterministic %s", shape);
    check(same_bytes(d, d_out, d_out2, n_out * es), name, "two runs differ");
    matmul_forward_residual(d, d_res, d_res, d_inp, d_w, use_bias ? d_b : NULL, N, C, OC);  // (cuBLASLt may pick another algorithm)
    download_as(d, got, d_res, n_out, dt);
    snprintf(name, sizeof(name), "gpu matmul + residual in place %s", shape);
    check_close(name, got, ref, n_out, tolerance(dt));
    dev_free(d, d_inp); dev_free(d, d_w); dev_free(d, d_b); dev_free(d, d_res); dev_free(d, d_out); dev_free(d, d_out2);
    free(inp); free(w); free(b); free(res); free(ref); free(got);
}

// GPU backward through the GELU (dpre, and dpre_bias accumulated twice) vs the CPU on dtype-rounded inputs, and bitwise reruns.
static void test_matmul_dgelu_gpu(const Device* d, int N, int C, int OC) {
    DType dt = d->dtype;
    size_t n_pre = (size_t)N * C, n_w = (size_t)OC * C, n_out = (size_t)N * OC, es = dtype_size(dt);
    MT19937 mt;
    mt_seed(&mt, 300 + N + C + OC);
    float *pre = random_in_dtype(n_pre, &mt, 1.5, dt), *w = random_in_dtype(n_w, &mt, 0.2, dt);
    float *dout = random_in_dtype(n_out, &mt, 1.0, dt), *db0 = random_in_dtype(C, &mt, 1.0, DT_F32);
    float *dpre_ref = (float*)xmalloc(4 * n_pre), *db_ref = (float*)xmalloc(4 * C), *got = (float*)xmalloc(4 * n_pre);
    memcpy(db_ref, db0, 4 * C);
    matmul_backward_dgelu_cpu<float>(dpre_ref, db_ref, dout, w, pre, N, C, OC);
    matmul_backward_dgelu_cpu<float>(dpre_ref, db_ref, dout, w, pre, N, C, OC);

    void *d_pre = upload_as(d, pre, n_pre, dt), *d_w = upload_as(d, w, n_w, dt), *d_dout = upload_as(d, dout, n_out, dt);
    void *d_dpre[2] = {dev_malloc(d, n_pre * es), dev_malloc(d, n_pre * es)};
    float* d_db[2] = {(float*)dev_malloc(d, 4 * C), (float*)dev_malloc(d, 4 * C)};
    for (int run = 0; run < 2; run++) {
        poison(d, d_dpre[run], n_pre, dt);
        dev_upload(d, d_db[run], db0, 4 * C);
        matmul_backward_dgelu(d, d_dpre[run], d_db[run], d_dout, d_w, d_pre, N, C, OC);
        matmul_backward_dgelu(d, d_dpre[run], d_db[run], d_dout, d_w, d_pre, N, C, OC);
    }
    dev_sync(d);
    char name[256], shape[128];
    snprintf(shape, sizeof(shape), "%s N=%d C=%d OC=%d %s", dtype_name(dt), N, C, OC, matmul_gelu_epilogue_enabled ? "DGELU epilogue" : "GELU-gradient kernel");
    download_as(d, got, d_dpre[0], n_pre, dt);
    snprintf(name, sizeof(name), "gpu matmul dgelu dpre %s", shape);
    check_close(name, got, dpre_ref, n_pre, tolerance(dt));
    dev_download(d, got, d_db[0], 4 * C);
    snprintf(name, sizeof(name), "gpu matmul dgelu dbias (+= twice) %s", shape);
    // fp32 sums of dpre rounded to half once (epilogue) or twice (the product, then the GELU gradient)
    check_close(name, got, db_ref, C, dt == DT_F32 ? 1e-5 : 4e-3);
    snprintf(name, sizeof(name), "gpu matmul dgelu bitwise deterministic %s", shape);
    check(same_bytes(d, d_dpre[0], d_dpre[1], n_pre * es) && same_bytes(d, d_db[0], d_db[1], 4 * C), name, "two runs differ");
    dev_free(d, d_pre); dev_free(d, d_w); dev_free(d, d_dout);
    for (int run = 0; run < 2; run++) {
        dev_free(d, d_dpre[run]);
        dev_free(d, d_db[run]);
    }
    free(pre); free(w); free(dout); free(db0); free(dpre_ref); free(db_ref); free(got);
}

// GPU cross-entropy vs the CPU on dtype-rounded logits; padded logits are NaN and must take no part.
static void test_crossentropy_gpu(const Device* d, int N, int V, int Vp, int with_grad) {
    DType dt = d->dtype;
    size_t n_logits = (size_t)N * Vp, es = dtype_size(dt);
    MT19937 mt;
    mt_seed(&mt, 200 + N + V + Vp + with_grad);
    float *logits = random_in_dtype(n_logits, &mt, 3.0, dt), *ref = (float*)xmalloc(4 * n_logits), *got = (float*)xmalloc(4 * n_logits);
    float *dloss = (float*)xmalloc(4 * N), *losses_ref = (float*)xmalloc(4 * N), *losses = (float*)xmalloc(4 * N);
    int* targets = (int*)xmalloc(4 * N);
    for (int n = 0; n < N; n++) {
        for (int i = V; i < Vp; i++) logits[(size_t)n * Vp + i] = NAN;
        targets[n] = mt_u32(&mt) % V;
        dloss[n] = (float)((0.5 + mt_uniform(&mt)) / N);
    }
    memcpy(ref, logits, 4 * n_logits);
    crossentropy_forward_backward_cpu<float>(losses_ref, ref, targets, with_grad ? dloss : NULL, N, V, Vp);

    void* d_logits = upload_as(d, logits, n_logits, dt);
    void* d_logits2 = upload_as(d, logits, n_logits, dt);
    float *d_losses = (float*)dev_malloc(d, 4 * N), *d_losses2 = (float*)dev_malloc(d, 4 * N), *d_dloss = (float*)dev_malloc(d, 4 * N);
    int* d_targets = (int*)dev_malloc(d, 4 * N);
    dev_upload(d, d_targets, targets, 4 * N);
    dev_upload(d, d_dloss, dloss, 4 * N);
    poison(d, d_losses, N, DT_F32);
    poison(d, d_losses2, N, DT_F32);
    crossentropy_forward_backward(d, d_losses, d_logits, d_targets, with_grad ? d_dloss : NULL, N, V, Vp);
    crossentropy_forward_backward(d, d_losses2, d_logits2, d_targets, with_grad ? d_dloss : NULL, N, V, Vp);
    dev_sync(d);

    char name[160], shape[96];
    snprintf(shape, sizeof(shape), "%s N=%d V=%d Vp=%d%s", dtype_name(dt), N, V, Vp, with_grad ? "" : " (loss only)");
    dev_download(d, losses, d_losses, 4 * N);
    snprintf(name, sizeof(name), "gpu cross-entropy losses %s", shape);
    check_close(name, losses, losses_ref, N, 1e-5);
    download_as(d, got, d_logits, n_logits, dt);
    if (with_grad) {
        snprintf(name, sizeof(name), "gpu cross-entropy gradient %s", shape);
        check_close(name, got, ref, n_logits, tolerance(dt));
        int pad_zero = 1;
        for (int n = 0; n < N; n++)
            for (int i = V; i < Vp; i++) pad_zero &= got[(size_t)n * Vp + i] == 0.0f;
        snprintf(name, sizeof(name), "gpu cross-entropy gradient 0 on padded columns %s", shape);
        check(pad_zero, name, "nonzero");
    } else {
        snprintf(name, sizeof(name), "gpu cross-entropy leaves logits alone without dloss %s", shape);
        check(!memcmp(got, logits, 4 * n_logits), name, "logits changed");
    }
    snprintf(name, sizeof(name), "gpu cross-entropy bitwise deterministic %s", shape);
    check(same_bytes(d, d_losses, d_losses2, 4 * N) && same_bytes(d, d_logits, d_logits2, n_logits * es), name, "two runs differ");

    dev_free(d, d_logits); dev_free(d, d_logits2); dev_free(d, d_losses); dev_free(d, d_losses2); dev_free(d, d_dloss); dev_free(d, d_targets);
    free(logits); free(ref); free(got); free(dloss); free(losses_ref); free(losses); free(targets);
}

// One layer's bf16 products (N rows, hidden C, MLP width F): the first MLP linear with cuBLASLt's
// GELU epilogue and with the GELU kernel, the QKV backward with its bias gradient, the second
// linear's backward to the GELU's input, and a projection adding bias and residual in its epilogue
// against the same with the bias-dropout-add kernel.
static void bench(int N, int C, int F) {
    Device d;
    device_init(&d, "cuda", DT_BF16);
    size_t most = (size_t)N * F;
    float* h = (float*)xmalloc(most * 4);
    MT19937 mt;
    mt_seed(&mt, 8);
    fill_normal(h, most, &mt, 1.0);
    void *x = upload_as(&d, h, (size_t)N * C, DT_BF16), *pre = upload_as(&d, h, most, DT_BF16), *act = dev_malloc(&d, most * 2);
    void *w1 = upload_as(&d, h, (size_t)F * C, DT_BF16), *b1 = upload_as(&d, h, F, DT_BF16);
    void *dqkv = upload_as(&d, h, (size_t)N * 3 * C, DT_BF16), *dx = dev_malloc(&d, (size_t)N * C * 2);
    float *dw = (float*)dev_malloc(&d, (size_t)F * C * 4), *db = (float*)dev_malloc(&d, F * 4);
    dev_zero(&d, dw, (size_t)F * C * 4);
    dev_zero(&d, db, F * 4);
    for (int fused = 1; fused >= 0; fused--) {
        matmul_gelu_epilogue_enabled = fused;
        double fwd = median_ms(&d, [&]() { matmul_forward(&d, pre, x, w1, b1, N, C, F, act); });
        printf("bench bf16 N=%d C=%d F=%d: fc1 + GELU forward with the %s %.3f ms\n", N, C, F, fused ? "GELU_AUX epilogue" : "GELU kernel", fwd);
    }
    matmul_gelu_epilogue_enabled = 1;
    // what the GELU costs the product: fc1 with its bias alone, and with GELU_BIAS (no pre-activation kept)
    double bias_only = median_ms(&d, [&]() { matmul_forward(&d, pre, x, w1, b1, N, C, F, NULL); });
    double gelu_no_aux = median_ms(&d, [&]() {
        matmul_cublaslt(&d, act, CUDA_R_16BF, F, w1, 1, C, x, 0, C, F, N, C, NULL, CUBLASLT_EPILOGUE_GELU_BIAS, b1, NULL);
    });
    printf("bench bf16 N=%d C=%d F=%d: fc1 with its bias only %.3f ms, with GELU_BIAS (no aux output) %.3f ms\n", N, C, F, bias_only, gelu_no_aux);
    double qkv = median_ms(&d, [&]() { matmul_backward(&d, dx, dw, db, dqkv, x, w1, N, C, 3 * C, GRAD_ADD); });
    printf("bench bf16 N=%d C=%d F=%d: qkv backward with bias %.3f ms\n", N, C, F, qkv);
    for (int fused = 1; fused >= 0; fused--) {
        matmul_gelu_epilogue_enabled = fused;
        double mlp = median_ms(&d, [&]() { matmul_backward_dgelu(&d, act, db, dx, w1, pre, N, F, C); });
        printf("bench bf16 N=%d C=%d F=%d: fc2 backward to the GELU input (dinp, gelu', bias gradient) with the %s %.3f ms\n", N, C, F,
               fused ? "DGELU epilogue" : "GELU-gradient kernel", mlp);
    }
    matmul_gelu_epilogue_enabled = 1;
    // the attention projection closing its residual branch (no dropout)
    void *res = upload_as(&d, h, (size_t)N * C, DT_BF16), *out = dev_malloc(&d, (size_t)N * C * 2);
    double fused = median_ms(&d, [&]() { matmul_forward_residual(&d, out, res, x, w1, b1, N, C, C); });
    double apart = median_ms(&d, [&]() {
        matmul_forward(&d, dx, x, w1, NULL, N, C, C, NULL);
        residual_dropout_forward(&d, out, res, dx, b1, 0.0f, 0, N, C);
    });
    printf("bench bf16 N=%d C=%d: projection + bias + residual %.3f ms in the matmul's epilogue, %.3f ms as matmul + bias-dropout-add kernel\n",
           N, C, fused, apart);
    for (int tuned = 0; tuned < 2; tuned++) {  // the heuristic's algorithms, then the fastest of its first eight
        matmul_autotune_enabled = tuned;
        matmul_algo_count = 0;
        double fc1 = median_ms(&d, [&]() { matmul_forward(&d, pre, x, w1, b1, N, C, F, act); });
        double qkv_bwd = median_ms(&d, [&]() { matmul_backward(&d, dx, dw, db, dqkv, x, w1, N, C, 3 * C, GRAD_ADD); });
        double fc2_bwd = median_ms(&d, [&]() { matmul_backward_dgelu(&d, act, db, dx, w1, pre, N, F, C); });
        printf("bench bf16 N=%d C=%d F=%d: %s: fc1 + GELU forward %.3f ms, qkv backward %.3f ms, fc2 backward to the GELU input %.3f ms\n",
               N, C, F, tuned ? "--matmul-autotune" : "heuristic's algorithms", fc1, qkv_bwd, fc2_bwd);
    }
    matmul_autotune_enabled = 0;
    matmul_algo_count = 0;
    double dbias = median_ms(&d, [&]() { matmul_dbias_cuda(&d, db, dx, NULL, N, C); });
    double dbias_f = median_ms(&d, [&]() { matmul_dbias_cuda(&d, db, pre, NULL, N, F); });
    printf("bench bf16 N=%d C=%d F=%d: bias gradients (column sums) of [N, C] %.4f ms, %.0f GB/s; of [N, F] %.4f ms, %.0f GB/s\n", N, C, F,
           dbias, (double)N * C * 2 / dbias * 1e-6, dbias_f, (double)N * F * 2 / dbias_f * 1e-6);
    dev_free(&d, res); dev_free(&d, out);
    dev_free(&d, x); dev_free(&d, pre); dev_free(&d, act); dev_free(&d, w1); dev_free(&d, b1);
    dev_free(&d, dqkv); dev_free(&d, dx); dev_free(&d, dw); dev_free(&d, db);
    free(h);
    device_free(&d);
}

static void benches(void) {
    bench(16 * 1024, 768, 3072);   // GPT-2 124M, B16 x T1024
    bench(8 * 2048, 2304, 9216);   // the 1.7B model, B8 x T2048
}

static void test_gpu(void) {
    if (!gpu_available()) {
        printf("skip gpu matmul and cross-entropy: no GPU\n");
        return;
    }
    const DType dtypes[3] = {DT_F32, DT_BF16, DT_F16};
    for (int t = 0; t < 3; t++) {
        Device d;
        device_init(&d, "cuda", dtypes[t]);
        const int shapes[][3] = {{64, 192, 768}, {256, 768, 3072}, {37, 24, 40}};
        for (int fused = 1; fused >= 0; fused--) {  // cuBLASLt's GELU epilogue, then the GELU kernel instead
            matmul_gelu_epilogue_enabled = fused;
            for (int s = 0; s < 3; s++)
                for (int variant = 0; variant < 4; variant++)  // without/with bias, without/with gelu_out
                    test_matmul_gpu(&d, shapes[s][0], shapes[s][1], shapes[s][2], variant & 1, variant >> 1);
            test_matmul_gpu(&d, 5, 13, 7, 1, 1);  // odd sizes: no 16-byte alignment anywhere
        }
        for (int fused = 1; fused >= 0; fused--) {  // the DGELU epilogue, then our GELU-gradient pass
            matmul_gelu_epilogue_enabled = fused;
            for (int s = 0; s < 3; s++) test_matmul_dgelu_gpu(&d, shapes[s][0], shapes[s][2], shapes[s][1]);  // the MLP's second linear: OC -> C
            test_matmul_dgelu_gpu(&d, 5, 13, 7);
        }
        matmul_gelu_epilogue_enabled = 1;
        for (int s = 0; s < 3; s++)
            for (int use_bias = 0; use_bias < 2; use_bias++) test_matmul_residual_gpu(&d, shapes[s][0], shapes[s][2], shapes[s][1], use_bias);
        test_matmul_residual_gpu(&d, 5, 13, 7, 1);
        const int qkv[][4] = {{256, 4, 64, 256}, {1000, 12, 64, 768}, {700, 3, 96, 300}, {37, 2, 12, 24}};  // the last: no 16-byte columns in bf16
        for (int s = 0; s < 4; s++) test_qkv_bias_gpu(&d, qkv[s][0], qkv[s][1], qkv[s][2], qkv[s][3]);
        int large = dtypes[t] != DT_F16;  // the large shapes in fp32 and bf16 only: their CPU side takes a while
        if (large) test_matmul_gpu(&d, 1024, 192, 50304, 0, 0);  // the LM head
        // rows staged in shared memory (aligned, short enough), read from global memory (150016: too long;
        // 50 and 1: not 16-byte multiples), and the GPT-2 vocabulary at a full batch's rows
        const int ce[][3] = {{64, 50257, 50304}, {100, 37, 40}, {16, 150000, 150016}, {33, 50, 50}, {7, 1, 1}, {4096, 50257, 50304}};
        for (int s = 0; s < (large ? 6 : 5); s++) test_crossentropy_gpu(&d, ce[s][0], ce[s][1], ce[s][2], 1);
        test_crossentropy_gpu(&d, 64, 50257, 50304, 0);
        device_free(&d);
    }
    // --matmul-autotune: each problem's algorithm chosen by timing (the accumulating weight
    // gradients tuned on scratch memory, not the real sums), against the same CPU references
    matmul_autotune_enabled = 1;
    matmul_algo_count = 0;  // forget the heuristic's choices: every problem is tuned again
    Device d;
    device_init(&d, "cuda", DT_BF16);
    const int shapes[][3] = {{256, 768, 3072}, {512, 256, 768}};
    for (int s = 0; s < 2; s++) {
        for (int variant = 0; variant < 4; variant++) test_matmul_gpu(&d, shapes[s][0], shapes[s][1], shapes[s][2], variant & 1, variant >> 1);
        test_matmul_dgelu_gpu(&d, shapes[s][0], shapes[s][2], shapes[s][1]);
        test_matmul_residual_gpu(&d, shapes[s][0], shapes[s][2], shapes[s][1], 1);
    }
    device_free(&d);
    matmul_autotune_enabled = 0;
    matmul_algo_count = 0;
}
#endif

int main(int argc, char** argv) {
    int want_bench = argc > 1 && !strcmp(argv[1], "--bench"), bench_only = argc > 1 && !strcmp(argv[1], "--bench-only");
#ifdef __CUDACC__
    if (bench_only && gpu_available()) {  // (comparing builds: the timings without the checks' minute)
        benches();
        return 0;
    }
#endif
    if (bench_only) die("--bench-only needs a GPU");
    test_gemm_shape<double>(1, 1, 1, 1e-14);
    test_gemm_shape<double>(5, 7, 9, 1e-14);
    test_gemm_shape<double>(37, 300, 45, 1e-14);
    test_gemm_shape<float>(300, 600, 70, 1e-6);
    test_gemm_shape<float>(70, 33, 4200, 1e-6);
    test_gemm_shape<float>(64, 192, 768, 1e-6);
    test_matmul_finite_differences();
    test_matmul_residual_cpu();
    test_matmul_dgelu_finite_differences();
    test_matmul_thread_independence();
    test_crossentropy_cpu();
    test_cpu_dispatch();
    test_grad_set_cpu();
#ifdef __CUDACC__
    test_gpu();
    if (want_bench && gpu_available()) benches();
#else
    if (want_bench) printf("skip bench: built without CUDA\n");
#endif
    return test_summary();
}
