/*
test_gpt.cu: the whole GPT against Hugging Face transformers' GPT2LMHeadModel.

test/hf_reference.py built a tiny GPT-2 (2 layers, hidden 64, 2 heads, vocab 200),
ran a batch through it and wrote its weights, logits, loss, every gradient, and the
losses and weights of 10 AdamW steps (clip 1.0, weight decay on weights only) into
test/fixtures/gpt2_tiny_hf.safetensors. Here the same weights go through our model:
on the CPU always, and on a GPU in fp32 and bf16 when one is found.
*/
#define TESTING
#include "../train_gpt.cu"
#include "test.h"

static const char* FIXTURE = "test/fixtures/gpt2_tiny_hf.safetensors";

static GPTConfig tiny_config(void) {
    GPTConfig c;
    c.L = 2; c.C = 64; c.NH = 2; c.HS = 32; c.F = 256; c.V = 200; c.Vp = 256; c.maxT = 32;
    return c;
}

// Load the fixture's batch: tokens (B, T+1) -> inputs/targets in [s, b] order.
static void upload_fixture_batch(GPT* m, const SafeTensors* st, int B, int T) {
    int32_t* tokens = (int32_t*)xmalloc((size_t)B * (T + 1) * sizeof(int32_t));
    int* x = (int*)xmalloc((size_t)B * T * sizeof(int));
    int* y = (int*)xmalloc((size_t)B * T * sizeof(int));
    safetensors_read_raw(st, "tokens", tokens, (size_t)B * (T + 1) * sizeof(int32_t));
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            x[t * B + b] = tokens[b * (T + 1) + t];
            y[t * B + b] = tokens[b * (T + 1) + t + 1];
        }
    dev_upload(m->dev, m->acts.tokens, x, (size_t)B * T * sizeof(int));
    dev_upload(m->dev, m->acts.targets, y, (size_t)B * T * sizeof(int));
    free(tokens); free(x); free(y);
}

// Mean cross-entropy over all B*T tokens, with its gradient times grad_scale added (none at 0).
static double fixture_step(GPT* m, HostBatch* h, int B, int T, double grad_scale) {
    int N = B * T;
    for (int i = 0; i < N; i++) h->mask[i] = 1.0f;
    return gpt_micro_step(m, h, B, T, N, grad_scale, 0.0f, 0.0f);
}

static void download_floats(const GPT* m, float* dst, const void* src, size_t n) {
    size_t es = dtype_size(m->dev->dtype);
    void* tmp = xmalloc(n * es);
    dev_download(m->dev, tmp, src, n * es);
    dtype_to_floats(dst, tmp, n, m->dev->dtype);
    free(tmp);
}

