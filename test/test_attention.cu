/*
test_attention: causal self-attention (section layers-attention of megatron.h).

CPU: the flash-style reference against a naive formula that materialises the T x T
probabilities, and its backward against central finite differences in double, with and
without attention dropout. GPU (when one is found): CUDA against the CPU reference run
in double on the same (dtype-rounded) inputs, fp32 / bf16 / fp16, forward (out, lse) and
backward (dq, dk, dv checked apart), p = 0 and 0.1, plus bitwise determinism.
Decode steps (the KV cache): attention_decode's rows equal the full forward's rows, bitwise on
the CPU, on every device and dtype.
With cuDNN in the build, the GPU cases without dropout run again through cuDNN's fused
attention (--attention-backend fused), in bf16 and fp16.
`--bench` also times the bf16 kernels on GPT-2 124M's shape (and a 1.7B-like one), and cuDNN's.
*/
#include "../megatron.h"
#include "test.h"

// out = dropout(softmax(mask(Q K^T / sqrt(HS)))) V with the whole T x T matrix in memory.
static void attention_naive(double* out, double* lse, const double* qkv, float p, uint64_t seed, int B, int T, int NH, int HS) {
    int C = NH * HS;
    double* att = (double*)xmalloc((size_t)T * T * sizeof(double));
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            for (int i = 0; i < T; i++)
                for (int j = 0; j < T; j++) {
                    double s = 0;
                    for (int d = 0; d < HS; d++)
                        s += qkv[((size_t)i * B + b) * 3 * C + h * 3 * HS + d] * qkv[((size_t)j * B + b) * 3 * C + h * 3 * HS + HS + d];
                    att[i * T + j] = j <= i ? s / sqrt((double)HS) : -INFINITY;
                }
            for (int i = 0; i < T; i++) {
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < T; j++) mx = fmax(mx, att[i * T + j]);
                for (int j = 0; j < T; j++) sum += exp(att[i * T + j] - mx);
                lse[((size_t)b * NH + h) * T + i] = mx + log(sum);
                for (int j = 0; j < T; j++) {
                    double w = exp(att[i * T + j] - mx) / sum;
                    uint64_t idx = (((uint64_t)b * NH + h) * T + i) * T + j;
                    if (p > 0) w = dropout_keep(seed, idx, p) ? w / (1 - (double)p) : 0;
                    att[i * T + j] = w;
                }
            }
            for (int i = 0; i < T; i++)
                for (int d = 0; d < HS; d++) {
                    double o = 0;
                    for (int j = 0; j < T; j++) o += att[i * T + j] * qkv[((size_t)j * B + b) * 3 * C + h * 3 * HS + 2 * HS + d];
                    out[((size_t)i * B + b) * C + h * HS + d] = o;
                }
        }
    free(att);
}

static void test_cpu_forward(int B, int T, int NH, int HS, float p) {
    MT19937 mt;
    mt_seed(&mt, 1234 + T);
    size_t N = (size_t)B * T, C = (size_t)NH * HS;
    double* qkv = (double*)xmalloc(N * 3 * C * sizeof(double));
    double *out = (double*)xmalloc(N * C * sizeof(double)), *out_ref = (double*)xmalloc(N * C * sizeof(double));
    double *lse = (double*)xmalloc(B * NH * T * sizeof(double)), *lse_ref = (double*)xmalloc(B * NH * T * sizeof(double));
    fill_normal(qkv, N * 3 * C, &mt, 1.0);
    attention_forward_cpu<double>(out, lse, qkv, 0, p, 77, B, T, NH, HS);
    attention_naive(out_ref, lse_ref, qkv, p, 77, B, T, NH, HS);
    char name[128];
    snprintf(name, sizeof(name), "cpu fwd vs naive out B=%d T=%d NH=%d HS=%d p=%g", B, T, NH, HS, p);
    check_close(name, out, out_ref, N * C, 1e-12);
    snprintf(name, sizeof(name), "cpu fwd vs naive lse B=%d T=%d NH=%d HS=%d p=%g", B, T, NH, HS, p);
    check_close(name, lse, lse_ref, (size_t)B * NH * T, 1e-12);
    free(qkv); free(out); free(out_ref); free(lse); free(lse_ref);
}

