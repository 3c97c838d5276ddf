/*
test_parallel.cu: tensor parallelism (Megatron-1 §3) on CPU ranks, against the single-device model.

Runs as 2 MPI processes (started with mpirun, or it starts itself under mpirun when run
alone): the conjugate operators f and g, the vocab-parallel cross-entropy against the fused
single-device one, and a whole tiny GPT at t = 2 against the same GPT at t = 1 (logits, loss,
every gradient gathered back into the full layout), with the collective counter checked against
doc/parallelism.md: per layer 2 all-reduces forward and 2 backward, plus the forward's 2 again for
each layer that activation recomputation re-runs. A build without MPI checks only that the
single-rank path runs and says so. Where a GPU is found, rank 0 also runs every collective
through a one-rank NCCL communicator (--debug-force-nccl's path).
*/
#define TESTING
#include "../train_gpt.cu"
#include "test.h"

static Parallel par;

// Deterministic pseudo-random floats in [-scale, scale): the same on every rank.
static void fill_random(float* x, size_t n, uint32_t seed, float scale) {
    MT19937 rng;
    mt_seed(&rng, seed);
    for (size_t i = 0; i < n; i++) x[i] = (float)((2 * mt_uniform(&rng) - 1) * scale);
}

static long tp_all_reduces(void) { return par.calls[COLL_ALL_REDUCE][GROUP_TP]; }

static void test_conjugate_operators(const Device* dev) {
    int t = par.size[GROUP_TP], r = par.rank[GROUP_TP];
    float x[4] = {1.0f + r, 2.0f * r, -3.0f, 0.5f * r}, want[4] = {0, 0, 0, 0};
    for (int k = 0; k < t; k++) {
        want[0] += 1.0f + k; want[1] += 2.0f * k; want[2] += -3.0f; want[3] += 0.5f * k;
    }
    long before = tp_all_reduces();
    tp_g_forward(&par, dev, x, 4);
    check_close("g forward: all-reduce of the partial sums over the TP group", x, want, 4, 0);
    float dx[4] = {1.0f * r, 1.0f, 2.0f, 3.0f + r}, dwant[4] = {0, 0, 0, 0};
    for (int k = 0; k < t; k++) {
        dwant[0] += 1.0f * k; dwant[1] += 1.0f; dwant[2] += 2.0f; dwant[3] += 3.0f + k;
    }
    tp_f_backward(&par, dev, dx, 4);
    check_close("f backward: all-reduce of the input gradient over the TP group", dx, dwant, 4, 0);
    check(tp_all_reduces() - before == 2, "collective counter: f and g are one all-reduce each", "counted %ld", tp_all_reduces() - before);
}

// The vocab-parallel loss and gradient shard equal the fused single-device cross-entropy's.
static void test_vocab_parallel_crossentropy(const Device* dev, int V, int Vp) {
    int t = par.size[GROUP_TP], r = par.rank[GROUP_TP], N = 12, Vr = Vp / t;
    float* full = (float*)xmalloc((size_t)N * Vp * sizeof(float));
    float* shard = (float*)xmalloc((size_t)N * Vr * sizeof(float));
    float dloss[12], losses[12], want_losses[12], stats[36];
    int targets[12];
    fill_random(full, (size_t)N * Vp, 11, 4.0f);
    for (int n = 0; n < N; n++) {
        targets[n] = (n * 37 + 5) % V;
        dloss[n] = 0.1f + 0.05f * n;
        for (int j = 0; j < Vr; j++) shard[(size_t)n * Vr + j] = full[(size_t)n * Vp + r * Vr + j];
    }
    if (t > 1) targets[0] = V - 1;  // a target on the last rank, next to the padding
    long before = tp_all_reduces();
    vocab_parallel_crossentropy(&par, dev, losses, shard, targets, dloss, stats, N, V, Vp);
    long used = tp_all_reduces() - before;
    crossentropy_forward_backward_cpu<float>(want_losses, full, targets, dloss, N, V, Vp);
    float* want = (float*)xmalloc((size_t)N * Vr * sizeof(float));
    for (int n = 0; n < N; n++)
        for (int j = 0; j < Vr; j++) want[(size_t)n * Vr + j] = full[(size_t)n * Vp + r * Vr + j];
    char name[160];
    snprintf(name, sizeof(name), "vocab-parallel cross-entropy (V %d, Vp %d): losses equal the single-device ones", V, Vp);
    check_close(name, losses, want_losses, N, 1e-6);
    snprintf(name, sizeof(name), "vocab-parallel cross-entropy (V %d, Vp %d): this rank's logit gradients", V, Vp);
    check_close(name, shard, want, (size_t)N * Vr, 1e-6);
    check(used == 2, "collective counter: the cross-entropy is 2 all-reduces (max, then [sum-exp | target logit])", "counted %ld", used);
    free(full); free(shard); free(want);
}

