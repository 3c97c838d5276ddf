/*
dev/cuda/adamw.cu: one AdamW step over all of a model's parameters as a --bf16 run takes it (bf16
parameters, fp32 master weights, gradients and moments: 30 bytes a parameter), from one element
per thread to megatron.h's kernel. The check runs on the first CHECK_PARAMS parameters.
    make -C dev/cuda adamw && dev/cuda/adamw
*/
#include "common.h"

#define CHECK_PARAMS (1 << 22)

// v1: one parameter per thread, 4-byte (and 2-byte) accesses.
template <typename T>
__global__ void adamw_v1_kernel(T* params, float* master, const float* grads, float* m, float* v, size_t n, AdamWStep h) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float p = adamw_param(master[i], grads[i], &m[i], &v[i], &h);
    master[i] = p;
    params[i] = from_float<T>(p);
}

static void adamw_v1(const Device* d, void* params, float* master, const float* grads, float* m, float* v, size_t n, float lr,
                     float beta1, float beta2, float eps, float weight_decay, float grad_scale, int step) {
    AdamWStep h = {lr, beta1, beta2, eps, weight_decay, grad_scale, (float)(1.0 - pow(beta1, step)), (float)(1.0 - pow(beta2, step))};
    DTYPE_SWITCH(d->dtype, T, adamw_v1_kernel<T><<<CEIL_DIV(n, 256), 256, 0, d->stream>>>((T*)params, master, grads, m, v, n, h));
    cudaCheck(cudaGetLastError());
}

static const struct {
    const char *version, *what;
    void (*fn)(const Device*, void*, float*, const float*, float*, float*, size_t, float, float, float, float, float, float, int);
} VERSIONS[] = {
    {"v1", "one parameter per thread", adamw_v1},
    {"v2", "megatron.h: 16-byte loads and stores (8 parameters a thread)", adamw_update},
};

static void run_shape(const Shape* sh) {
    DType dt = DT_BF16;
    size_t n = shape_params(sh), nc = CHECK_PARAMS, es = dtype_size(dt);
    float lr = 6e-4f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, wd = 0.1f, grad_scale = 0.5f;
    int step = 3;
    bench.dev.dtype = dt;

    float *master = host_random(nc, DT_BF16, 61, 0.05), *grads = host_random(nc, DT_F32, 62, 0.01);
    float *m = host_random(nc, DT_F32, 63, 0.001), *v = host_random(nc, DT_F32, 64, 1e-5);
    for (size_t i = 0; i < nc; i++) v[i] = fabsf(v[i]);
    float *master_ref = halloc<float>(nc), *m_ref = halloc<float>(nc), *v_ref = halloc<float>(nc);
    memcpy(master_ref, master, nc * 4);
    memcpy(m_ref, m, nc * 4);
    memcpy(v_ref, v, nc * 4);
    AdamWStep h = {lr, beta1, beta2, eps, wd, grad_scale, (float)(1.0 - pow(beta1, step)), (float)(1.0 - pow(beta2, step))};
    adamw_update_cpu(master_ref, NULL, grads, m_ref, v_ref, nc, h);
    void* d_params = dalloc(nc * es);
    float *d_master = (float*)dalloc(nc * 4), *d_m = (float*)dalloc(nc * 4), *d_v = (float*)dalloc(nc * 4);
    float* d_grads = (float*)upload(grads, nc, DT_F32);

    // timing: every parameter of the model, random state on the device
    void* t_params = device_random(n, dt, 71, 0.05f);
    float *t_master = (float*)device_random(n, DT_F32, 72, 0.05f), *t_grads = (float*)device_random(n, DT_F32, 73, 0.01f);
    float *t_m = (float*)device_random(n, DT_F32, 74, 0.001f), *t_v = (float*)device_random(n, DT_F32, 75, 1e-5f, 1e-5f);
    double bytes = (double)n * (4 + 8 + 8 + 8 + es);  // grads read; m, v, master read and written; params written

    for (const auto& ver : VERSIONS) {
        upload_to(d_master, master, nc, DT_F32);
        upload_to(d_m, m, nc, DT_F32);
        upload_to(d_v, v, nc, DT_F32);
        poison(d_params, nc * es);
        ver.fn(&bench.dev, d_params, d_master, d_grads, d_m, d_v, nc, lr, beta1, beta2, eps, wd, grad_scale, step);
        Check c = check_start();
        check_output(&c, download(d_master, nc, DT_F32), master_ref, nc, TOL_F32);
        check_output(&c, download(d_m, nc, DT_F32), m_ref, nc, TOL_F32);
        check_output(&c, download(d_v, nc, DT_F32), v_ref, nc, TOL_F32);
        check_output(&c, download(d_params, nc, dt), master_ref, nc, TOL_BF16);
        double us = time_us([&] { ver.fn(&bench.dev, t_params, t_master, t_grads, t_m, t_v, n, lr, beta1, beta2, eps, wd, grad_scale, step); });
        report("adamw", sh->name, ver.version, ver.what, us, bytes, 0, c);
    }
    free_all();
    free_host_all();
}

int main(void) {
    bench_init(0);
    print_header("AdamW step (bf16 params, fp32 master, grads, moments)");
    for (int s = 0; s < N_SHAPES; s++) run_shape(&SHAPES[s]);
    return bench_finish();
}