// loss = sum(out * G): its gradient by the backward against central differences.
static void test_cpu_backward_fd(int B, int T, int NH, int HS, float p) {
    MT19937 mt;
    mt_seed(&mt, 99 + T);
    size_t N = (size_t)B * T, C = (size_t)NH * HS, nqkv = N * 3 * C;
    double* qkv = (double*)xmalloc(nqkv * sizeof(double));
    double* G = (double*)xmalloc(N * C * sizeof(double));
    double* out = (double*)xmalloc(N * C * sizeof(double));
    double* lse = (double*)xmalloc(B * NH * T * sizeof(double));
    double* delta = (double*)xmalloc(B * NH * T * sizeof(double));
    double* dqkv = (double*)xmalloc(nqkv * sizeof(double));
    fill_normal(qkv, nqkv, &mt, 1.0);
    fill_normal(G, N * C, &mt, 1.0);
    uint64_t seed = 4242;
    attention_forward_cpu<double>(out, lse, qkv, 0, p, seed, B, T, NH, HS);
    attention_backward_cpu<double>(dqkv, delta, G, qkv, out, lse, p, seed, B, T, NH, HS);
    double* out2 = (double*)xmalloc(N * C * sizeof(double));
    double* lse2 = (double*)xmalloc(B * NH * T * sizeof(double));
    double* numeric = central_differences(qkv, nqkv, 1e-6, [&]() {
        attention_forward_cpu<double>(out2, lse2, qkv, 0, p, seed, B, T, NH, HS);
        double loss = 0;
        for (size_t i = 0; i < N * C; i++) loss += out2[i] * G[i];
        return loss;
    });
    char name[128];
    snprintf(name, sizeof(name), "cpu bwd vs finite differences B=%d T=%d NH=%d HS=%d p=%g", B, T, NH, HS, p);
    check_close(name, dqkv, numeric, nqkv, 1e-7);
    free(qkv); free(G); free(out); free(lse); free(delta); free(dqkv); free(numeric); free(out2); free(lse2);
}

// The CPU dispatcher (fp32, what CPU training runs) against the reference in double.
static void test_cpu_dispatch(int B, int T, int NH, int HS, float p) {
    Device d;
    device_init(&d, "cpu", DT_F32);
    MT19937 mt;
    mt_seed(&mt, 7 + T);
    size_t N = (size_t)B * T, C = (size_t)NH * HS, nqkv = N * 3 * C, nlse = (size_t)B * NH * T;
    double* x = (double*)xmalloc((nqkv + N * C) * sizeof(double));  // qkv then dout
    fill_normal(x, nqkv + N * C, &mt, 1.0);
    float* xf = (float*)xmalloc((nqkv + N * C) * sizeof(float));
    for (size_t i = 0; i < nqkv + N * C; i++) xf[i] = (float)x[i], x[i] = xf[i];
    double *out = (double*)xmalloc(N * C * sizeof(double)), *lse = (double*)xmalloc(nlse * sizeof(double));
    double *delta = (double*)xmalloc(nlse * sizeof(double)), *dqkv = (double*)xmalloc(nqkv * sizeof(double));
    attention_forward_cpu<double>(out, lse, x, 0, p, 3, B, T, NH, HS);
    attention_backward_cpu<double>(dqkv, delta, x + nqkv, x, out, lse, p, 3, B, T, NH, HS);
    float *outf = (float*)xmalloc(N * C * sizeof(float)), *lsef = (float*)xmalloc(nlse * sizeof(float));
    float *deltaf = (float*)xmalloc(nlse * sizeof(float)), *dqkvf = (float*)xmalloc(nqkv * sizeof(float));
    attention_forward(&d, outf, lsef, xf, p, 3, B, T, NH, HS);
    attention_backward(&d, dqkvf, deltaf, xf + nqkv, xf, outf, lsef, p, 3, B, T, NH, HS);
    char name[128];
    snprintf(name, sizeof(name), "cpu fp32 dispatch fwd B=%d T=%d NH=%d HS=%d p=%g", B, T, NH, HS, p);
    check_close(name, outf, out, N * C, 1e-5);
    snprintf(name, sizeof(name), "cpu fp32 dispatch bwd B=%d T=%d NH=%d HS=%d p=%g", B, T, NH, HS, p);
    check_close(name, dqkvf, dqkv, nqkv, 1e-5);
    free(x); free(xf); free(out); free(lse); free(delta); free(dqkv); free(outf); free(lsef); free(deltaf); free(dqkvf);
    device_free(&d);
}