// The tiny GPT at t = par's TP size against the same GPT on one rank: logits, loss, gradients,
// both under the same activation-recompute plan.
static void test_tensor_parallel_gpt(const Device* dev, int recompute, int k, const char* plan) {
    GPTConfig cfg;
    cfg.L = 2; cfg.C = 64; cfg.NH = 4; cfg.HS = 16; cfg.F = 256; cfg.V = 200; cfg.Vp = 256; cfg.maxT = 32;
    int B = 2, T = 16, N = B * T, t = par.size[GROUP_TP];
    GPT one, tp;
    gpt_build(&one, &cfg, dev);
    gpt_build_parallel(&tp, &cfg, dev, &par, 0);
    gpt_init(&one, 0.02, 7);
    gpt_init(&tp, 0.02, 7);
    one.recompute = tp.recompute = recompute;
    one.recompute_layers = tp.recompute_layers = k;
    gpt_alloc_activations(&one, B, T);
    gpt_alloc_activations(&tp, B, T);
    int tokens[32], targets[32];
    for (int i = 0; i < N; i++) { tokens[i] = (i * 37 + 11) % cfg.V; targets[i] = (i * 53 + 5) % cfg.V; }
    tokens[3] = cfg.V - 1;  // a token on the last rank's shard
    HostBatch h;
    h.mask = (float*)xmalloc(N * sizeof(float));
    h.dloss = (float*)xmalloc(N * sizeof(float));
    h.losses = (float*)xmalloc(N * sizeof(float));
    for (int i = 0; i < N; i++) h.mask[i] = 1.0f;
    GPT* models[2] = {&one, &tp};
    double loss[2];
    long forward_calls = 0, backward_calls = 0;
    for (int k = 0; k < 2; k++) {
        GPT* m = models[k];
        gpt_upload_tokens(m, tokens, N);
        dev_upload(dev, m->acts.targets, targets, sizeof(targets));
        gpt_set_dropout_stream(m, 1234, 1, 0);
        long before = tp_all_reduces();
        gpt_forward(m, B, T, 0.1f, 0.0f);  // hidden dropout on: identical masks on every rank
        forward_calls = tp_all_reduces() - before;
        for (int i = 0; i < N; i++) h.dloss[i] = 1.0f / N;
        dev_upload(dev, m->acts.dloss, h.dloss, N * sizeof(float));
        if (m->tp == 1) crossentropy_forward_backward(dev, m->acts.losses, m->acts.logits, m->acts.targets, m->acts.dloss, N, cfg.V, cfg.Vp);
        else vocab_parallel_crossentropy(m->par, dev, m->acts.losses, m->acts.logits, m->acts.targets, m->acts.dloss, m->acts.ce_stats, N, cfg.V, cfg.Vp);
        loss[k] = batch_loss(m, &h, N, N);
        before = tp_all_reduces();
        gpt_backward(m, B, T, 0.1f, 0.0f);
        backward_calls = tp_all_reduces() - before;
    }
    char name[200];
    snprintf(name, sizeof(name), "GPT at t = %d, recompute %s: loss equals t = 1's", t, plan);
    check(fabs(loss[1] - loss[0]) <= 1e-6 * fabs(loss[0]), name, "t=%d %.9f, t=1 %.9f", t, loss[1], loss[0]);
    // gradients gathered into the full layout
    size_t n = tp.num_params, full_n = one.num_params;
    float* shards = (float*)xmalloc((size_t)t * n * sizeof(float));
    float* got = (float*)xmalloc(full_n * sizeof(float));
    float* want = (float*)xmalloc(full_n * sizeof(float));
    dev_download(dev, shards + (size_t)par.rank[GROUP_TP] * n, tp.grads, n * sizeof(float));
    all_gather(&par, dev, GROUP_TP, shards, n, DT_F32);
    for (int r = 0; r < t; r++) tp_shard_copy(&cfg, t, r, got, shards + (size_t)r * n, 0);
    dev_download(dev, want, one.grads, full_n * sizeof(float));
    for (int i = 0; i < NUM_PARAMS; i++) {
        snprintf(name, sizeof(name), "GPT at t = %d, recompute %s: gradient of %s equals t = 1's", t, plan, param_names[i]);
        check_close(name, got + one.offsets[i], want + one.offsets[i], one.sizes[i], 1e-5);
    }
    // the parameters themselves: t = 1 and t ranks start from the same full weights
    float* full = gpt_gather_full_params(&tp);
    dev_download(dev, want, one.params, full_n * sizeof(float));
    check(!memcmp(full, want, full_n * sizeof(float)), "gathered t-rank initial weights are bitwise the t = 1 weights", "differ");
    // the backward's recompute runs those layers' forward again, g all-reduces included (as Megatron's checkpoint)
    long layers = cfg.L, recomputed = 0;
    for (int l = 0; l < cfg.L; l++) recomputed += is_recomputed(&tp, l);
    long embedding_g = t > 1;  // one rank's embedding is whole: no g
    snprintf(name, sizeof(name), "collective counter, recompute %s: forward = 2 per layer + the embedding's g (%ld)", plan, 2 * layers + embedding_g);
    check(forward_calls == 2 * layers + embedding_g, name, "counted %ld", forward_calls);
    snprintf(name, sizeof(name), "collective counter, recompute %s: backward = 2 per layer + the LM head's f + 2 per recomputed layer (%ld)", plan,
             2 * layers + 1 + 2 * recomputed);
    check(backward_calls == 2 * layers + 1 + 2 * recomputed, name, "counted %ld", backward_calls);
    free(shards); free(got); free(want); free(full);
    free(h.mask); free(h.dloss); free(h.losses);
    gpt_free(&one);
    gpt_free(&tp);
}