static void test_against_hf(const Device* dev, const char* tag, double tol_logits, double tol_grads, double tol_adam) {
    SafeTensors st;
    safetensors_open(&st, FIXTURE);
    GPTConfig cfg = tiny_config();
    int B = 3, T = 16, N = B * T;
    GPT m;
    gpt_build(&m, &cfg, dev);
    gpt_load_hf(&m, &st);
    gpt_alloc_activations(&m, B, T);
    HostBatch h;
    h.mask = (float*)xmalloc(N * sizeof(float));
    h.dloss = (float*)xmalloc(N * sizeof(float));
    h.losses = (float*)xmalloc(N * sizeof(float));
    upload_fixture_batch(&m, &st, B, T);
    char name[128];

    // logits (before the loss overwrites them with their gradient)
    gpt_forward(&m, B, T, 0.0f, 0.0f);
    float* logits = (float*)xmalloc((size_t)N * cfg.Vp * sizeof(float));
    float* ours = (float*)xmalloc((size_t)N * cfg.V * sizeof(float));
    float* want = (float*)xmalloc((size_t)N * cfg.V * sizeof(float));
    download_floats(&m, logits, m.acts.logits, (size_t)N * cfg.Vp);
    safetensors_read_floats(&st, "logits", want, (size_t)N * cfg.V);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            memcpy(ours + ((size_t)b * T + t) * cfg.V, logits + ((size_t)t * B + b) * cfg.Vp, cfg.V * sizeof(float));
    snprintf(name, sizeof(name), "%s logits equal HF's", tag);
    check_close(name, ours, want, (size_t)N * cfg.V, tol_logits);

    // loss and every gradient
    dev_zero(dev, m.grads, m.num_params * sizeof(float));
    float hf_loss;
    safetensors_read_floats(&st, "loss", &hf_loss, 1);
    double loss = fixture_step(&m, &h, B, T, 1);
    snprintf(name, sizeof(name), "%s loss equals HF's", tag);
    check(fabs(loss - hf_loss) <= tol_logits * fabs(hf_loss), name, "ours %.7f, HF %.7f", loss, hf_loss);
    float* grads = (float*)xmalloc(m.num_params * sizeof(float));
    float* hf = (float*)xmalloc(m.num_params * sizeof(float));
    dev_download(dev, grads, m.grads, m.num_params * sizeof(float));
    hf_read_params(&m, &st, "grad.", hf);
    for (int i = 0; i < NUM_PARAMS; i++) {
        snprintf(name, sizeof(name), "%s gradient of %s equals HF's", tag, param_names[i]);
        check_close(name, grads + m.offsets[i], hf + m.offsets[i], m.sizes[i], tol_grads);
    }

    // two micro-batches of half weight add up to the same gradients, started as a training step
    // starts them (over a NaN buffer: the weight matrices' first products write theirs, the rest is
    // zeroed), the second added (on the GPU the QKV bias's v part set from the projection's running
    // bias gradient, its q part added)
    float* nans = (float*)xmalloc(m.num_params * sizeof(float));
    for (size_t i = 0; i < m.num_params; i++) nans[i] = NAN;
    dev_upload(dev, m.grads, nans, m.num_params * sizeof(float));
    free(nans);
    gpt_start_gradients(&m);
    fixture_step(&m, &h, B, T, 0.5);
    fixture_step(&m, &h, B, T, 0.5);
    float* halves = (float*)xmalloc(m.num_params * sizeof(float));
    dev_download(dev, halves, m.grads, m.num_params * sizeof(float));
    for (int i = 0; i < NUM_PARAMS; i++) {
        snprintf(name, sizeof(name), "%s gradient of %s from two half micro-batches equals one batch's", tag, param_names[i]);
        check_close(name, halves + m.offsets[i], grads + m.offsets[i], m.sizes[i], 1e-5);
    }
    free(halves);

    // 10 AdamW steps from the same start: lr 1e-3, betas (0.9, 0.95), eps 1e-8, wd 0.1, clip 1.0
    Args args;
    args_defaults(&args);
    args.adam_beta1 = 0.9;
    args.adam_beta2 = 0.95;
    args.adam_eps = 1e-8;
    gpt_load_hf(&m, &st);
    dev_zero(dev, m.adam_m, m.num_params * sizeof(float));
    dev_zero(dev, m.adam_v, m.num_params * sizeof(float));
    float losses[10], hf_losses[10];
    safetensors_read_floats(&st, "adamw_losses", hf_losses, 10);
    for (int step = 0; step < 10; step++) {
        dev_zero(dev, m.grads, m.num_params * sizeof(float));
        losses[step] = (float)fixture_step(&m, &h, B, T, 1);
        double norm = sqrt(grad_norm_squared(dev, m.grads, m.num_params));
        double clip = norm > 1.0 ? 1.0 / (norm + 1e-6) : 1.0;
        gpt_update(&m, 1e-3f, &args, 0.1f, (float)clip, step + 1);
    }
    snprintf(name, sizeof(name), "%s 10 AdamW steps: losses equal PyTorch's", tag);
    check_close(name, losses, hf_losses, 10, tol_adam);
    float* final_params = grads;
    if (m.master) dev_download(dev, final_params, m.master, m.num_params * sizeof(float));
    else dev_download(dev, final_params, m.params, m.num_params * sizeof(float));
    hf_read_params(&m, &st, "adamw_final.", hf);
    snprintf(name, sizeof(name), "%s 10 AdamW steps: weights equal PyTorch's", tag);
    // padded vocabulary rows: HF has none, ours start at 0 and stay 0 (no gradient, decay of 0)
    check_close(name, final_params, hf, m.num_params, tol_adam);

    free(logits); free(ours); free(want); free(grads); free(hf);
    free(h.mask); free(h.dloss); free(h.losses);
    gpt_free(&m);
    safetensors_close(&st);
}