// Which kernels run attention on d: "cpu", "gpu", "gpu wgmma" (the Hopper kernels) or "cudnn".
static const char* kernels_used(const Device* d, int HS) {
#ifdef __CUDACC__
    if (d->is_gpu && d->attention_fused) return "cudnn";
    if (d->is_gpu && d->dtype != DT_F32 && att_wgmma_usable(d, HS)) return "gpu wgmma";
#endif
    (void)HS;
    return d->is_gpu ? "gpu" : "cpu";
}

// A KV cache of maxT rows whose rows from pos+n on are NaN (they must not be read): attention_decode
// of the query rows [pos, pos+n) against attention_forward over rows [0, pos+n) of the same cache.
static void test_decode(const Device* d, int B, int maxT, int NH, int HS, int pos, int n) {
    DType dt = d->dtype;
    size_t C = (size_t)NH * HS, T = (size_t)pos + n, ncache = (size_t)maxT * B * 3 * C, es = dtype_size(dt);
    MT19937 mt;
    mt_seed(&mt, 31 + pos + 7 * n);
    float* host = (float*)xmalloc(ncache * sizeof(float));
    fill_normal(host, T * B * 3 * C, &mt, 1.0);
    for (size_t i = T * B * 3 * C; i < ncache; i++) host[i] = NAN;
    void* stored = xmalloc(ncache * es);
    floats_to_dtype(stored, host, ncache, dt);
    void* cache = dev_malloc(d, ncache * es);
    dev_upload(d, cache, stored, ncache * es);
    void *full = dev_malloc(d, T * B * C * es), *rows = dev_malloc(d, (size_t)n * B * C * es);
    float *lse_full = (float*)dev_malloc(d, T * B * NH * 4), *lse_rows = (float*)dev_malloc(d, (size_t)n * B * NH * 4);
    attention_forward(d, full, lse_full, cache, 0.0f, 0, B, (int)T, NH, HS);
    attention_decode(d, rows, lse_rows, cache, pos, n, B, NH, HS);
    void* buf = xmalloc(T * B * C * es);
    float *want = (float*)xmalloc(T * B * C * sizeof(float)), *got = (float*)xmalloc((size_t)n * B * C * sizeof(float));
    dev_download(d, buf, full, T * B * C * es);
    dtype_to_floats(want, buf, T * B * C, dt);
    dev_download(d, buf, rows, (size_t)n * B * C * es);
    dtype_to_floats(got, buf, (size_t)n * B * C, dt);
    float *lse_want = (float*)xmalloc(T * B * NH * 4), *lse_got = (float*)xmalloc((size_t)n * B * NH * 4);
    dev_download(d, lse_want, lse_full, T * B * NH * 4);
    dev_download(d, lse_got, lse_rows, (size_t)n * B * NH * 4);
    for (size_t bh = 0; bh < (size_t)B * NH; bh++) memmove(lse_want + bh * n, lse_want + bh * T + pos, n * 4);
    // the same arithmetic per row: bitwise on the CPU; on a GPU the tiles start elsewhere
    double tol = !d->is_gpu ? 0.0 : dt == DT_F32 ? 1e-6 : 1e-3;
    const char* where = kernels_used(d, HS);
    char name[160];
    snprintf(name, sizeof(name), "%s %s decode out = full rows B=%d NH=%d HS=%d pos=%d n=%d", where, dtype_name(dt), B, NH, HS, pos, n);
    check_close(name, got, want + (size_t)pos * B * C, (size_t)n * B * C, tol);
    snprintf(name, sizeof(name), "%s %s decode lse = full rows B=%d NH=%d HS=%d pos=%d n=%d", where, dtype_name(dt), B, NH, HS, pos, n);
    check_close(name, lse_got, lse_want, (size_t)n * B * NH, tol);
    dev_free(d, cache); dev_free(d, full); dev_free(d, rows); dev_free(d, lse_full); dev_free(d, lse_rows);
    free(host); free(stored); free(buf); free(want); free(got); free(lse_want); free(lse_got);
}

#ifdef __CUDACC__
// Describes entry idx of a tensor as coordinates, for failure messages.
typedef void (*Locate)(char* buf, size_t len, size_t idx, int B, int T, int NH, int HS);