#ifdef HAVE_NCCL
// NCCL on one GPU (--debug-force-nccl): every collective goes through a one-rank communicator
// and must leave its values as they are (the sum, max or gather over one rank).
static void test_nccl_one_rank(void) {
    Device gpu;
    device_init(&gpu, "cuda", DT_BF16);
    Parallel solo = *parallel_serial();
    memset(solo.calls, 0, sizeof(solo.calls));  // the serial model's counts so far
    parallel_init_nccl(&solo, &gpu, 1);
    check(solo.nccl[GROUP_TP] && solo.nccl[GROUP_DP] && solo.nccl[GROUP_WORLD], "NCCL one-rank: a communicator per group", "missing");
    enum { N = 1000 };
    float host[N], back[N];
    fill_random(host, N, 5, 3.0f);
    float* x = (float*)dev_malloc(&gpu, N * sizeof(float));
    dev_upload(&gpu, x, host, sizeof(host));
    all_reduce(&solo, &gpu, GROUP_TP, x, N, DT_F32, REDUCE_SUM);
    all_reduce(&solo, &gpu, GROUP_DP, x, N, DT_F32, REDUCE_MAX);
    all_reduce_start(&solo, &gpu, GROUP_DP, x, N / 2);
    all_reduce_start(&solo, &gpu, GROUP_DP, x + N / 2, N / 2);
    all_reduce_finish(&solo, &gpu);
    reduce_scatter(&solo, &gpu, GROUP_DP, x, N);
    all_gather(&solo, &gpu, GROUP_TP, x, N, DT_F32);
    all_gather(&solo, &gpu, GROUP_TP, x, N / 2, DT_BF16);  // N bf16 values: moves bits only
    dev_download(&gpu, back, x, sizeof(back));
    check_close("NCCL one-rank: all-reduce, bucketed all-reduce, reduce-scatter, all-gather keep the values", back, host, N, 0);
    double sums[2] = {1.5, -2.25};
    all_reduce_host(&solo, GROUP_DP, sums, 2);
    check(sums[0] == 1.5 && sums[1] == -2.25, "NCCL one-rank: host all-reduce through the GPU", "got %g %g", sums[0], sums[1]);
    long counted = solo.calls[COLL_ALL_REDUCE][GROUP_TP] + solo.calls[COLL_ALL_REDUCE][GROUP_DP] + solo.calls[COLL_REDUCE_SCATTER][GROUP_DP] +
                   solo.calls[COLL_ALL_GATHER][GROUP_TP];
    check(counted == 8, "NCCL one-rank: the collective counter counts each call", "counted %ld", counted);
    dev_free(&gpu, x);
    parallel_finalize(&solo);
    device_free(&gpu);
}
#endif

