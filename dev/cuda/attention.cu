/*
dev/cuda/attention.cu: causal self-attention forward and backward (dropout 0, as dev/bench_gpt.sh
runs), from cuBLAS products around a score matrix kept in memory to megatron.h's
FlashAttention-2 kernels (mma.sync, then wgmma on Hopper). Rates are TFLOP/s of causal
attention, 4 B NH T^2 HS / 2 forward and 2.5 times that backward (as test/test_attention.cu --bench), against a bf16 GEMM ceiling.
The check runs at batch 2 (the CPU reference is slow; the batch only changes strides).
    make -C dev/cuda attention && dev/cuda/attention
*/
#include "common.h"
#include <cublas_v2.h>

#define CHECK_BATCH 2

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------- v1: scores in memory

// For every (b, h): S = scale K Q^T stored as row-major [T][T] fp32, P its causal softmax in
// bf16, out = P V. A (b, h)'s q, k, v start (b NH + h) 3 HS elements into qkv, its rows
// B 3C apart; its out (b NH + h) HS elements into out, rows B C apart: one strided batch each.
static cublasHandle_t cublas;
static float* v1_scores;  // [B NH][T][T]: the scores, then dP in the backward
static bf16* v1_probs;    // [B NH][T][T]: P, then dS in the backward