static void locate_out(char* buf, size_t len, size_t idx, int B, int T, int NH, int HS) {
    (void)T;
    size_t C = (size_t)NH * HS, r = idx / C, c = idx % C;
    snprintf(buf, len, "t=%zu b=%zu head=%zu d=%zu", r / B, r % B, c / HS, c % HS);
}
static void locate_lse(char* buf, size_t len, size_t idx, int B, int T, int NH, int HS) {
    (void)B; (void)HS;
    snprintf(buf, len, "t=%zu b=%zu head=%zu", idx % T, idx / T / NH, idx / T % NH);
}
static void locate_qkv(char* buf, size_t len, size_t idx, int B, int T, int NH, int HS) {
    (void)T;
    size_t C3 = 3 * (size_t)NH * HS, r = idx / C3, c = idx % C3;
    snprintf(buf, len, "t=%zu b=%zu head=%zu %c d=%zu", r / B, r % B, c / (3 * HS), "qkv"[c % (3 * HS) / HS], c % HS);
}

// ||got - want|| / ||want|| over the entries of part (0, 1, 2: the q, k, v columns of a
// dqkv; -1: all), reporting the largest difference (or first NaN) by its location.
static int compare(const char* name, const float* got, const double* want, size_t n, double tol, Locate where,
                   int B, int T, int NH, int HS, int part) {
    double num = 0, den = 0, worst = -1;
    size_t worst_i = 0, count = 0;
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (part >= 0 && (int)(i % (3 * (size_t)NH * HS) % (3 * HS) / HS) != part) continue;
        double g = got[i], w = want[i], e = fabs(g - w);
        count++;
        if (g != g) { if (!bad) worst_i = i; bad = 1; e = INFINITY; }
        num += (g - w) * (g - w);
        den += w * w;
        if (!bad && e > worst) { worst = e; worst_i = i; }
    }
    double err = bad ? INFINITY : sqrt(num / (den > 0 ? den : 1));
    char loc[128], label[256];
    where(loc, sizeof(loc), worst_i, B, T, NH, HS);
    snprintf(label, sizeof(label), "%s (relative error %.2e)", name, err);
    return check(err <= tol, label, "above %.1e over %zu values; %s at %s: got %.6g want %.6g", tol, count,
                 bad ? "first NaN" : "largest difference", loc, (double)got[worst_i], want[worst_i]);
}

// x rounded to dtype dt in place; returns the dt storage for upload.
static void* round_to_dtype(double* x, size_t n, DType dt) {
    float* f = (float*)xmalloc(n * sizeof(float));
    void* stored = xmalloc(n * dtype_size(dt));
    for (size_t i = 0; i < n; i++) f[i] = (float)x[i];
    floats_to_dtype(stored, f, n, dt);
    dtype_to_floats(f, stored, n, dt);
    for (size_t i = 0; i < n; i++) x[i] = f[i];
    free(f);
    return stored;
}

