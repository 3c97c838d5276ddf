/*
dev/cuda/gradnorm.cu: the sum of squares of all of a model's fp32 gradients (the global norm for
--clip-grad), returned to the host, from fp32 atomics to megatron.h's fixed-order reduction. The
check runs on the first CHECK_PARAMS gradients.
    make -C dev/cuda gradnorm && dev/cuda/gradnorm
*/
#include "common.h"

#define CHECK_PARAMS (1 << 22)

// v1: every block adds its fp32 sum into one float with atomicAdd: the order, and so the last
// bits, change from run to run.
__global__ void grad_norm_v1_kernel(float* total, const float* grads, size_t n) {
    __shared__ float warp_sums[32];
    float sum = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) sum += grads[i] * grads[i];
    sum = warp_sum(sum);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)blockDim.x / 32; w++) sum += warp_sums[w];
        atomicAdd(total, sum);
    }
}

static float grad_norm_squared_v1(const Device* d, const float* grads, size_t n) {
    float* total = (float*)pool_alloc(d, sizeof(float));
    float host;
    cudaCheck(cudaMemsetAsync(total, 0, sizeof(float), d->stream));
    grad_norm_v1_kernel<<<4 * d->sm_count, 256, 0, d->stream>>>(total, grads, n);
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaMemcpyAsync(&host, total, sizeof(float), cudaMemcpyDeviceToHost, d->stream));
    pool_free(d, total);
    cudaCheck(cudaStreamSynchronize(d->stream));
    return host;
}

static const struct {
    const char *version, *what;
    float (*fn)(const Device*, const float*, size_t);
} VERSIONS[] = {
    {"v1", "grid-stride fp32 sums, one atomicAdd per block (not reproducible)", grad_norm_squared_v1},
    {"v2", "megatron.h: 1024 blocks, 16-byte loads, double sums, partials added on the host in order", grad_norm_squared},
};

static void run_shape(const Shape* sh) {
    size_t n = shape_params(sh), nc = CHECK_PARAMS;
    float* grads = host_random(nc, DT_F32, 81, 0.01);
    double want = 0;
    for (size_t i = 0; i < nc; i++) want += (double)grads[i] * grads[i];
    float* d_grads = (float*)upload(grads, nc, DT_F32);
    float* t_grads = (float*)device_random(n, DT_F32, 82, 0.01f);
    for (const auto& v : VERSIONS) {
        float got = v.fn(&bench.dev, d_grads, nc);
        Check c = check_start();
        check_output(&c, &got, &want, 1, TOL_F32);
        double us = time_us([&] { v.fn(&bench.dev, t_grads, n); });
        report("gradnorm", sh->name, v.version, v.what, us, 4.0 * n, 0, c);
    }
    free_all();
    free_host_all();
}

int main(void) {
    bench_init(0);
    print_header("gradient sum of squares (fp32), to the host");
    for (int s = 0; s < N_SHAPES; s++) run_shape(&SHAPES[s]);
    return bench_finish();
}