// Column-major C[m x n] = alpha op(A) op(B), batch i at A + i sA, B + i sB, C + i sC (elements).
static void gemm_batched(const Device* d, bool trans_a, bool trans_b, int m, int n, int k, float alpha, const bf16* A, int lda,
                         long long sA, const bf16* Bm, int ldb, long long sB, void* Cm, cudaDataType_t c_type, int ldc, long long sC, int batch) {
    float beta = 0;
    cublasCheck(cublasSetStream(cublas, d->stream));
    cublasCheck(cublasGemmStridedBatchedEx(cublas, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, m, n, k, &alpha,
                                           A, CUDA_R_16BF, lda, sA, Bm, CUDA_R_16BF, ldb, sB, &beta, Cm, c_type, ldc, sC, batch,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// A warp per row (b, h, i) of scores: P = exp(S - lse) for j <= i, 0 above the diagonal; lse
// computed and stored (forward) or read (backward, have_lse).
__global__ void softmax_v1_kernel(bf16* P, float* lse, const float* S, int rows, int T, int have_lse) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32, i = row % T;
    if (row >= rows) return;
    const float* s = S + (size_t)row * T;
    float l;
    if (have_lse) l = lse[row];
    else {
        float m = -INFINITY, sum = 0;
        for (int j = lane; j <= i; j += 32) m = fmaxf(m, s[j]);
        for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
        for (int j = lane; j <= i; j += 32) sum += expf(s[j] - m);
        l = m + logf(warp_sum(sum));
        if (lane == 0) lse[row] = l;
    }
    for (int j = lane; j < T; j += 32) P[(size_t)row * T + j] = __float2bfloat16(j <= i ? expf(s[j] - l) : 0.0f);
}

// dS = P (dP - delta) scale over P in place, delta = sum_j P dP (= dout . out).
__global__ void softmax_backward_v1_kernel(bf16* P, const float* dP, int rows, int T, float scale) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    bf16* p = P + (size_t)row * T;
    const float* dp = dP + (size_t)row * T;
    float delta = 0;
    for (int j = lane; j < T; j += 32) delta += __bfloat162float(p[j]) * dp[j];
    delta = warp_sum(delta);
    for (int j = lane; j < T; j += 32) p[j] = __float2bfloat16(__bfloat162float(p[j]) * (dp[j] - delta) * scale);
}

static void attention_forward_v1(const Device* d, void* out, float* lse, const void* qkv, int B, int T, int NH, int HS) {
    int C = NH * HS, BH = B * NH, ld = B * 3 * C, rows = BH * T;
    long long TT = (long long)T * T;
    const bf16* q = (const bf16*)qkv;
    gemm_batched(d, true, false, T, T, HS, 1.0f / sqrtf((float)HS), q + HS, ld, 3 * HS, q, ld, 3 * HS, v1_scores, CUDA_R_32F, T, TT, BH);
    softmax_v1_kernel<<<CEIL_DIV(rows, 8), 256, 0, d->stream>>>(v1_probs, lse, v1_scores, rows, T, 0);
    cudaCheck(cudaGetLastError());
    gemm_batched(d, false, false, HS, T, T, 1.0f, q + 2 * HS, ld, 3 * HS, v1_probs, T, TT, out, CUDA_R_16BF, B * C, HS, BH);
}

// Recomputes S and P from lse; then dV = P^T dout, dP = dout V^T, dS, dQ = dS K, dK = dS^T Q.
static void attention_backward_v1(const Device* d, void* dqkv, float* delta, const void* dout, const void* qkv, const void* out,
                                  const float* lse, int B, int T, int NH, int HS) {
    (void)delta;
    (void)out;
    int C = NH * HS, BH = B * NH, ld = B * 3 * C, rows = BH * T;
    long long TT = (long long)T * T;
    float scale = 1.0f / sqrtf((float)HS);
    const bf16 *q = (const bf16*)qkv, *g = (const bf16*)dout;
    bf16* dq = (bf16*)dqkv;
    gemm_batched(d, true, false, T, T, HS, scale, q + HS, ld, 3 * HS, q, ld, 3 * HS, v1_scores, CUDA_R_32F, T, TT, BH);
    softmax_v1_kernel<<<CEIL_DIV(rows, 8), 256, 0, d->stream>>>(v1_probs, (float*)lse, v1_scores, rows, T, 1);
    cudaCheck(cudaGetLastError());
    gemm_batched(d, false, true, HS, T, T, 1.0f, g, B * C, HS, v1_probs, T, TT, dq + 2 * HS, CUDA_R_16BF, ld, 3 * HS, BH);
    gemm_batched(d, true, false, T, T, HS, 1.0f, q + 2 * HS, ld, 3 * HS, g, B * C, HS, v1_scores, CUDA_R_32F, T, TT, BH);
    softmax_backward_v1_kernel<<<CEIL_DIV(rows, 8), 256, 0, d->stream>>>(v1_probs, v1_scores, rows, T, scale);
    cudaCheck(cudaGetLastError());
    gemm_batched(d, false, false, HS, T, T, 1.0f, q + HS, ld, 3 * HS, v1_probs, T, TT, dq, CUDA_R_16BF, ld, 3 * HS, BH);
    gemm_batched(d, false, true, HS, T, T, 1.0f, q, ld, 3 * HS, v1_probs, T, TT, dq + HS, CUDA_R_16BF, ld, 3 * HS, BH);
}

// ---------------------------------------------------------------- megatron.h (fp32 or bf16 by the device's dtype)

static void attention_forward_megatron(const Device* d, void* out, float* lse, const void* qkv, int B, int T, int NH, int HS) {
    attention_forward(d, out, lse, qkv, 0.0f, 0, B, T, NH, HS);
}

static void attention_backward_megatron(const Device* d, void* dqkv, float* delta, const void* dout, const void* qkv, const void* out,
                                        const float* lse, int B, int T, int NH, int HS) {
    attention_backward(d, dqkv, delta, dout, qkv, out, lse, 0.0f, 0, B, T, NH, HS);
}

// v3 and v4 are megatron.h's kernels with its Hopper (wgmma) kernels switched off and on.
static void attention_forward_mma_sync(const Device* d, void* out, float* lse, const void* qkv, int B, int T, int NH, int HS) {
    att_wgmma_enabled = 0;
    attention_forward_megatron(d, out, lse, qkv, B, T, NH, HS);
}
static void attention_backward_mma_sync(const Device* d, void* dqkv, float* delta, const void* dout, const void* qkv, const void* out,
                                        const float* lse, int B, int T, int NH, int HS) {
    att_wgmma_enabled = 0;
    attention_backward_megatron(d, dqkv, delta, dout, qkv, out, lse, B, T, NH, HS);
}
static void attention_forward_wgmma(const Device* d, void* out, float* lse, const void* qkv, int B, int T, int NH, int HS) {
    att_wgmma_enabled = 1;
    if (!att_wgmma_usable(d, HS)) die("v4: no wgmma kernels for head size %d in this binary (build with GPU_ARCH=sm_90a)", HS);
    attention_forward_megatron(d, out, lse, qkv, B, T, NH, HS);
}
static void attention_backward_wgmma(const Device* d, void* dqkv, float* delta, const void* dout, const void* qkv, const void* out,
                                     const float* lse, int B, int T, int NH, int HS) {
    att_wgmma_enabled = 1;
    attention_backward_megatron(d, dqkv, delta, dout, qkv, out, lse, B, T, NH, HS);
}

// ---------------------------------------------------------------- the ladder

static const struct {
    const char* version;
    DType dtype;
    const char *what_forward, *what_backward;
    void (*forward)(const Device*, void*, float*, const void*, int, int, int, int);
    void (*backward)(const Device*, void*, float*, const void*, const void*, const void*, const float*, int, int, int, int);
} VERSIONS[] = {
    {"v1", DT_BF16, "cuBLAS QK^T -> fp32 scores in memory -> softmax kernel -> cuBLAS PV (full square)",
     "recompute S and P, then 4 cuBLAS products and a softmax-backward kernel, dP/dS in memory",
     attention_forward_v1, attention_backward_v1},
    {"v2", DT_F32, "megatron.h fp32 path: a warp per query row, online softmax, CUDA cores",
     "megatron.h fp32 path: a warp per query row (dq), a warp per key row (dk, dv)",
     attention_forward_megatron, attention_backward_megatron},
    {"v3", DT_BF16, "megatron.h: FlashAttention-2, mma.sync m16n8k16 bf16, cp.async double buffering",
     "megatron.h: FlashAttention-2, a dq kernel and a dk/dv kernel, no atomics",
     attention_forward_mma_sync, attention_backward_mma_sync},
    {"v4", DT_BF16, "megatron.h on Hopper: v3 on wgmma m64n64k16 (+ m64n32k16) from swizzled tiles, blocks of one warpgroup (HS 64, 96)",
     "megatron.h on Hopper: v3's two kernels with wgmma (HS 64, 96)",
     attention_forward_wgmma, attention_backward_wgmma},
};

static void run_shape(const Shape* sh) {
    int T = sh->T, NH = sh->NH, C = sh->C, HS = C / NH;
    double flops_forward = 4.0 * sh->B * NH * (double)T * T * HS / 2, flops_backward = 2.5 * flops_forward;

    // The check: batch CHECK_BATCH, inputs rounded through bf16 (exact in fp32 too), one reference.
    int Bc = CHECK_BATCH;
    size_t nqkv = (size_t)Bc * T * 3 * C, nout = (size_t)Bc * T * C, nlse = (size_t)Bc * NH * T;
    float *qkv = host_random(nqkv, DT_BF16, 11), *dout = host_random(nout, DT_BF16, 12);
    double *qkv_d = to_double(qkv, nqkv), *out_ref = halloc<double>(nout), *lse_ref = halloc<double>(nlse);
    double *dqkv_ref = halloc<double>(nqkv), *delta_ref = halloc<double>(nlse);
    attention_forward_cpu(out_ref, lse_ref, qkv_d, 0, 0.0f, 0, Bc, T, NH, HS);
    float *out_in = halloc<float>(nout), *lse_in = halloc<float>(nlse);  // the backward's inputs: the reference forward's
    for (size_t i = 0; i < nout; i++) out_in[i] = (float)out_ref[i];
    for (size_t i = 0; i < nlse; i++) lse_in[i] = (float)lse_ref[i];
    attention_backward_cpu(dqkv_ref, delta_ref, to_double(dout, nout), qkv_d, out_ref, lse_ref, 0.0f, 0, Bc, T, NH, HS);

    size_t TT_all = (size_t)sh->B * NH * T * T;  // v1's scratch, for the timed batch
    v1_scores = (float*)dalloc(TT_all * sizeof(float));
    v1_probs = (bf16*)dalloc(TT_all * sizeof(bf16));
    int mark = dev_mark();
    for (const auto& v : VERSIONS) {
        if (v.forward == attention_forward_wgmma && !att_wg_head_size(HS)) continue;  // the wgmma kernels are for head sizes 64 and 96
        DType dt = v.dtype;
        size_t es = dtype_size(dt);
        bench.dev.dtype = dt;
        void *d_qkv = upload(qkv, nqkv, dt), *d_out = dalloc(nout * es), *d_dout = upload(dout, nout, dt), *d_dqkv = dalloc(nqkv * es);
        void* d_out_in = upload(out_in, nout, dt);
        float *d_lse = (float*)dalloc(nlse * sizeof(float)), *d_delta = (float*)dalloc(nlse * sizeof(float));
        float* d_lse_in = (float*)upload(lse_in, nlse, DT_F32);
        double tol = dt == DT_F32 ? TOL_F32 : TOL_ATTENTION_BF16, tol_lse = dt == DT_F32 ? TOL_F32 : 1e-4;
        poison(d_out, nout * es);
        poison(d_lse, nlse * sizeof(float));
        v.forward(&bench.dev, d_out, d_lse, d_qkv, Bc, T, NH, HS);
        Check cf = check_start();
        check_output(&cf, download(d_out, nout, dt), out_ref, nout, tol);
        check_output(&cf, download(d_lse, nlse, DT_F32), lse_ref, nlse, tol_lse);
        poison(d_dqkv, nqkv * es);
        v.backward(&bench.dev, d_dqkv, d_delta, d_dout, d_qkv, d_out_in, d_lse_in, Bc, T, NH, HS);
        Check cb = check_start();
        check_output(&cb, download(d_dqkv, nqkv, dt), dqkv_ref, nqkv, tol);

        // Timed at the full batch on random data of the same kind.
        int B = sh->B;
        size_t Nqkv = (size_t)B * T * 3 * C, Nout = (size_t)B * T * C, Nlse = (size_t)B * NH * T;
        void *t_qkv = device_random(Nqkv, dt, 21), *t_dout = device_random(Nout, dt, 22), *t_out = dalloc(Nout * es), *t_dqkv = dalloc(Nqkv * es);
        float *t_lse = (float*)dalloc(Nlse * sizeof(float)), *t_delta = (float*)dalloc(Nlse * sizeof(float));
        double us_f = time_us([&] { v.forward(&bench.dev, t_out, t_lse, t_qkv, B, T, NH, HS); });
        double us_b = time_us([&] { v.backward(&bench.dev, t_dqkv, t_delta, t_dout, t_qkv, t_out, t_lse, B, T, NH, HS); });
        report("attention_fwd", sh->name, v.version, v.what_forward, us_f, 0, flops_forward, cf);
        report("attention_bwd", sh->name, v.version, v.what_backward, us_b, 0, flops_backward, cb);
        free_to(mark);  // this version's buffers; v1's scratch stays
    }
    free_all();
    free_host_all();
}

int main(void) {
    bench_init(1);
    cublasCheck(cublasCreate(&cublas));
    print_header("causal attention");
    for (int s = 0; s < N_SHAPES; s++) run_shape(&SHAPES[s]);
    cublasCheck(cublasDestroy(cublas));
    return bench_finish();
}