// What a few training steps left: the loss and every gradient of each step, the final weights.
typedef struct {
    float losses[3];
    float* grads;    // (3, num_params)
    float* weights;  // (num_params)
    size_t n;
    size_t stored_bytes, recompute_bytes;
} Trained;

// 3 steps (dropout 0.1 on both sites, AdamW) of a freshly initialised model under a recompute plan.
static Trained train_steps(const Device* dev, const GPTConfig* cfg, int B, int T, int recompute, int k) {
    int N = B * T;
    Trained r;
    GPT m;
    gpt_build(&m, cfg, dev);
    gpt_init(&m, 0.02, 7);
    m.recompute = recompute;
    m.recompute_layers = k;
    gpt_alloc_activations(&m, B, T);
    HostBatch h;
    h.mask = (float*)xmalloc(N * sizeof(float));
    h.dloss = (float*)xmalloc(N * sizeof(float));
    h.losses = (float*)xmalloc(N * sizeof(float));
    int* x = (int*)xmalloc(N * sizeof(int));
    int* y = (int*)xmalloc(N * sizeof(int));
    for (int i = 0; i < N; i++) { x[i] = (i * 37 + 11) % cfg->V; y[i] = (i * 53 + 5) % cfg->V; h.mask[i] = 1; }
    dev_upload(dev, m.acts.tokens, x, N * sizeof(int));
    dev_upload(dev, m.acts.targets, y, N * sizeof(int));
    Args args;
    args_defaults(&args);
    r.n = m.num_params;
    r.grads = (float*)xmalloc(3 * r.n * sizeof(float));
    r.weights = (float*)xmalloc(r.n * sizeof(float));
    for (int step = 0; step < 3; step++) {
        dev_zero(dev, m.grads, m.num_params * sizeof(float));
        gpt_set_dropout_stream(&m, 1234, step, 0);
        r.losses[step] = (float)gpt_micro_step(&m, &h, B, T, N, 1.0, 0.1f, 0.1f);
        dev_download(dev, r.grads + step * r.n, m.grads, r.n * sizeof(float));
        gpt_update(&m, 1e-3f, &args, 0.01f, 1.0f, step + 1);
    }
    download_floats(&m, r.weights, m.params, r.n);
    r.stored_bytes = m.stored_bytes;
    r.recompute_bytes = m.recompute_bytes;
    free(h.mask); free(h.dloss); free(h.losses); free(x); free(y);
    gpt_free(&m);
    return r;
}

static int trained_equal(const Trained* a, const Trained* b) {
    return !memcmp(a->losses, b->losses, sizeof(a->losses)) && !memcmp(a->grads, b->grads, 3 * a->n * sizeof(float)) &&
           !memcmp(a->weights, b->weights, a->n * sizeof(float));
}

static void trained_free(Trained* t) {
    free(t->grads);
    free(t->weights);
}

// Two identical runs give bitwise identical losses, gradients and weights (dropout on).
static void test_determinism(const Device* dev, const char* tag) {
    GPTConfig cfg = tiny_config();
    Trained runs[2] = {train_steps(dev, &cfg, 2, 16, RECOMPUTE_NONE, 1), train_steps(dev, &cfg, 2, 16, RECOMPUTE_NONE, 1)};
    char name[128];
    snprintf(name, sizeof(name), "%s two runs with dropout: bitwise equal losses, gradients and weights", tag);
    check(trained_equal(&runs[0], &runs[1]), name, "losses %.9g %.9g", runs[0].losses[2], runs[1].losses[2]);
    check(runs[0].losses[2] < runs[0].losses[0], "training steps lower the loss", "%.5f -> %.5f", runs[0].losses[0], runs[0].losses[2]);
    trained_free(&runs[0]);
    trained_free(&runs[1]);
}