int main(int argc, char** argv) {
    (void)argc;
#ifdef USE_MPI
    if (launcher_world_size() == 0) {  // run alone (make test): start 2 ranks of this program under mpirun
        char cmd[4096];
        snprintf(cmd, sizeof(cmd), "mpirun --allow-run-as-root --oversubscribe --mca btl_vader_single_copy_mechanism none -np 2 -x OMP_NUM_THREADS=1 %s", argv[0]);
        int status = system(cmd);
        if (status != 0) {
            printf("FAIL mpirun -np 2 %s: exit status %d\n0 passed, 1 failed\n", argv[0], status);
            return 1;
        }
        return 0;
    }
#endif
    parallel_init(&par, launcher_world_size() > 1 ? 2 : 1, 60);
    if (par.rank[GROUP_WORLD] != 0 && !freopen("/dev/null", "w", stdout)) die("cannot silence stdout");
    Device cpu;
    device_init(&cpu, "cpu", DT_F32);
    if (par.size[GROUP_TP] == 1) printf("note: built without MPI, only the single-rank path is tested\n");
    test_conjugate_operators(&cpu);
    test_vocab_parallel_crossentropy(&cpu, 200, 256);
    test_vocab_parallel_crossentropy(&cpu, 130, 256);
    test_tensor_parallel_gpt(&cpu, RECOMPUTE_NONE, 1, "none");
    test_tensor_parallel_gpt(&cpu, RECOMPUTE_UNIFORM, 1, "full uniform 1");
    test_tensor_parallel_gpt(&cpu, RECOMPUTE_BLOCK, 1, "full block 1");
    printf("skip GPU tensor parallelism: needs several GPUs (run train_gpt under mpirun on a multi-GPU machine)\n");
#ifdef HAVE_NCCL
    if (gpu_available() && par.rank[GROUP_WORLD] == 0) test_nccl_one_rank();  // a world of its own
    else if (par.rank[GROUP_WORLD] == 0) printf("skip NCCL on one GPU: no GPU\n");
#else
    printf("skip NCCL on one GPU: built without NCCL\n");
#endif
    int failed = test_summary();
    device_free(&cpu);
    parallel_finalize(&par);
    return failed;
}