// GPU fwd and bwd for one shape, dtype and p against the CPU reference in double.
static void test_gpu_case(Device* d, int B, int T, int NH, int HS, float p) {
    DType dt = d->dtype;
    MT19937 mt;
    mt_seed(&mt, 1000 + B * 7 + T * 3 + HS + dt * 101 + (p > 0));
    size_t N = (size_t)B * T, C = (size_t)NH * HS, nqkv = N * 3 * C, nout = N * C, nlse = (size_t)B * NH * T;
    size_t es = dtype_size(dt);
    uint64_t seed = 0xC0FFEEull + T;

    // inputs, rounded to the dtype; the reference sees the rounded values
    double* qkv_d = (double*)xmalloc(nqkv * sizeof(double));
    double* dout_d = (double*)xmalloc(nout * sizeof(double));
    fill_normal(qkv_d, nqkv, &mt, 1.0);
    fill_normal(dout_d, nout, &mt, 1.0);
    void* qkv_h = round_to_dtype(qkv_d, nqkv, dt);
    void* dout_h = round_to_dtype(dout_d, nout, dt);

    double* out_ref = (double*)xmalloc(nout * sizeof(double));
    double* lse_ref = (double*)xmalloc(nlse * sizeof(double));
    double* delta_ref = (double*)xmalloc(nlse * sizeof(double));
    double* dqkv_ref = (double*)xmalloc(nqkv * sizeof(double));
    attention_forward_cpu<double>(out_ref, lse_ref, qkv_d, 0, p, seed, B, T, NH, HS);
    attention_backward_cpu<double>(dqkv_ref, delta_ref, dout_d, qkv_d, out_ref, lse_ref, p, seed, B, T, NH, HS);

    void *qkv_g = dev_malloc(d, nqkv * es), *dout_g = dev_malloc(d, nout * es), *out_g = dev_malloc(d, nout * es);
    void* dqkv_g = dev_malloc(d, nqkv * es);
    float *lse_g = (float*)dev_malloc(d, nlse * 4), *delta_g = (float*)dev_malloc(d, nlse * 4);
    dev_upload(d, qkv_g, qkv_h, nqkv * es);
    dev_upload(d, dout_g, dout_h, nout * es);
    // NaN everywhere an output goes (0xff bytes are NaN in fp32, bf16 and fp16)
    cudaCheck(cudaMemset(out_g, 0xff, nout * es));
    cudaCheck(cudaMemset(lse_g, 0xff, nlse * 4));
    cudaCheck(cudaMemset(dqkv_g, 0xff, nqkv * es));
    cudaCheck(cudaMemset(delta_g, 0xff, nlse * 4));
    attention_forward(d, out_g, lse_g, qkv_g, p, seed, B, T, NH, HS);
    attention_backward(d, dqkv_g, delta_g, dout_g, qkv_g, out_g, lse_g, p, seed, B, T, NH, HS);
    dev_sync(d);

    void* buf = xmalloc(nqkv * es);
    float* got = (float*)xmalloc(nqkv * sizeof(float));
    double tol = dt == DT_F32 ? 1e-5 : 2e-2, tol_lse = dt == DT_F32 ? 1e-5 : 1e-4;
    char tag[96], name[160];
    snprintf(tag, sizeof(tag), "%s %s B=%d T=%d NH=%d HS=%d p=%g", kernels_used(d, HS), dtype_name(dt), B, T, NH, HS, p);
    dev_download(d, buf, out_g, nout * es);
    dtype_to_floats(got, buf, nout, dt);
    snprintf(name, sizeof(name), "fwd out  %s", tag);
    compare(name, got, out_ref, nout, tol, locate_out, B, T, NH, HS, -1);
    dev_download(d, got, lse_g, nlse * 4);
    snprintf(name, sizeof(name), "fwd lse  %s", tag);
    compare(name, got, lse_ref, nlse, tol_lse, locate_lse, B, T, NH, HS, -1);
    dev_download(d, buf, dqkv_g, nqkv * es);
    dtype_to_floats(got, buf, nqkv, dt);
    for (int part = 0; part < 3; part++) {
        snprintf(name, sizeof(name), "bwd d%c   %s", "qkv"[part], tag);
        compare(name, got, dqkv_ref, nqkv, tol, locate_qkv, B, T, NH, HS, part);
    }

    // the same inputs again: bitwise the same outputs (ours; cuDNN's dq adds up in any order)
    void *out_again = xmalloc(nout * es), *dqkv_again = xmalloc(nqkv * es), *out_first = xmalloc(nout * es);
    dev_download(d, out_first, out_g, nout * es);
    cudaCheck(cudaMemset(out_g, 0xff, nout * es));
    cudaCheck(cudaMemset(dqkv_g, 0xff, nqkv * es));
#ifdef USE_CUDNN
    // and cuDNN's scratch NaN too: its dq accumulator must be cleared by the library or by us
    if (d->attention_fused) cudaCheck(cudaMemset(cdn_state(d)->scratch, 0xff, cdn_state(d)->scratch_size));
#endif
    attention_forward(d, out_g, lse_g, qkv_g, p, seed, B, T, NH, HS);
    attention_backward(d, dqkv_g, delta_g, dout_g, qkv_g, out_g, lse_g, p, seed, B, T, NH, HS);
    dev_download(d, out_again, out_g, nout * es);
    dev_download(d, dqkv_again, dqkv_g, nqkv * es);
    snprintf(name, sizeof(name), "deterministic %s", tag);
    if (d->attention_fused) {
        check(!memcmp(out_again, out_first, nout * es), name, "a second forward gave different bits");
        dtype_to_floats(got, dqkv_again, nqkv, dt);
        snprintf(name, sizeof(name), "bwd dq again (scratch NaN before) %s", tag);
        compare(name, got, dqkv_ref, nqkv, tol, locate_qkv, B, T, NH, HS, 0);
    }
    else check(!memcmp(out_again, out_first, nout * es) && !memcmp(dqkv_again, buf, nqkv * es), name, "a second run gave different bits");

    dev_free(d, qkv_g); dev_free(d, dout_g); dev_free(d, out_g); dev_free(d, dqkv_g);
    dev_free(d, lse_g); dev_free(d, delta_g);
    free(qkv_d); free(dout_d); free(qkv_h); free(dout_h); free(out_ref); free(lse_ref); free(delta_ref);
    free(dqkv_ref); free(buf); free(got); free(out_again); free(dqkv_again); free(out_first);
}