// Activation recomputation (Megatron-3 §5): with dropout on, every plan gives bitwise the losses,
// gradients and weights of storing everything, and keeps exactly the buffers it should: a layer's
// 12 buffers (ln1 + its 2 statistics, qkv, atty, lse, residual2, ln2 + 2 statistics, fch, fch_gelu)
// for each stored layer, one residual stream per stored layer or recomputed group plus the final
// LayerNorm's input; scratch for the largest recomputed group.
static void test_recompute(const Device* dev, const char* tag) {
    GPTConfig cfg = tiny_config();
    cfg.L = 4;
    int B = 2, T = 32;
    size_t N = (size_t)B * T, C = cfg.C, F = cfg.F, es = dtype_size(dev->dtype), L = cfg.L;
    // N = 64 rows: every buffer is a multiple of the 256-byte alignment, so the sizes add up exactly
    size_t layer = N * (7 * C * es + 2 * F * es + 4 * 4 + 4 * cfg.NH), stream = N * C * es;
    struct { int mode, k; const char* name; size_t stored, scratch; } plans[] = {
        {RECOMPUTE_NONE, 1, "none", L * layer + (L + 1) * stream, 0},
        {RECOMPUTE_SELECTIVE, 1, "selective", L * layer + (L + 1) * stream, 0},
        {RECOMPUTE_UNIFORM, 1, "full uniform, groups of 1", (L + 1) * stream, layer},
        {RECOMPUTE_UNIFORM, 2, "full uniform, groups of 2", 3 * stream, 2 * layer + stream},
        {RECOMPUTE_UNIFORM, 3, "full uniform, groups of 3 and 1", 3 * stream, 3 * layer + 2 * stream},
        {RECOMPUTE_UNIFORM, 4, "full uniform, one group of 4", 2 * stream, 4 * layer + 3 * stream},
        {RECOMPUTE_BLOCK, 1, "full block, first 1", 3 * layer + (L + 1) * stream, layer},
        {RECOMPUTE_BLOCK, 3, "full block, first 3", 1 * layer + (L + 1) * stream, layer},
        {RECOMPUTE_BLOCK, 4, "full block, all 4", (L + 1) * stream, layer},
    };
    Trained ref = train_steps(dev, &cfg, B, T, RECOMPUTE_NONE, 1);
    char name[256];
    for (size_t i = 0; i < sizeof(plans) / sizeof(plans[0]); i++) {
        Trained r = train_steps(dev, &cfg, B, T, plans[i].mode, plans[i].k);
        snprintf(name, sizeof(name), "%s recompute %s: bitwise the losses, gradients and weights of none (dropout on, 3 steps)", tag, plans[i].name);
        check(trained_equal(&r, &ref), name, "losses %.9g vs %.9g", r.losses[2], ref.losses[2]);
        snprintf(name, sizeof(name), "%s recompute %s: keeps %zu bytes for the backward (%.0f per layer), %zu bytes of scratch", tag,
                 plans[i].name, plans[i].stored, (double)plans[i].stored / L, plans[i].scratch);
        check(r.stored_bytes == plans[i].stored && r.recompute_bytes == plans[i].scratch, name, "allocated %zu and %zu", r.stored_bytes,
              r.recompute_bytes);
        trained_free(&r);
    }
    trained_free(&ref);
}

int main(void) {
    Device cpu;
    device_init(&cpu, "cpu", DT_F32);
    test_against_hf(&cpu, "cpu fp32", 1e-5, 1e-4, 1e-4);
    test_determinism(&cpu, "cpu");
    test_recompute(&cpu, "cpu");
#ifdef __CUDACC__
    Device gpu;
    if (gpu_available()) {
        device_init(&gpu, "cuda", DT_F32);
        test_against_hf(&gpu, "gpu fp32", 1e-5, 1e-4, 1e-4);
        test_determinism(&gpu, "gpu fp32");
        test_recompute(&gpu, "gpu fp32");
        gpu.dtype = DT_BF16;
        test_against_hf(&gpu, "gpu bf16", 2e-2, 5e-2, 2e-2);
        test_determinism(&gpu, "gpu bf16");
        test_recompute(&gpu, "gpu bf16");
        device_free(&gpu);
    } else {
        printf("skip gpu model tests: no GPU\n");
    }
#endif
    return test_summary();
}