// The CUDA kernels test hash_u32(seed, i) >= att_keep_threshold(p) instead of calling
// dropout_keep: the two must agree on every index (host-side, no GPU needed).
static void test_keep_threshold(void) {
    static const float ps[] = {1e-7f, 0.1f, 0.25f, 0.3f, 0.5f, 0.9f, 0.999f};
    for (int k = 0; k < 7; k++) {
        float p = ps[k];
        uint32_t t = att_keep_threshold(p);
        // the threshold hash itself passes dropout_keep's test and the one below it fails
        int ok = (float)t * 2.3283064365386963e-10f >= p && !((float)(t - 1) * 2.3283064365386963e-10f >= p);
        for (uint64_t i = 0; i < 1000000 && ok; i++) ok = dropout_keep(11, i, p) == (hash_u32(11, i) >= t);
        char name[96];
        snprintf(name, sizeof(name), "dropout threshold equals dropout_keep p=%g", p);
        check(ok, name, "threshold %u disagrees with dropout_keep", t);
    }
}

// Median time of 20 runs (after warm-up) of fwd and bwd, in TFLOP/s of causal attention.
static void bench(int B, int T, int NH, int HS, float p, int fused) {
    Device d;
    device_init(&d, "cuda", DT_BF16);
    d.attention_fused = fused;
    size_t N = (size_t)B * T, C = (size_t)NH * HS, nqkv = N * 3 * C, nout = N * C, nlse = (size_t)B * NH * T;
    float* h = (float*)xmalloc(nqkv * sizeof(float));
    MT19937 mt;
    mt_seed(&mt, 5);
    for (size_t i = 0; i < nqkv; i++) h[i] = (float)mt_normal(&mt);
    void* hb = xmalloc(nqkv * 2);
    floats_to_dtype(hb, h, nqkv, DT_BF16);
    void *qkv = dev_malloc(&d, nqkv * 2), *out = dev_malloc(&d, nout * 2), *dout = dev_malloc(&d, nout * 2);
    void* dqkv = dev_malloc(&d, nqkv * 2);
    float *lse = (float*)dev_malloc(&d, nlse * 4), *delta = (float*)dev_malloc(&d, nlse * 4);
    dev_upload(&d, qkv, hb, nqkv * 2);
    dev_upload(&d, dout, hb, nout * 2);
    double flops_fwd = 4.0 * B * NH * (double)T * T * HS / 2;
    double med[2] = {median_ms(&d, [&]() { attention_forward(&d, out, lse, qkv, p, 1, B, T, NH, HS); }),
                     median_ms(&d, [&]() { attention_backward(&d, dqkv, delta, dout, qkv, out, lse, p, 1, B, T, NH, HS); })};
    for (int pass = 0; pass < 2; pass++) {
        double flops = flops_fwd * (pass ? 2.5 : 1.0);
        printf("bench bf16 B=%d T=%d NH=%d HS=%d p=%g %s %s: %.3f ms, %.1f TFLOP/s\n", B, T, NH, HS, p,
               fused ? "cudnn" : att_wgmma_usable(&d, HS) ? "wgmma" : "mma.sync", pass ? "bwd" : "fwd", med[pass], flops / (med[pass] * 1e-3) / 1e12);
    }
    dev_free(&d, qkv); dev_free(&d, out); dev_free(&d, dout); dev_free(&d, dqkv); dev_free(&d, lse); dev_free(&d, delta);
    free(h); free(hb);
    device_free(&d);
}
#endif

int main(int argc, char** argv) {
    int want_bench = argc > 1 && !strcmp(argv[1], "--bench");
    test_cpu_forward(2, 5, 2, 4, 0.0f);
    test_cpu_forward(2, 5, 2, 4, 0.3f);
    test_cpu_forward(3, 17, 3, 8, 0.1f);
    test_cpu_backward_fd(2, 5, 2, 4, 0.0f);
    test_cpu_backward_fd(2, 5, 2, 4, 0.3f);
    test_cpu_backward_fd(1, 9, 1, 8, 0.2f);
    test_cpu_dispatch(2, 64, 4, 32, 0.0f);
    test_cpu_dispatch(2, 100, 2, 48, 0.1f);
    Device cpu;
    device_init(&cpu, "cpu", DT_F32);
    test_decode(&cpu, 1, 40, 2, 8, 0, 7);    // a prefill
    test_decode(&cpu, 1, 40, 2, 8, 17, 1);   // one new token
    test_decode(&cpu, 2, 40, 3, 8, 10, 5);   // a chunk, two sequences
    device_free(&cpu);
#ifdef __CUDACC__
    test_keep_threshold();
    if (!gpu_available()) {
        printf("skip gpu attention tests: no GPU\n");
        return test_summary();
    }
    static const int shapes[][4] = {{2, 64, 4, 32}, {1, 200, 2, 64}, {2, 256, 3, 96}, {1, 128, 2, 128}, {4, 1024, 12, 64}, {1, 333, 2, 96}};
    static const DType dtypes[] = {DT_F32, DT_BF16, DT_F16};
    // decode: B, maxT, NH, HS, pos, n (rows from the middle of a tile, several key tiles, a prefill)
    static const int decodes[][6] = {{1, 256, 2, 64, 0, 100}, {1, 256, 2, 64, 130, 1}, {2, 256, 3, 32, 70, 9}, {1, 1024, 4, 128, 1000, 1},
                                     {1, 256, 2, 96, 140, 7}};
    // every case with the mma.sync kernels, then the half cases of head sizes 64 and 96 again with wgmma where the binary has it
    Device probe;
    device_init(&probe, "cuda", DT_BF16);
    int have_wgmma = att_wgmma_usable(&probe, 64);
    device_free(&probe);
    printf("wgmma attention kernels: %s\n", have_wgmma ? "in this binary (sm_90a), tested below" : "not in this binary");
    for (int wgmma = 0; wgmma <= have_wgmma; wgmma++) {
        att_wgmma_enabled = wgmma;
        for (int t = wgmma; t < 3; t++) {
            Device d;
            device_init(&d, "cuda", dtypes[t]);
            for (int s = 0; s < 6; s++)
                for (int q = 0; q < 2; q++)
                    if (!wgmma || att_wg_head_size(shapes[s][3])) test_gpu_case(&d, shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], q ? 0.1f : 0.0f);
            for (int s = 0; s < 5; s++)
                if (!wgmma || att_wg_head_size(decodes[s][3])) test_decode(&d, decodes[s][0], decodes[s][1], decodes[s][2], decodes[s][3], decodes[s][4], decodes[s][5]);
            device_free(&d);
        }
    }
#ifdef USE_CUDNN
    // --attention-backend fused: cuDNN's kernels against the same reference (no dropout)
    for (int t = 1; t < 3; t++) {
        Device d;
        device_init(&d, "cuda", dtypes[t]);
        d.attention_fused = 1;
        for (int s = 0; s < 6; s++) test_gpu_case(&d, shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], 0.0f);
        device_free(&d);
    }
#endif
    if (want_bench) {
        for (int wgmma = 0; wgmma <= have_wgmma; wgmma++) {
            att_wgmma_enabled = wgmma;
            bench(16, 1024, 12, 64, 0.0f, 0);
            bench(16, 1024, 12, 64, 0.1f, 0);
            bench(8, 2048, 24, 96, 0.0f, 0);
        }
#ifdef USE_CUDNN
        bench(16, 1024, 12, 64, 0.0f, 1);
        bench(8, 2048, 24, 96, 0.0f, 1);
#endif
    }
#else
    if (want_bench) printf("skip bench: built without CUDA\n");
    printf("skip gpu attention tests: built without CUDA\n");
#endif
    return test_summary();
}
