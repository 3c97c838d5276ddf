/*
train_gpt.cu: pretrain a Megatron GPT on one GPU, or on the CPU with OpenMP.

The model is Megatron-LM's GPT (Megatron-1 §2, the GPT-2 architecture): learned
absolute positions, pre-LayerNorm transformer blocks, tanh-GELU MLP, final LayerNorm,
and a language-model head tied to the word embedding. Data comes from Megatron's
.bin/.idx datasets (prepro/preprocess_data) and the loop is Megatron's training.py:
micro-batches accumulate gradients into a global batch, then one AdamW step.

  make train_gpt
  ./train_gpt --data-path data/tinyshakespeare_text_document \
      --vocab-file encoder.json --merge-file vocab.bpe \
      --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
      --micro-batch-size 8 --global-batch-size 16 --train-iters 200 --lr 1e-3

Every flag: ./train_gpt --help (and README.md).
*/
#include "megatron.h"
#include "prepro/tokenizer.h"

// ----------------------------------------------------------------------------
// The model's parameters: one allocation in the run's dtype, cut into the tensors
// below. Per-layer tensors are stacked over the L layers, as (L, ...).

typedef struct {
    int L;     // layers
    int C;     // hidden size
    int NH;    // attention heads
    int HS;    // head size, C / NH
    int F;     // MLP hidden size (4C by default)
    int V;     // vocabulary of the tokenizer
    int Vp;    // vocabulary padded to a multiple of 128 (x tensor-parallel size)
    int maxT;  // position embeddings
} GPTConfig;

enum { WTE, WPE, LN1W, LN1B, QKVW, QKVB, ATTPROJW, ATTPROJB, LN2W, LN2B, FCW, FCB, FCPROJW, FCPROJB, LNFW, LNFB, NUM_PARAMS };

static const char* const param_names[NUM_PARAMS] = {"wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                                              "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb"};

// Megatron decays weights only: no decay on biases and LayerNorm parameters.
static const int param_decays[NUM_PARAMS] = {1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0};

// Full shapes as (layers, rows, columns).
static void param_shape(const GPTConfig* c, int which, int shape[3]) {
    int L = c->L, C = c->C, F = c->F;
    int shapes[NUM_PARAMS][3] = {
        {1, c->Vp, C},    // wte (Vp, C), also the LM head
        {1, c->maxT, C},  // wpe
        {L, 1, C}, {L, 1, C},
        {L, 3 * C, C},    // qkvw (L, 3C, C), rows per head [q k v] (Megatron's layout)
        {L, 3 * C, 1},
        {L, C, C},        // attprojw
        {L, 1, C},
        {L, 1, C}, {L, 1, C},
        {L, F, C},        // fcw
        {L, F, 1},
        {L, C, F},        // fcprojw
        {L, 1, C},
        {1, 1, C}, {1, 1, C},
    };
    memcpy(shape, shapes[which], sizeof(shapes[which]));
}

// Tensor model parallelism (Megatron-1 §3) cuts a tensor's rows (column-parallel linears: QKV by
// heads, the MLP's first linear, the vocab-parallel embedding / LM head) or columns (row-parallel
// linears: the two output projections) into t equal blocks; the rest is replicated on every rank.
enum { REPLICATED, SPLIT_ROWS, SPLIT_COLS };
static const int param_split[NUM_PARAMS] = {SPLIT_ROWS, REPLICATED, REPLICATED, REPLICATED, SPLIT_ROWS, SPLIT_ROWS, SPLIT_COLS,
                                            REPLICATED, REPLICATED, REPLICATED, SPLIT_ROWS, SPLIT_ROWS, SPLIT_COLS, REPLICATED,
                                            REPLICATED, REPLICATED};

// Sizes of one tensor-parallel rank's shards (t = 1: the full model).
static void param_sizes(const GPTConfig* c, int t, size_t n[NUM_PARAMS]) {
    for (int i = 0; i < NUM_PARAMS; i++) {
        int s[3];
        param_shape(c, i, s);
        n[i] = (size_t)s[0] * s[1] * s[2] / (param_split[i] == REPLICATED ? 1 : t);
    }
}

// Copy rank r's shards out of the full parameters (to_shard) or back into them.
static void tp_shard_copy(const GPTConfig* c, int t, int r, float* full, float* shard, int to_shard) {
    size_t full_off = 0, shard_off = 0;
    for (int i = 0; i < NUM_PARAMS; i++) {
        int s[3], split = t > 1 ? param_split[i] : REPLICATED;
        param_shape(c, i, s);
        size_t rows = s[1], cols = s[2];
        size_t my_rows = split == SPLIT_ROWS ? rows / t : rows, my_cols = split == SPLIT_COLS ? cols / t : cols;
        size_t row0 = split == SPLIT_ROWS ? r * my_rows : 0, col0 = split == SPLIT_COLS ? r * my_cols : 0;
        for (size_t l = 0; l < (size_t)s[0]; l++)
            for (size_t k = 0; k < my_rows; k++) {
                float* f = full + full_off + (l * rows + row0 + k) * cols + col0;
                float* sh = shard + shard_off + (l * my_rows + k) * my_cols;
                if (to_shard) memcpy(sh, f, my_cols * sizeof(float));
                else memcpy(f, sh, my_cols * sizeof(float));
            }
        full_off += s[0] * rows * cols;
        shard_off += s[0] * my_rows * my_cols;
    }
}

// Activations of one micro-batch: N = B*T rows in [s, b, h] order (row t*B + b). Storage is the
// run's dtype unless noted.

// One transformer layer's activations: what its backward reads. A layer whose activations are
// stored owns its buffers; the layers of a recomputed group share scratch buffers that the
// backward refills by running the group's forward again (see the recompute plan below).
typedef struct {
    void* residual;       // (N, C) the residual stream into the layer
    void* ln1;            // (N, C)
    float* ln1_mean;      // (N) fp32
    float* ln1_rstd;      // (N) fp32
    void* qkv;            // (N, 3C)
    void* atty;           // (N, C) attention output, heads side by side
    float* att_lse;       // (B, NH, T) fp32 log-sum-exp of each attention row (no T x T scores are kept)
    void* residual2;      // (N, C) residual stream after attention
    void* ln2;            // (N, C)
    float* ln2_mean;      // (N) fp32
    float* ln2_rstd;      // (N) fp32
    void* fch;            // (N, F) MLP pre-activation
    void* fch_gelu;       // (N, F)
    void* out;            // (N, C) residual stream after the MLP: the next layer's `residual`
} LayerActs;

typedef struct {
    LayerActs* layer;     // (L) each layer's buffers
    void* embedded;       // (N, C) embedding output after dropout: layer 0's residual
    void* top;            // (N, C) the last layer's output, into the final LayerNorm
    float* att_delta;     // (B, NH, T) fp32 scratch of the attention backward
    void* lnf;            // (N, C)
    float* lnf_mean;      // (N) fp32
    float* lnf_rstd;      // (N) fp32
    void* logits;         // (N, Vp), overwritten by its gradient in training
    float* losses;        // (N) fp32 per-token loss
    int* tokens;          // (N) inputs
    int* targets;         // (N) next tokens
    float* dloss;         // (N) fp32 d(loss)/d(per-token loss): mask / tokens / micro-batches x loss scale
    void* proj;           // (N, C) scratch: an output projection before bias-dropout-add
    // backward scratch
    void* dresidual;      // (N, C) gradient of the residual stream
    void* dproj;          // (N, C)
    void* dln;            // (N, C)
    void* datty;          // (N, C)
    void* dqkv;           // (N, 3C)
    void* dfch;           // (N, F)
    // tensor parallelism (t > 1 only)
    int* vocab_tokens;    // (N) token - first row of this rank's vocabulary shard, or Vp/t for other ranks' tokens
    float* dwte_scratch;  // (Vp/t + 1, C) fp32: the embedding gradient before it joins the LM head's
    float* ce_stats;      // (3N) fp32: the vocab-parallel cross-entropy's max, sum of exp, target logit
    void* base;           // the one allocation all of the above live in
} Activations;

// Activation recomputation (Megatron-3 §5; Megatron-LM's --recompute-granularity/-method).
// full + uniform: the layers form groups of k (--recompute-num-layers, the last group may be
// shorter) and only each group's input is kept from the forward; the backward runs the group's
// forward again into k scratch layers, then its backward. full + block: the first k layers are
// recomputed one at a time, the others stored. The dropout masks are a pure function of
// (stream, layer, site), so the recomputed activations are bitwise the forward's. selective
// (recompute only softmax(QK^T), its dropout and the product with V) is what every run does here:
// flash attention never stores the s x s scores and its backward recomputes them.
enum { RECOMPUTE_NONE, RECOMPUTE_SELECTIVE, RECOMPUTE_UNIFORM, RECOMPUTE_BLOCK };

// With tensor parallelism (t ranks) the per-rank tensors have NH/t heads (C/t attention columns),
// F/t MLP columns and Vp/t vocabulary rows: NHr, Cr, Fr, Vr below ("this rank's share").
// With the distributed optimizer the fp32 master weights and Adam moments hold only this
// data-parallel rank's slice [opt_begin, opt_end) of the flat parameters.
typedef struct {
    GPTConfig cfg;
    const Device* dev;
    Parallel* par;
    int tp, tp_rank, NHr, Cr, Fr, Vr;
    size_t sizes[NUM_PARAMS], offsets[NUM_PARAMS], num_params;
    size_t padded_params;       // num_params rounded up to a multiple of the data-parallel size
    int distributed_optimizer;
    size_t opt_begin, opt_end;  // the parameters this rank's optimizer updates
    size_t grad_bucket;         // data parallelism: gradients per all-reduce (--ddp-bucket-size)
    int reduce_in_backward;     // set for the last micro-batch: start the all-reduces as the backward goes
    GradWrite weight_grads;     // GRAD_SET for a step's first micro-batch (see gpt_start_gradients), else GRAD_ADD
    void* params;        // the run's dtype
    float* grads;        // fp32, same layout
    float* master;       // fp32 master weights (GPU with bf16/fp16 only; NULL otherwise), [opt_begin, opt_end)
    float* adam_m;       // fp32, [opt_begin, opt_end)
    float* adam_v;       // fp32, [opt_begin, opt_end)
    Activations acts;
    int B, T;            // the largest micro-batch the activations hold
    int recompute, recompute_layers;  // RECOMPUTE_*, --recompute-num-layers (set before gpt_alloc_activations)
    size_t activation_bytes;  // all activation buffers, of which:
    size_t stored_bytes;      //   those kept from the forward to the backward (layers and residual streams)
    size_t recompute_bytes;   //   the scratch that recomputed layers share
    uint64_t dropout_stream;  // fixes this micro-batch's dropout masks (see gpt_set_dropout_stream)
    void* kv_cache;      // generation: (L, maxT, 3Cr) this rank's q, k, v of one sequence (see gpt_generate)
} GPT;

// Address of element `index` of a dtype-storage buffer.
static void* at(const GPT* m, void* base, size_t index) {
    return (char*)base + index * dtype_size(m->dev->dtype);
}

static void* param(const GPT* m, int which, size_t index) { return at(m, m->params, m->offsets[which] + index); }
static float* grad(const GPT* m, int which, size_t index) { return m->grads + m->offsets[which] + index; }

// Before a step's first micro-batch: the weight matrices' gradients (the LM head's and each layer's
// four products) are then written by their products (GRAD_SET), not added onto zeros, which spares
// clearing most of the buffer and the products' reads of it; the rest is zeroed here. The padding
// after the last tensor stays at the zero it was allocated with.
static void gpt_start_gradients(GPT* m) {
    for (int i = 0; i < NUM_PARAMS; i++)
        if (i != WTE && i != QKVW && i != ATTPROJW && i != FCW && i != FCPROJW) dev_zero(m->dev, grad(m, i, 0), m->sizes[i] * sizeof(float));
    m->weight_grads = GRAD_SET;
}

// This rank's part of the model: its tensor-parallel shards; the optimizer state of all of
// them, or of its data-parallel slice with the distributed optimizer.
static void gpt_build_parallel(GPT* m, const GPTConfig* cfg, const Device* dev, Parallel* par, int distributed_optimizer) {
    memset(m, 0, sizeof(*m));
    m->cfg = *cfg;
    m->dev = dev;
    m->par = par;
    m->tp = par->size[GROUP_TP];
    m->tp_rank = par->rank[GROUP_TP];
    if (cfg->NH % m->tp || cfg->F % m->tp || cfg->Vp % m->tp)
        die("tensor-parallel size %d must divide the heads %d, the MLP size %d and the padded vocabulary %d", m->tp, cfg->NH, cfg->F, cfg->Vp);
    m->NHr = cfg->NH / m->tp;
    m->Cr = m->NHr * cfg->HS;
    m->Fr = cfg->F / m->tp;
    m->Vr = cfg->Vp / m->tp;
    param_sizes(cfg, m->tp, m->sizes);
    for (int i = 0; i < NUM_PARAMS; i++) {
        m->offsets[i] = m->num_params;
        m->num_params += m->sizes[i];
    }
    size_t n = m->num_params, dp = par->size[GROUP_DP];
    m->padded_params = CEIL_DIV(n, dp) * dp;
    m->distributed_optimizer = distributed_optimizer;
    m->grad_bucket = 40000000;
    m->opt_begin = distributed_optimizer ? m->padded_params / dp * par->rank[GROUP_DP] : 0;
    m->opt_end = distributed_optimizer ? m->opt_begin + m->padded_params / dp : n;
    size_t n_opt = m->opt_end - m->opt_begin;
    m->params = dev_malloc(dev, m->padded_params * dtype_size(dev->dtype));
    m->grads = (float*)dev_malloc(dev, m->padded_params * sizeof(float));
    m->adam_m = (float*)dev_malloc(dev, n_opt * sizeof(float));
    m->adam_v = (float*)dev_malloc(dev, n_opt * sizeof(float));
    if (dev->dtype != DT_F32) m->master = (float*)dev_malloc(dev, n_opt * sizeof(float));
    dev_zero(dev, m->params, m->padded_params * dtype_size(dev->dtype));
    dev_zero(dev, m->grads, m->padded_params * sizeof(float));
    dev_zero(dev, m->adam_m, n_opt * sizeof(float));
    dev_zero(dev, m->adam_v, n_opt * sizeof(float));
}

static void gpt_build(GPT* m, const GPTConfig* cfg, const Device* dev) { gpt_build_parallel(m, cfg, dev, parallel_serial(), 0); }

// Set this rank's parameters from fp32 host values in its own layout (the master copy too).
static void gpt_set_params(GPT* m, const float* host) {
    size_t n = m->num_params;
    void* stored = xmalloc(n * dtype_size(m->dev->dtype));
    floats_to_dtype(stored, host, n, m->dev->dtype);
    dev_upload(m->dev, m->params, stored, n * dtype_size(m->dev->dtype));
    size_t opt_n = (m->opt_end < n ? m->opt_end : n) - (m->opt_begin < n ? m->opt_begin : n);
    if (m->master) dev_upload(m->dev, m->master, host + m->opt_begin, opt_n * sizeof(float));
    free(stored);
}

// Set the parameters from the full model's fp32 host values: each rank keeps its shards, so
// t = 1 and t > 1 start from the same weights.
static void gpt_set_full_params(GPT* m, float* full) {
    if (m->tp == 1) { gpt_set_params(m, full); return; }
    float* shard = (float*)xmalloc(m->num_params * sizeof(float));
    tp_shard_copy(&m->cfg, m->tp, m->tp_rank, full, shard, 1);
    gpt_set_params(m, shard);
    free(shard);
}

// Megatron's initialisation: weights N(0, std), the two output projections of each
// layer N(0, std/sqrt(2L)), biases 0, LayerNorm 1 and 0. Drawn on the host in chunks
// of 2^20 values, each chunk from its own MT19937 seeded by (seed, chunk): the same
// weights on any device, any thread count, and for any later parallel layout.
static void gpt_init(GPT* m, double std, uint32_t seed) {
    const size_t CHUNK = 1 << 20;
    size_t sizes[NUM_PARAMS], offsets[NUM_PARAMS], total = 0;  // the full model's layout
    param_sizes(&m->cfg, 1, sizes);
    for (int i = 0; i < NUM_PARAMS; i++) {
        offsets[i] = total;
        total += sizes[i];
    }
    float* host = (float*)xmalloc(total * sizeof(float));
    double scaled_std = std / sqrt(2.0 * m->cfg.L);
    size_t chunks = CEIL_DIV(total, CHUNK);
    #pragma omp parallel for schedule(dynamic)
    for (size_t k = 0; k < chunks; k++) {
        MT19937 rng;
        mt_seed(&rng, hash_u32(seed, k));
        size_t end = (k + 1) * CHUNK < total ? (k + 1) * CHUNK : total;
        for (size_t j = k * CHUNK; j < end; j++) {
            int i = NUM_PARAMS - 1;
            while (offsets[i] > j) i--;
            int is_ln_weight = i == LN1W || i == LN2W || i == LNFW;
            int is_weight = i == WTE || i == WPE || i == QKVW || i == ATTPROJW || i == FCW || i == FCPROJW;
            double s = (i == ATTPROJW || i == FCPROJW) ? scaled_std : std;
            host[j] = is_weight ? (float)(s * mt_normal(&rng)) : is_ln_weight ? 1.0f : 0.0f;
        }
    }
    gpt_set_full_params(m, host);
    free(host);
}

// The first layer of layer l's recompute group (l itself when l is stored or recomputed alone).
static int recompute_group_start(const GPT* m, int l) {
    return m->recompute == RECOMPUTE_UNIFORM ? l / m->recompute_layers * m->recompute_layers : l;
}

static int is_recomputed(const GPT* m, int l) {
    return m->recompute == RECOMPUTE_UNIFORM || (m->recompute == RECOMPUTE_BLOCK && l < m->recompute_layers);
}

// Where a buffer goes and how many bytes it takes.
typedef struct {
    void** ptr;
    size_t bytes;
} Carve;

// Points each entry at consecutive 256-byte aligned pieces of base (base NULL: only counts);
// returns the bytes they take.
static size_t carve(const Carve* table, size_t count, char* base) {
    size_t total = 0;
    for (size_t i = 0; i < count; i++) {
        if (base) *table[i].ptr = base + total;
        total += (table[i].bytes + 255) / 256 * 256;
    }
    return total;
}

// One layer's buffers (all but the residual streams) carved from base; returns their bytes.
static size_t carve_layer(const GPT* m, LayerActs* x, size_t N, char* base) {
    size_t C = m->cfg.C, F = m->Fr, Ca = m->Cr, NH = m->NHr, es = dtype_size(m->dev->dtype);
    Carve table[] = {
        {&x->ln1, N * C * es}, {(void**)&x->ln1_mean, N * 4}, {(void**)&x->ln1_rstd, N * 4}, {&x->qkv, N * 3 * Ca * es},
        {&x->atty, N * Ca * es}, {(void**)&x->att_lse, N * NH * 4}, {&x->residual2, N * C * es}, {&x->ln2, N * C * es},
        {(void**)&x->ln2_mean, N * 4}, {(void**)&x->ln2_rstd, N * 4}, {&x->fch, N * F * es}, {&x->fch_gelu, N * F * es},
    };
    return carve(table, sizeof(table) / sizeof(table[0]), base);
}

// Allocate the activation buffers for micro-batches of up to B x T tokens, as the recompute
// plan (m->recompute) asks: stored layers and the residual streams that enter a group (or the
// final LayerNorm) are kept from the forward to the backward; a recomputed group's layers share
// scratch layers and the streams between them.
static void gpt_alloc_activations(GPT* m, int B, int T) {
    const GPTConfig* c = &m->cfg;
    size_t N = (size_t)B * T, C = c->C, F = m->Fr, Ca = m->Cr, NH = m->NHr, es = dtype_size(m->dev->dtype);
    size_t tp_extra = m->tp > 1;  // the tensor-parallel buffers exist only when t > 1
    Activations* a = &m->acts;
    Carve table[] = {
        {(void**)&a->att_delta, N * NH * 4}, {&a->lnf, N * C * es}, {(void**)&a->lnf_mean, N * 4}, {(void**)&a->lnf_rstd, N * 4},
        {&a->logits, N * m->Vr * es}, {(void**)&a->losses, N * 4}, {(void**)&a->tokens, N * 4}, {(void**)&a->targets, N * 4},
        {(void**)&a->dloss, N * 4}, {&a->proj, N * C * es}, {&a->dresidual, N * C * es}, {&a->dproj, N * C * es},
        {&a->dln, N * C * es}, {&a->datty, N * Ca * es}, {&a->dqkv, N * 3 * Ca * es}, {&a->dfch, N * F * es},
        {(void**)&a->vocab_tokens, tp_extra * N * 4}, {(void**)&a->dwte_scratch, tp_extra * (m->Vr + 1) * C * 4},
        {(void**)&a->ce_stats, tp_extra * 3 * N * 4},
    };
    int L = c->L, stored_layers = 0, scratch_layers = 0, stored_streams = 1;  // the final LayerNorm's input is always kept
    for (int l = 0; l < L; l++) {
        int depth = l - recompute_group_start(m, l);
        if (!is_recomputed(m, l)) stored_layers++;
        else if (depth + 1 > scratch_layers) scratch_layers = depth + 1;
        stored_streams += depth == 0;
    }
    int scratch_streams = scratch_layers > 0 ? scratch_layers - 1 : 0;
    size_t layer_bytes = carve_layer(m, NULL, N, NULL), stream_bytes = (N * C * es + 255) / 256 * 256;
    m->stored_bytes = stored_layers * layer_bytes + stored_streams * stream_bytes;
    m->recompute_bytes = scratch_layers * layer_bytes + scratch_streams * stream_bytes;
    size_t other_bytes = carve(table, sizeof(table) / sizeof(table[0]), NULL);
    m->activation_bytes = m->stored_bytes + m->recompute_bytes + other_bytes;
    char* base = (char*)dev_malloc(m->dev, m->activation_bytes);
    char *stored = base, *scratch = base + m->stored_bytes, *scratch_streams_at = scratch + scratch_layers * layer_bytes;
    carve(table, sizeof(table) / sizeof(table[0]), scratch + m->recompute_bytes);
    a->base = base;
    a->layer = (LayerActs*)xcalloc(L > 0 ? L : 1, sizeof(LayerActs));
    for (int l = 0; l < L; l++) {
        LayerActs* x = &a->layer[l];
        int depth = l - recompute_group_start(m, l);
        if (is_recomputed(m, l)) carve_layer(m, x, N, scratch + depth * layer_bytes);
        else stored += carve_layer(m, x, N, stored);
        if (depth == 0) {
            x->residual = stored;
            stored += stream_bytes;
        } else {
            x->residual = scratch_streams_at + (depth - 1) * stream_bytes;
        }
    }
    a->top = stored;
    for (int l = 0; l < L; l++) a->layer[l].out = l + 1 < L ? a->layer[l + 1].residual : a->top;
    a->embedded = L > 0 ? a->layer[0].residual : a->top;
    m->B = B;
    m->T = T;
}

// Dropout masks are a pure function of (stream, layer, site, element), so a
// backward pass and a resumed run regenerate exactly the forward's masks.
static void gpt_set_dropout_stream(GPT* m, uint32_t seed, int64_t iteration, int micro_batch) {
    m->dropout_stream = ((uint64_t)seed << 40) ^ ((uint64_t)iteration << 12) ^ (uint64_t)micro_batch;
}

static uint64_t dropout_seed(const GPT* m, int layer, int site) {
    uint64_t key = (uint64_t)layer * 4 + site;
    return ((uint64_t)hash_u32(m->dropout_stream, key) << 32) | hash_u32(~m->dropout_stream, key);
}

enum { SITE_EMBEDDING, SITE_ATTENTION_PROBS, SITE_ATTENTION_OUT, SITE_MLP_OUT };

// As Megatron's model-parallel RNG: dropout on replicated activations (embedding, the two
// residual branches) is identical on every tensor-parallel rank, while inside attention each
// rank, holding different heads, draws from its own stream (rank 0's is the single-device one).
static uint64_t attention_dropout_seed(const GPT* m, int layer) {
    return dropout_seed(m, layer + m->tp_rank * m->cfg.L, SITE_ATTENTION_PROBS);
}

// Layer l's KV cache from position pos on: the qkv rows of one sequence, in attention's layout.
static void* kv_rows(const GPT* m, int l, int pos) {
    return at(m, m->kv_cache, ((size_t)l * m->cfg.maxT + pos) * 3 * m->Cr);
}

// The row-parallel linear layer that closes a residual branch, then g and the bias-dropout-add:
// out = residual + dropout(g(inp @ w^T) + bias), inp's rows K wide. On one rank without dropout
// the matmul adds the bias and the residual itself, with no pass of its own.
static void branch_forward(GPT* m, void* out, const void* residual, const void* inp, const void* w, const void* bias, int N, int K,
                           float p, uint64_t seed) {
    const Device* d = m->dev;
    int C = m->cfg.C;
    if (m->tp == 1 && p == 0) {
        matmul_forward_residual(d, out, residual, inp, w, bias, N, K, C);
        return;
    }
    matmul_forward(d, m->acts.proj, inp, w, NULL, N, K, C, NULL);
    tp_g_forward(m->par, d, m->acts.proj, (size_t)N * C);
    residual_dropout_forward(d, out, residual, m->acts.proj, bias, p, seed, N, C);
}

// One transformer layer (Megatron-1 §3: pre-LN attention and MLP, each f -> column-parallel ->
// row-parallel -> g under tensor parallelism), from x->residual to x->out. The forward pass runs
// it for every layer, and the backward again for the layers of a recomputed group.
// Generation (cache_pos >= 0, B = 1): the rows are positions [cache_pos, cache_pos + T) of one
// sequence; their q, k, v go to the KV cache and attention reads [0, cache_pos + T) from it.
// Training: cache_pos = -1.
static void layer_forward(GPT* m, int l, int B, int T, int cache_pos, float p_hidden, float p_attn) {
    const GPTConfig* c = &m->cfg;
    const Device* d = m->dev;
    const LayerActs* x = &m->acts.layer[l];
    int N = B * T, C = c->C, F = m->Fr, Ca = m->Cr;
    // attention: f, column-parallel QKV (this rank's heads), row-parallel projection, g
    layernorm_forward(d, x->ln1, x->ln1_mean, x->ln1_rstd, x->residual, param(m, LN1W, l * C), param(m, LN1B, l * C), N, C);
    void* qkv = cache_pos >= 0 ? kv_rows(m, l, cache_pos) : x->qkv;
    matmul_forward(d, qkv, x->ln1, param(m, QKVW, (size_t)l * 3 * Ca * C), param(m, QKVB, l * 3 * Ca), N, C, 3 * Ca, NULL);
    if (cache_pos >= 0) attention_decode(d, x->atty, x->att_lse, kv_rows(m, l, 0), cache_pos, T, 1, m->NHr, c->HS);
    else attention_forward(d, x->atty, x->att_lse, x->qkv, p_attn, attention_dropout_seed(m, l), B, T, m->NHr, c->HS);
    branch_forward(m, x->residual2, x->residual, x->atty, param(m, ATTPROJW, (size_t)l * C * Ca), param(m, ATTPROJB, l * C), N, Ca, p_hidden,
                   dropout_seed(m, l, SITE_ATTENTION_OUT));
    // MLP: f, column-parallel first linear + GeLU, row-parallel second linear, g
    layernorm_forward(d, x->ln2, x->ln2_mean, x->ln2_rstd, x->residual2, param(m, LN2W, l * C), param(m, LN2B, l * C), N, C);
    matmul_forward(d, x->fch, x->ln2, param(m, FCW, (size_t)l * F * C), param(m, FCB, l * F), N, C, F, x->fch_gelu);
    branch_forward(m, x->out, x->residual2, x->fch_gelu, param(m, FCPROJW, (size_t)l * C * F), param(m, FCPROJB, l * C), N, F, p_hidden,
                   dropout_seed(m, l, SITE_MLP_OUT));
}

// Forward through the transformer to the logits, for B x T tokens already in acts.tokens;
// cache_pos as in layer_forward (generation's first position, or -1).
static void gpt_forward_at(GPT* m, int B, int T, int cache_pos, float p_hidden, float p_attn) {
    const GPTConfig* c = &m->cfg;
    const Device* d = m->dev;
    Activations* a = &m->acts;
    int N = B * T, C = c->C;
    size_t NC = (size_t)N * C;
    void* wpe = param(m, WPE, (size_t)(cache_pos > 0 ? cache_pos : 0) * C);  // the row of the first position
    if (m->tp == 1) embedding_forward(d, a->embedded, a->tokens, param(m, WTE, 0), wpe, B, T, C);
    else {  // VocabParallelEmbedding: the g all-reduce sums each rank's rows
        vocab_embedding_forward(d, a->embedded, a->vocab_tokens, param(m, WTE, 0), m->tp_rank == 0 ? wpe : NULL, m->Vr, B, T, C);
        tp_g_forward(m->par, d, a->embedded, NC);
    }
    dropout_forward(d, a->embedded, p_hidden, dropout_seed(m, 0, SITE_EMBEDDING), NC);
    for (int l = 0; l < c->L; l++) layer_forward(m, l, B, T, cache_pos, p_hidden, p_attn);
    layernorm_forward(d, a->lnf, a->lnf_mean, a->lnf_rstd, a->top, param(m, LNFW, 0), param(m, LNFB, 0), N, C);
    matmul_forward(d, a->logits, a->lnf, param(m, WTE, 0), NULL, N, C, m->Vr, NULL);  // f, then this rank's vocabulary columns
}

static void gpt_forward(GPT* m, int B, int T, float p_hidden, float p_attn) { gpt_forward_at(m, B, T, -1, p_hidden, p_attn); }

// Data parallelism without the distributed optimizer: during the last micro-batch's backward,
// once layer l's gradients are final, start the all-reduce of layers [l, top] when they hold
// at least a bucket of values (or l is the first layer). Per-layer tensors are stacked over
// layers, so a run of layers is one contiguous slice of each.
static const int layer_params[] = {LN1W, LN1B, QKVW, QKVB, ATTPROJW, ATTPROJB, LN2W, LN2B, FCW, FCB, FCPROJW, FCPROJB};
static const int other_params[] = {WTE, WPE, LNFW, LNFB};

static int gpt_reduce_layers(GPT* m, int l, int top) {
    size_t per_layer = 0, L = m->cfg.L;
    for (int k = 0; k < 12; k++) per_layer += m->sizes[layer_params[k]] / L;
    if ((top - l + 1) * per_layer < m->grad_bucket && l > 0) return top;
    for (int k = 0; k < 12; k++) {
        size_t n = m->sizes[layer_params[k]] / L;
        all_reduce_start(m->par, m->dev, GROUP_DP, grad(m, layer_params[k], l * n), (top - l + 1) * n);
    }
    return l - 1;
}

// branch_forward's backward to the product's output: dropout's backward of acts.dresidual into
// acts.dproj, with the bias gradient. Without dropout that gradient is dresidual itself: nothing is
// copied, and the bias gradient was added by the LayerNorm backward that left dresidual (see
// residual_bias_grad).
static void* branch_backward(GPT* m, float* dbias, int N, float p, uint64_t seed) {
    Activations* a = &m->acts;
    if (p == 0) return a->dresidual;
    residual_dropout_backward(m->dev, NULL, a->dproj, dbias, a->dresidual, p, seed, N, m->cfg.C);
    return a->dproj;
}

// Without hidden dropout, a residual branch's bias gradient is the column sums of the residual
// stream's gradient where the branch joins it, which the LayerNorm backward that finishes that
// gradient adds up as it writes it: the bias gradient of the branch whose output joined the stream
// just before that LayerNorm (bias: FCPROJB or ATTPROJB, of layer l), or NULL (dropout's backward adds it).
static float* residual_bias_grad(GPT* m, int bias, int l, float p_hidden) {
    return p_hidden == 0 && l >= 0 ? grad(m, bias, (size_t)l * m->cfg.C) : NULL;
}

// One layer's backward: from d(x->out) in acts.dresidual to d(x->residual) there, parameter
// gradients accumulated (+=; the weight matrices' as m->weight_grads says). g's backward is the
// identity, f's the all-reduce of dln.
static void layer_backward(GPT* m, int l, int B, int T, float p_hidden, float p_attn) {
    const GPTConfig* c = &m->cfg;
    const Device* d = m->dev;
    Activations* a = &m->acts;
    const LayerActs* x = &a->layer[l];
    int N = B * T, C = c->C, F = m->Fr, Ca = m->Cr;
    size_t NC = (size_t)N * C;
    // MLP: x->out = x->residual2 + dropout(x->fch_gelu @ fcprojw^T + fcprojb)
    void* dproj = branch_backward(m, grad(m, FCPROJB, l * C), N, p_hidden, dropout_seed(m, l, SITE_MLP_OUT));
    matmul_backward(d, NULL, grad(m, FCPROJW, (size_t)l * C * F), NULL, dproj, x->fch_gelu, param(m, FCPROJW, (size_t)l * C * F), N, F, C, m->weight_grads);
    matmul_backward_dgelu(d, a->dfch, grad(m, FCB, l * F), dproj, param(m, FCPROJW, (size_t)l * C * F), x->fch, N, F, C);
    matmul_backward(d, a->dln, grad(m, FCW, (size_t)l * F * C), NULL, a->dfch, x->ln2, param(m, FCW, (size_t)l * F * C), N, C, F, m->weight_grads);
    tp_f_backward(m->par, d, a->dln, NC);
    layernorm_backward(d, a->dresidual, grad(m, LN2W, l * C), grad(m, LN2B, l * C), residual_bias_grad(m, ATTPROJB, l, p_hidden), a->dln,
                       x->residual2, param(m, LN2W, l * C), x->ln2_mean, x->ln2_rstd, N, C);
    // attention: x->residual2 = x->residual + dropout(x->atty @ attprojw^T + attprojb)
    dproj = branch_backward(m, grad(m, ATTPROJB, l * C), N, p_hidden, dropout_seed(m, l, SITE_ATTENTION_OUT));
    matmul_backward(d, a->datty, grad(m, ATTPROJW, (size_t)l * C * Ca), NULL, dproj, x->atty, param(m, ATTPROJW, (size_t)l * C * Ca), N, Ca, C, m->weight_grads);
    attention_backward(d, a->dqkv, a->att_delta, a->datty, x->qkv, x->atty, x->att_lse, p_attn, attention_dropout_seed(m, l), B, T, m->NHr, c->HS);
    matmul_backward(d, a->dln, grad(m, QKVW, (size_t)l * 3 * Ca * C), NULL, a->dqkv, x->ln1, param(m, QKVW, (size_t)l * 3 * Ca * C), N, C, 3 * Ca, m->weight_grads);
    qkv_bias_backward(d, grad(m, QKVB, l * 3 * Ca), a->dqkv, grad(m, ATTPROJB, l * C), param(m, ATTPROJW, (size_t)l * C * Ca), p_attn, N, m->NHr, c->HS, C);
    tp_f_backward(m->par, d, a->dln, NC);
    layernorm_backward(d, a->dresidual, grad(m, LN1W, l * C), grad(m, LN1B, l * C), residual_bias_grad(m, FCPROJB, l - 1, p_hidden), a->dln,
                       x->residual, param(m, LN1W, l * C), x->ln1_mean, x->ln1_rstd, N, C);
}

// Backward from d(logits) (left in acts.logits by the fused cross-entropy) to every parameter
// gradient, accumulating (+=) into m->grads (the weight matrices' written over it where
// m->weight_grads says so: a step's first micro-batch). Reaching the top layer of a recomputed group, the
// group's forward runs again (tensor parallelism: with its g all-reduces) to refill its buffers.
static void gpt_backward(GPT* m, int B, int T, float p_hidden, float p_attn) {
    const GPTConfig* c = &m->cfg;
    const Device* d = m->dev;
    Activations* a = &m->acts;
    int N = B * T, C = c->C;
    size_t NC = (size_t)N * C;
    int top = c->L - 1;  // the highest layer whose gradients are not being reduced yet
    matmul_backward(d, a->dln, grad(m, WTE, 0), NULL, a->logits, a->lnf, param(m, WTE, 0), N, C, m->Vr, m->weight_grads);
    tp_f_backward(m->par, d, a->dln, NC);
    dev_zero(d, a->dresidual, NC * dtype_size(d->dtype));
    layernorm_backward(d, a->dresidual, grad(m, LNFW, 0), grad(m, LNFB, 0), residual_bias_grad(m, FCPROJB, c->L - 1, p_hidden), a->dln, a->top,
                       param(m, LNFW, 0), a->lnf_mean, a->lnf_rstd, N, C);
    for (int l = c->L - 1; l >= 0; l--) {
        int group_top = l + 1 == c->L || recompute_group_start(m, l + 1) == l + 1;
        if (is_recomputed(m, l) && group_top)
            for (int r = recompute_group_start(m, l); r <= l; r++) layer_forward(m, r, B, T, -1, p_hidden, p_attn);
        layer_backward(m, l, B, T, p_hidden, p_attn);
        if (m->reduce_in_backward) top = gpt_reduce_layers(m, l, top);
    }
    dropout_backward(d, a->dresidual, p_hidden, dropout_seed(m, 0, SITE_EMBEDDING), NC);
    if (m->tp == 1) embedding_backward(d, grad(m, WTE, 0), grad(m, WPE, 0), a->dresidual, a->tokens, B, T, C);
    else vocab_embedding_backward(d, grad(m, WTE, 0), grad(m, WPE, 0), a->dwte_scratch, a->dresidual, a->vocab_tokens, m->Vr, B, T, C);
    if (m->reduce_in_backward)
        for (int k = 0; k < 4; k++) all_reduce_start(m->par, d, GROUP_DP, grad(m, other_params[k], 0), m->sizes[other_params[k]]);
    m->weight_grads = GRAD_ADD;  // the step's next micro-batches add theirs
}

// Input tokens to the device, in stream order (see dev_upload_async); with tensor parallelism also
// their rows in this rank's vocabulary shard (Vr, the sink row, for tokens of other ranks).
static void gpt_upload_tokens(GPT* m, const int* tokens, int N) {
    dev_upload_async(m->dev, m->acts.tokens, tokens, N * sizeof(int));
    if (m->tp == 1) return;
    int* local = (int*)xmalloc(N * sizeof(int));
    int start = m->tp_rank * m->Vr;
    for (int i = 0; i < N; i++) local[i] = tokens[i] >= start && tokens[i] < start + m->Vr ? tokens[i] - start : m->Vr;
    dev_upload(m->dev, m->acts.vocab_tokens, local, N * sizeof(int));
    free(local);
}

// ----------------------------------------------------------------------------
// One micro-batch: host samples -> device tokens, forward, loss, backward.

typedef struct {
    int* tokens;    // (N) host, [s, b] order
    int* targets;   // (N)
    float* mask;    // (N) loss mask
    float* dloss;   // (N)
    float* losses;  // (N)
    int32_t* sample;  // (T + 1) one sample from the dataset
} HostBatch;

// Lay B samples of T+1 tokens out as inputs/targets in [s, b] order and upload them.
// Returns the number of tokens that count in the loss.
static double load_batch(GPT* m, HostBatch* h, const GPTSampleSet* set, int64_t first, int B, int T, int eod, int eod_mask_loss) {
    for (int b = 0; b < B; b++) {
        size_t index = (size_t)((first + b) % (int64_t)set->num_samples);
        gpt_sample_get(set, index, h->sample);
        for (int t = 0; t < T; t++) {
            int x = h->sample[t], y = h->sample[t + 1];
            if (x < 0 || x >= m->cfg.V || y < 0 || y >= m->cfg.V)
                die("sample %zu holds token id %d, outside the vocabulary of %d: wrong --data-path or tokenizer?", index, x < 0 || x >= m->cfg.V ? x : y, m->cfg.V);
            h->tokens[t * B + b] = x;
            h->targets[t * B + b] = y;
            h->mask[t * B + b] = (eod_mask_loss && x == eod) ? 0.0f : 1.0f;
        }
    }
    double count = 0;
    for (int i = 0; i < B * T; i++) count += h->mask[i];
    gpt_upload_tokens(m, h->tokens, B * T);
    dev_upload_async(m->dev, m->acts.targets, h->targets, B * T * sizeof(int));
    return count;
}

// Masked mean of the per-token losses of the micro-batch just computed.
static double batch_loss(GPT* m, HostBatch* h, int N, double count) {
    dev_download(m->dev, h->losses, m->acts.losses, N * sizeof(float));
    double sum = 0;
    for (int i = 0; i < N; i++) sum += (double)h->losses[i] * h->mask[i];
    return count > 0 ? sum / count : 0.0;
}

// Forward + loss, and backward when `scale` > 0 (gradient of loss x scale / micro-batches).
static double gpt_micro_step(GPT* m, HostBatch* h, int B, int T, double count, double grad_scale, float p_hidden, float p_attn) {
    int N = B * T;
    const float* dloss = NULL;
    if (grad_scale > 0) {  // uploaded before the forward: a copy here would wait for the whole forward
        for (int i = 0; i < N; i++) h->dloss[i] = count > 0 ? (float)(h->mask[i] / count * grad_scale) : 0.0f;
        dev_upload_async(m->dev, m->acts.dloss, h->dloss, N * sizeof(float));
        dloss = m->acts.dloss;
    }
    gpt_forward(m, B, T, p_hidden, p_attn);
    if (m->tp == 1) crossentropy_forward_backward(m->dev, m->acts.losses, m->acts.logits, m->acts.targets, dloss, N, m->cfg.V, m->cfg.Vp);
    else vocab_parallel_crossentropy(m->par, m->dev, m->acts.losses, m->acts.logits, m->acts.targets, dloss, m->acts.ce_stats, N, m->cfg.V, m->cfg.Vp);
    if (grad_scale > 0) gpt_backward(m, B, T, p_hidden, p_attn);
    return batch_loss(m, h, N, count);
}

// The part [begin, end) of tensor i that lies in [lo, hi); returns its length.
static size_t tensor_overlap(const GPT* m, int i, size_t lo, size_t hi, size_t* begin) {
    size_t b = m->offsets[i] > lo ? m->offsets[i] : lo, e = m->offsets[i] + m->sizes[i] < hi ? m->offsets[i] + m->sizes[i] : hi;
    *begin = b;
    return e > b ? e - b : 0;
}

// One AdamW step on this rank's optimizer range (all its parameters, or its data-parallel slice
// with the distributed optimizer); weight decay only where Megatron applies it.
static void gpt_update(GPT* m, float lr, const Args* args, float weight_decay, float grad_scale, int step) {
    for (int i = 0; i < NUM_PARAMS; i++) {
        size_t b, n = tensor_overlap(m, i, m->opt_begin, m->opt_end, &b), k = b - m->opt_begin;
        adamw_update(m->dev, at(m, m->params, b), m->master ? m->master + k : NULL, m->grads + b, m->adam_m + k, m->adam_v + k,
                     n, lr, (float)args->adam_beta1, (float)args->adam_beta2, (float)args->adam_eps,
                     param_decays[i] ? weight_decay : 0.0f, grad_scale, step);
    }
    // the distributed optimizer: every data-parallel rank gets the others' updated slices
    if (m->distributed_optimizer) all_gather(m->par, m->dev, GROUP_DP, m->params, m->opt_end - m->opt_begin, m->dev->dtype);
}

// Data parallelism: the gradients summed over the data-parallel ranks (the loss is already the
// global batch's mean, so the sum is Megatron's average). Without the distributed optimizer the
// bucketed all-reduces started in the last backward (gpt_reduce_layers) are waited for; with it
// a reduce-scatter leaves each rank the sum over its own slice only.
static void gpt_reduce_gradients(GPT* m) {
    Parallel* p = m->par;
    if (m->distributed_optimizer) reduce_scatter(p, m->dev, GROUP_DP, m->grads, m->padded_params / p->size[GROUP_DP]);
    else all_reduce_finish(p, m->dev);
}

// The global gradient norm squared, as Megatron's: over this rank's optimizer range, replicated
// tensors (LayerNorm, row-parallel biases, positions) counted once (on tensor-parallel rank 0),
// summed over the tensor-parallel group and, with the distributed optimizer, the data-parallel group.
static double gpt_grad_norm_squared(GPT* m) {
    const float* grads[NUM_PARAMS];
    size_t lengths[NUM_PARAMS];
    int count = 0;
    for (int i = 0; i < NUM_PARAMS; i++) {
        size_t b, n = tensor_overlap(m, i, m->opt_begin, m->opt_end, &b);
        if (n == 0 || (param_split[i] == REPLICATED && m->tp_rank != 0)) continue;
        grads[count] = m->grads + b;
        lengths[count++] = n;
    }
    double sum = grad_norm_squared_ranges(m->dev, grads, lengths, count);
    all_reduce_host(m->par, GROUP_TP, &sum, 1);
    if (m->distributed_optimizer) all_reduce_host(m->par, GROUP_DP, &sum, 1);
    return sum;
}

// The full model's fp32 parameters in the single-device layout (every rank gets them).
static float* gpt_gather_full_params(GPT* m) {
    int t = m->tp;
    size_t n = m->num_params, full_n = 0, sizes[NUM_PARAMS];
    param_sizes(&m->cfg, 1, sizes);
    for (int i = 0; i < NUM_PARAMS; i++) full_n += sizes[i];
    size_t es = dtype_size(m->dev->dtype);
    void* stored = xmalloc(n * es);
    float* shards = (float*)xmalloc((size_t)t * n * sizeof(float));
    float* full = (float*)xmalloc(full_n * sizeof(float));
    dev_download(m->dev, stored, m->params, n * es);
    dtype_to_floats(shards + (size_t)m->tp_rank * n, stored, n, m->dev->dtype);
    all_gather(m->par, parallel_host_device(), GROUP_TP, shards, n, DT_F32);
    for (int r = 0; r < t; r++) tp_shard_copy(&m->cfg, t, r, full, shards + (size_t)r * n, 0);
    free(stored);
    free(shards);
    return full;
}

// ----------------------------------------------------------------------------
// Hugging Face GPT-2 weights (config.json-free: the caller gives the config).
// HF's Conv1D stores weights [in, out]; its c_attn columns are [q | k | v] over all
// heads, where Megatron interleaves per head: [h0: q k v, h1: q k v, ...].

// GPT-2's three plain linears per layer (Conv1D, weight [in, out]) and where they live here.
static const struct { const char* w; const char* b; int which_w, which_b; } hf_linears[3] = {
    {"attn.c_proj.weight", "attn.c_proj.bias", ATTPROJW, ATTPROJB},
    {"mlp.c_fc.weight", "mlp.c_fc.bias", FCW, FCB},
    {"mlp.c_proj.weight", "mlp.c_proj.bias", FCPROJW, FCPROJB},
};

// Their sizes chain C -> C, C -> F, F -> C: linear k maps hf_linear_in(k) to hf_linear_in(k + 1).
static int hf_linear_in(const GPTConfig* c, int k) { return k == 2 ? c->F : c->C; }

// Read HF-named tensors (each name preceded by `prefix`) into host floats in our
// layout; the padded vocabulary rows stay 0.
static void hf_read_params(const GPT* m, const SafeTensors* st, const char* prefix, float* host) {
    const GPTConfig* c = &m->cfg;
    int C = c->C, F = c->F, HS = c->HS;
    float* tmp = (float*)xmalloc(((size_t)C * (3 * C > F ? 3 * C : F) + 3 * C) * sizeof(float));
    char name[256];
    memset(host, 0, m->num_params * sizeof(float));
    #define HF(fmt, ...) (snprintf(name, sizeof(name), "%s" fmt, prefix, ##__VA_ARGS__), name)
    safetensors_read_floats(st, HF("transformer.wte.weight"), host + m->offsets[WTE], (size_t)c->V * C);
    safetensors_read_floats(st, HF("transformer.wpe.weight"), host + m->offsets[WPE], (size_t)c->maxT * C);
    safetensors_read_floats(st, HF("transformer.ln_f.weight"), host + m->offsets[LNFW], C);
    safetensors_read_floats(st, HF("transformer.ln_f.bias"), host + m->offsets[LNFB], C);
    for (int l = 0; l < c->L; l++) {
        safetensors_read_floats(st, HF("transformer.h.%d.ln_1.weight", l), host + m->offsets[LN1W] + l * C, C);
        safetensors_read_floats(st, HF("transformer.h.%d.ln_1.bias", l), host + m->offsets[LN1B] + l * C, C);
        safetensors_read_floats(st, HF("transformer.h.%d.ln_2.weight", l), host + m->offsets[LN2W] + l * C, C);
        safetensors_read_floats(st, HF("transformer.h.%d.ln_2.bias", l), host + m->offsets[LN2B] + l * C, C);
        // c_attn: weight [C, 3C] (in, out), bias [3C]; output column j = part*C + head*HS + k
        safetensors_read_floats(st, HF("transformer.h.%d.attn.c_attn.weight", l), tmp, (size_t)C * 3 * C);
        float* qkvw = host + m->offsets[QKVW] + (size_t)l * 3 * C * C;
        float* bias_in = tmp + (size_t)C * 3 * C;
        safetensors_read_floats(st, HF("transformer.h.%d.attn.c_attn.bias", l), bias_in, 3 * C);
        float* qkvb = host + m->offsets[QKVB] + (size_t)l * 3 * C;
        for (int part = 0; part < 3; part++)
            for (int h = 0; h < c->NH; h++)
                for (int k = 0; k < HS; k++) {
                    int hf_col = part * C + h * HS + k, row = h * 3 * HS + part * HS + k;
                    for (int i = 0; i < C; i++) qkvw[(size_t)row * C + i] = tmp[(size_t)i * 3 * C + hf_col];
                    qkvb[row] = bias_in[hf_col];
                }
        for (int k = 0; k < 3; k++) {
            int in = hf_linear_in(c, k), out = hf_linear_in(c, k + 1);
            safetensors_read_floats(st, HF("transformer.h.%d.%s", l, hf_linears[k].w), tmp, (size_t)in * out);
            float* w = host + m->offsets[hf_linears[k].which_w] + (size_t)l * in * out;
            for (int o = 0; o < out; o++)
                for (int i = 0; i < in; i++) w[(size_t)o * in + i] = tmp[(size_t)i * out + o];
            safetensors_read_floats(st, HF("transformer.h.%d.%s", l, hf_linears[k].b), host + m->offsets[hf_linears[k].which_b] + (size_t)l * out, out);
        }
    }
    #undef HF
    free(tmp);
}

static void gpt_load_hf(GPT* m, const SafeTensors* st) {
    if (m->tp > 1) die("loading Hugging Face weights with tensor parallelism is not supported yet");
    float* host = (float*)xmalloc(m->num_params * sizeof(float));
    hf_read_params(m, st, "", host);
    gpt_set_params(m, host);
    free(host);
}

// ----------------------------------------------------------------------------
// Text generation with a KV cache (Megatron's text_generation/generation.py with its
// inference_params): the prompt goes through the model once, in chunks of up to the activations'
// B x T rows, leaving every layer's q, k, v in m->kv_cache; then each new token is one row
// through the model that attends to the cache. With tensor parallelism each rank caches its own
// heads, the last row's vocabulary shards are gathered, and every rank draws the same token.

// T tokens of one sequence at positions [pos, pos + T) through the model, joining the cache.
static void gpt_forward_cached(GPT* m, const int* tokens, int pos, int T) {
    gpt_upload_tokens(m, tokens, T);
    gpt_forward_at(m, 1, T, pos, 0.0f, 0.0f);
}

// Row r's logits of the whole (padded) vocabulary in fp32 on the host, from every rank's shard;
// `scratch` holds Vr values of the run's dtype.
static void gpt_logits_row(GPT* m, int r, float* logits, void* scratch) {
    size_t es = dtype_size(m->dev->dtype);
    dev_download(m->dev, scratch, at(m, m->acts.logits, (size_t)r * m->Vr), (size_t)m->Vr * es);
    dtype_to_floats(logits + (size_t)m->tp_rank * m->Vr, scratch, m->Vr, m->dev->dtype);
    all_gather(m->par, parallel_host_device(), GROUP_TP, logits, m->Vr, DT_F32);
}

// Continues tokens[0, prompt_len) by up to max_new tokens (tokens has room for prompt_len +
// max_new) and returns the final length. It stops after producing `eod`, or when the sequence
// fills the position table (Megatron refuses such requests instead). logprobs (NULL: not wanted)
// gets log p(tokens[i+1] | tokens[0..i]) for i < length - 1, of the model's own distribution
// (Megatron's output log-probabilities). A prompt of 1 to maxT tokens inside the vocabulary is
// the caller's to check. Every tensor-parallel rank calls it with the same arguments and rng state.
static int gpt_generate(GPT* m, int* tokens, int prompt_len, int max_new, const SamplingParams* sp, MT19937* rng, int eod,
                        float* logprobs) {
    const GPTConfig* c = &m->cfg;
    if (prompt_len < 1 || prompt_len > c->maxT) die("generation: a prompt of %d tokens; the model takes 1 to %d", prompt_len, c->maxT);
    for (int i = 0; i < prompt_len; i++)
        if (tokens[i] < 0 || tokens[i] >= c->V) die("generation: prompt token %d is %d, outside the vocabulary of %d", i, tokens[i], c->V);
    if (max_new < 0) die("generation: %d tokens to generate", max_new);
    sampling_check(sp, c->V);
    size_t es = dtype_size(m->dev->dtype);
    if (!m->kv_cache) m->kv_cache = dev_malloc(m->dev, (size_t)c->L * c->maxT * 3 * m->Cr * es);
    float* logits = (float*)xmalloc((size_t)c->Vp * sizeof(float));
    void* scratch = xmalloc((size_t)m->Vr * es);
    int chunk = m->B * m->T, n = 0;
    for (int pos = 0; pos < prompt_len; pos += n) {
        n = prompt_len - pos < chunk ? prompt_len - pos : chunk;
        gpt_forward_cached(m, tokens + pos, pos, n);
        for (int r = 0; logprobs && r < n && pos + r + 1 < prompt_len; r++) {
            gpt_logits_row(m, r, logits, scratch);
            logprobs[pos + r] = (float)token_logprob(logits, c->V, tokens[pos + r + 1]);
        }
    }
    gpt_logits_row(m, n - 1, logits, scratch);
    int len = prompt_len, end = prompt_len + max_new < c->maxT ? prompt_len + max_new : c->maxT;
    while (len < end) {
        int next = sample_token(logits, c->V, sp, rng);
        if (logprobs) logprobs[len - 1] = (float)token_logprob(logits, c->V, next);
        tokens[len++] = next;
        if (next == eod || len == end) break;
        gpt_forward_cached(m, tokens + len - 1, len - 1, 1);
        gpt_logits_row(m, 0, logits, scratch);
    }
    free(logits);
    free(scratch);
    return len;
}

static void gpt_free(GPT* m) {
    const Device* d = m->dev;
    dev_free(d, m->params);
    dev_free(d, m->grads);
    dev_free(d, m->adam_m);
    dev_free(d, m->adam_v);
    if (m->master) dev_free(d, m->master);
    if (m->acts.base) dev_free(d, m->acts.base);
    free(m->acts.layer);
    if (m->kv_cache) dev_free(d, m->kv_cache);
}

// Hugging Face GPT-2 files from the hub (saved from GPT2Model) name tensors without the
// "transformer." prefix that GPT2LMHeadModel.save_pretrained writes: give them the prefix.
static void hf_add_prefix(SafeTensors* st) {
    if (safetensors_find(st, "transformer.wte.weight") || !safetensors_find(st, "wte.weight")) return;
    for (int i = 0; i < st->n; i++) {
        char name[256];
        if ((size_t)snprintf(name, sizeof(name), "transformer.%s", st->tensors[i].name) >= sizeof(name))
            die("%s: tensor name too long: %.64s...", st->path, st->tensors[i].name);
        memcpy(st->tensors[i].name, name, sizeof(name));
    }
}

// A float tensor of exactly this shape (cols 0: a vector), or a one-line error.
static void st_check_shape(const SafeTensors* st, const char* name, int64_t rows, int64_t cols, const char* source) {
    const STTensor* t = st_need(st, name);
    STTensor want;
    char got[128], expected[128];
    want.ndim = cols ? 2 : 1;
    want.shape[0] = rows;
    want.shape[1] = cols;
    int same = t->ndim == want.ndim && t->shape[0] == rows && (!cols || t->shape[1] == cols);
    if (!same) die("%s: tensor '%s' has shape %s but %s gives %s", st->path, name, st_shape_str(t, got, sizeof(got)), source,
                   st_shape_str(&want, expected, sizeof(expected)));
    if (strcmp(t->dtype, "F32") && strcmp(t->dtype, "BF16") && strcmp(t->dtype, "F16"))
        die("%s: tensor '%s' has dtype %s, expected F32, BF16 or F16", st->path, name, t->dtype);
}

static void hf_check_shapes(const GPTConfig* c, const SafeTensors* st) {
    int64_t V = c->V, C = c->C, F = c->F;
    char name[256];
    st_check_shape(st, "transformer.wte.weight", V, C, "config.json");
    st_check_shape(st, "transformer.wpe.weight", c->maxT, C, "config.json");
    st_check_shape(st, "transformer.ln_f.weight", C, 0, "config.json");
    st_check_shape(st, "transformer.ln_f.bias", C, 0, "config.json");
    struct { const char* name; int64_t rows, cols; } layer[] = {
        {"ln_1.weight", C, 0}, {"ln_1.bias", C, 0}, {"ln_2.weight", C, 0}, {"ln_2.bias", C, 0},
        {"attn.c_attn.weight", C, 3 * C}, {"attn.c_attn.bias", 3 * C, 0}, {"attn.c_proj.weight", C, C}, {"attn.c_proj.bias", C, 0},
        {"mlp.c_fc.weight", C, F}, {"mlp.c_fc.bias", F, 0}, {"mlp.c_proj.weight", F, C}, {"mlp.c_proj.bias", C, 0},
    };
    for (int l = 0; l < c->L; l++)
        for (size_t k = 0; k < sizeof(layer) / sizeof(layer[0]); k++) {
            snprintf(name, sizeof(name), "transformer.h.%d.%s", l, layer[k].name);
            st_check_shape(st, name, layer[k].rows, layer[k].cols, "config.json");
        }
}

// Our layout -> HF GPT-2 tensors in fp32 (the inverse of hf_read_params), vocabulary unpadded.
static void hf_write_params(const GPT* m, const float* host, SafeTensorsWriter* w) {
    const GPTConfig* c = &m->cfg;
    int C = c->C, F = c->F, HS = c->HS;
    float* tmp = (float*)xmalloc(((size_t)C * (3 * C > F ? 3 * C : F) + 3 * C) * sizeof(float));
    char name[256];
    #define HF_ADD(data, rows, cols, fmt, ...) do { \
        int64_t shape[2] = {rows, cols}; \
        snprintf(name, sizeof(name), fmt, ##__VA_ARGS__); \
        st_writer_add(w, name, "F32", (cols) != 0 ? 2 : 1, shape, data); } while (0)
    HF_ADD(host + m->offsets[WTE], c->V, C, "transformer.wte.weight");
    HF_ADD(host + m->offsets[WPE], c->maxT, C, "transformer.wpe.weight");
    HF_ADD(host + m->offsets[LNFW], C, 0, "transformer.ln_f.weight");
    HF_ADD(host + m->offsets[LNFB], C, 0, "transformer.ln_f.bias");
    for (int l = 0; l < c->L; l++) {
        HF_ADD(host + m->offsets[LN1W] + l * C, C, 0, "transformer.h.%d.ln_1.weight", l);
        HF_ADD(host + m->offsets[LN1B] + l * C, C, 0, "transformer.h.%d.ln_1.bias", l);
        HF_ADD(host + m->offsets[LN2W] + l * C, C, 0, "transformer.h.%d.ln_2.weight", l);
        HF_ADD(host + m->offsets[LN2B] + l * C, C, 0, "transformer.h.%d.ln_2.bias", l);
        const float* qkvw = host + m->offsets[QKVW] + (size_t)l * 3 * C * C;
        const float* qkvb = host + m->offsets[QKVB] + (size_t)l * 3 * C;
        float* bias_out = tmp + (size_t)C * 3 * C;
        for (int part = 0; part < 3; part++)
            for (int h = 0; h < c->NH; h++)
                for (int k = 0; k < HS; k++) {
                    int hf_col = part * C + h * HS + k, row = h * 3 * HS + part * HS + k;
                    for (int i = 0; i < C; i++) tmp[(size_t)i * 3 * C + hf_col] = qkvw[(size_t)row * C + i];
                    bias_out[hf_col] = qkvb[row];
                }
        HF_ADD(tmp, C, 3 * C, "transformer.h.%d.attn.c_attn.weight", l);
        HF_ADD(bias_out, 3 * C, 0, "transformer.h.%d.attn.c_attn.bias", l);
        for (int k = 0; k < 3; k++) {
            int in = hf_linear_in(c, k), out = hf_linear_in(c, k + 1);
            const float* wt = host + m->offsets[hf_linears[k].which_w] + (size_t)l * in * out;
            for (int o = 0; o < out; o++)
                for (int i = 0; i < in; i++) tmp[(size_t)i * out + o] = wt[(size_t)o * in + i];
            HF_ADD(tmp, in, out, "transformer.h.%d.%s", l, hf_linears[k].w);
            HF_ADD(host + m->offsets[hf_linears[k].which_b] + (size_t)l * out, out, 0, "transformer.h.%d.%s", l, hf_linears[k].b);
        }
    }
    #undef HF_ADD
    free(tmp);
}

// ----------------------------------------------------------------------------
// Checkpoints, in Megatron-LM's layout (checkpointing.py) with safetensors files:
//   DIR/iter_0000100/model.safetensors  parameters in the run's dtype under Megatron's names;
//       metadata: iteration, consumed samples, vocabulary, and every flag ("--hidden-size": "768")
//   DIR/iter_0000100/optim.safetensors  fp32 master weights (bf16/fp16 runs), Adam's exp_avg and
//       exp_avg_sq; metadata: Adam's step, the loss scaler, the learning-rate schedule's position
//   DIR/latest_checkpointed_iteration.txt  written last
// Dropout masks and the data order are pure functions of (seed, iteration, micro-batch) and of
// the consumed samples, so this is the whole state: a resumed run repeats the uninterrupted
// one bit for bit (same flags, device, dtype and thread count).

typedef struct {
    int64_t iteration, consumed_train, consumed_valid;
    int64_t scheduler_samples;  // the learning-rate schedule's position (lr_samples in main)
    int adam_step;
    LossScaler scaler;
    LRSchedule schedule;   // the learning-rate schedule trained with (has_schedule: a checkpoint holds one)
    int has_schedule;
    char schedule_style[32];
} TrainState;

// Checkpoints hold the full model in the single-device layout, whatever parallel layout saves
// or loads them: a save gathers every rank's shards, a load gives each rank its own part.

// The single-device layout of m's model (what the files and the HF mapping index).
static GPT gpt_full_layout(const GPT* m) {
    GPT f;
    memset(&f, 0, sizeof(f));
    f.cfg = m->cfg;
    f.dev = m->dev;
    param_sizes(&m->cfg, 1, f.sizes);
    for (int i = 0; i < NUM_PARAMS; i++) {
        f.offsets[i] = f.num_params;
        f.num_params += f.sizes[i];
    }
    return f;
}

// The full fp32 tensor of an optimizer state (`local`: this rank's optimizer range on the
// device), on every rank: gathered over the data-parallel group (distributed optimizer),
// then over the tensor-parallel shards.
static float* gpt_gather_full_state(GPT* m, const float* local) {
    size_t n = m->num_params, n_opt = m->opt_end - m->opt_begin;
    float* shard = (float*)xcalloc(m->padded_params, sizeof(float));
    dev_download(m->dev, shard + m->opt_begin, local, n_opt * sizeof(float));
    if (m->distributed_optimizer) all_gather(m->par, parallel_host_device(), GROUP_DP, shard, n_opt, DT_F32);
    float* shards = (float*)xmalloc((size_t)m->tp * n * sizeof(float));
    memcpy(shards + (size_t)m->tp_rank * n, shard, n * sizeof(float));
    all_gather(m->par, parallel_host_device(), GROUP_TP, shards, n, DT_F32);
    float* full = (float*)xmalloc(gpt_full_layout(m).num_params * sizeof(float));
    for (int r = 0; r < m->tp; r++) tp_shard_copy(&m->cfg, m->tp, r, full, shards + (size_t)r * n, 0);
    free(shard);
    free(shards);
    return full;
}

// This rank's optimizer range of a full fp32 state tensor, uploaded into `local`.
static void gpt_scatter_full_state(GPT* m, float* full, float* local) {
    float* shard = (float*)xcalloc(m->padded_params, sizeof(float));
    tp_shard_copy(&m->cfg, m->tp, m->tp_rank, full, shard, 1);
    dev_upload(m->dev, local, shard + m->opt_begin, (m->opt_end - m->opt_begin) * sizeof(float));
    free(shard);
}

// One checkpoint tensor: a Megatron name and its slice of our flat parameter layout.
typedef struct {
    char name[96];
    size_t offset;
    int ndim;
    int64_t shape[2];
    int vocab_rows;  // the word embedding: the real vocabulary's rows (the rest is padding); else 0
} CkptTensor;

// Megatron's GPTModel state-dict names; the per-layer ones follow "language_model.encoder.layers.N.".
static const char* const megatron_names[NUM_PARAMS] = {
    "language_model.embedding.word_embeddings.weight", "language_model.embedding.position_embeddings.weight",
    "input_layernorm.weight", "input_layernorm.bias", "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
    "self_attention.dense.weight", "self_attention.dense.bias", "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
    "language_model.encoder.final_layernorm.weight", "language_model.encoder.final_layernorm.bias"};

// The checkpoint's tensors, one per parameter and layer (4 + 12 L of them); free the result.
static CkptTensor* ckpt_tensors(const GPT* m, int* count) {
    const GPTConfig* c = &m->cfg;
    CkptTensor* t = (CkptTensor*)xcalloc(4 + 12 * (size_t)c->L, sizeof(CkptTensor));
    int n = 0;
    for (int i = 0; i < NUM_PARAMS; i++) {
        int per_layer = i >= LN1W && i <= FCPROJB, layers = per_layer ? c->L : 1;
        int is_matrix = i == WTE || i == WPE || i == QKVW || i == ATTPROJW || i == FCW || i == FCPROJW;
        size_t size = m->sizes[i] / layers;
        int64_t cols = i == FCPROJW ? c->F : c->C;
        for (int l = 0; l < layers; l++, n++) {
            if (per_layer) snprintf(t[n].name, sizeof(t[n].name), "language_model.encoder.layers.%d.%s", l, megatron_names[i]);
            else snprintf(t[n].name, sizeof(t[n].name), "%s", megatron_names[i]);
            t[n].offset = m->offsets[i] + l * size;
            t[n].ndim = is_matrix ? 2 : 1;
            t[n].shape[0] = is_matrix ? (int64_t)size / cols : (int64_t)size;
            t[n].shape[1] = cols;
            t[n].vocab_rows = i == WTE ? c->V : 0;
        }
    }
    *count = n;
    return t;
}

// Every rank calls it (the gathers are collectives); world rank 0 writes, into iter_N.tmp-<host>-<pid>/,
// which then takes iter_N's place (publish_dir) before the tracker names it: no file of a
// checkpoint the tracker may name is ever written to.
static void checkpoint_save(GPT* m, const TrainState* s, const char* dir, const ArgSpec* specs, int n_specs) {
    const Device* d = m->dev;
    GPT full = gpt_full_layout(m);
    size_t n = full.num_params, es = dtype_size(d->dtype);
    float* values = gpt_gather_full_params(m);
    float* states[3] = {m->master ? gpt_gather_full_state(m, m->master) : NULL, gpt_gather_full_state(m, m->adam_m),
                        gpt_gather_full_state(m, m->adam_v)};
    if (m->par->rank[GROUP_WORLD] != 0) {
        free(values);
        for (int p = 0; p < 3; p++) free(states[p]);
        return;
    }
    char iter_dir[1100], staged[1300], path[1400];
    checkpoint_iter_dir(iter_dir, sizeof(iter_dir), dir, s->iteration);
    make_dirs(dir);
    remove_stale_temporaries(dir);
    char suffix[200];
    staging_suffix(suffix, sizeof(suffix));
    snprintf(staged, sizeof(staged), "%s%s", iter_dir, suffix);
    make_dirs(staged);
    int count;
    CkptTensor* t = ckpt_tensors(&full, &count);
    SafeTensorsWriter w;

    char* params = (char*)xmalloc(n * es);
    floats_to_dtype(params, values, n, d->dtype);  // exact: the values came from this dtype
    free(values);
    snprintf(path, sizeof(path), "%s/model.safetensors", staged);
    st_writer_begin(&w, path);
    for (int k = 0; k < count; k++) st_writer_add(&w, t[k].name, st_dtype_of(d->dtype), t[k].ndim, t[k].shape, params + t[k].offset * es);
    free(params);
    st_writer_meta(&w, "format", "megatron.c GPT checkpoint");
    st_writer_meta(&w, "dtype", st_dtype_of(d->dtype));
    st_writer_meta_int(&w, "iteration", s->iteration);
    st_writer_meta_int(&w, "consumed_train_samples", s->consumed_train);
    st_writer_meta_int(&w, "consumed_valid_samples", s->consumed_valid);
    st_writer_meta_int(&w, "vocab_size", m->cfg.V);
    st_writer_meta_int(&w, "padded_vocab_size", m->cfg.Vp);
    args_write_meta(&w, specs, n_specs);
    st_writer_finish(&w);

    const char* prefixes[3] = {"fp32_param.", "exp_avg.", "exp_avg_sq."};
    snprintf(path, sizeof(path), "%s/optim.safetensors", staged);
    st_writer_begin(&w, path);
    for (int p = 0; p < 3; p++) {
        if (!states[p]) continue;
        for (int k = 0; k < count; k++) {
            char name[160];
            snprintf(name, sizeof(name), "%s%s", prefixes[p], t[k].name);
            st_writer_add(&w, name, "F32", t[k].ndim, t[k].shape, states[p] + t[k].offset);
        }
        free(states[p]);
    }
    st_writer_meta_int(&w, "iteration", s->iteration);
    st_writer_meta_int(&w, "step", s->adam_step);
    st_writer_meta_int(&w, "scheduler_samples", s->scheduler_samples);
    st_writer_meta_double(&w, "loss_scale", s->scaler.scale);
    st_writer_meta_int(&w, "loss_scale_growth_tracker", s->scaler.growth_tracker);
    st_writer_meta_int(&w, "loss_scale_hysteresis_tracker", s->scaler.hysteresis_tracker);
    st_writer_meta_double(&w, "lr_max", s->schedule.max_lr);
    st_writer_meta_double(&w, "lr_min", s->schedule.min_lr);
    st_writer_meta_int(&w, "lr_warmup_samples", s->schedule.warmup_samples);
    st_writer_meta_int(&w, "lr_decay_samples", s->schedule.decay_samples);
    st_writer_meta(&w, "lr_decay_style", s->schedule.style);
    st_writer_finish(&w);
    free(t);

    publish_dir(staged, iter_dir, checkpoint_latest(dir) == s->iteration);
    checkpoint_set_latest(dir, s->iteration);
    printf("saved checkpoint at iteration %lld to %s\n", (long long)s->iteration, iter_dir);
    fflush(stdout);
}

// What --load points at: one of our checkpoints, or a Hugging Face GPT-2 directory
// (config.json + model.safetensors), and the model it holds.
typedef struct {
    int is_hf;
    int64_t iteration;
    char dir[1100];  // the iteration directory, or the HF directory
    GPTConfig cfg;   // for HF, Vp = V
} CkptSource;

static int meta_int(const SafeTensors* st, const char* key) {
    int64_t v = safetensors_meta_int(st, key);
    if (v < 0 || v > INT32_MAX) die("%s: metadata \"%s\" is %lld, out of range", st->path, key, (long long)v);
    return (int)v;
}

static void hf_config_read(CkptSource* src, const char* dir) {
    char path[1200];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    JsonObject o;
    json_object_read(&o, path);
    const char* type = json_object_get(&o, "model_type");
    if (type && strcmp(type, "\"gpt2\"")) die("%s: model_type is %.40s; only GPT-2 (\"gpt2\") loads into train_gpt", path, type);
    const char* act = json_object_get(&o, "activation_function");
    if (act && strcmp(act, "\"gelu_new\"") && strcmp(act, "\"gelu_pytorch_tanh\""))
        die("%s: activation_function is %.40s; train_gpt's MLP uses the tanh GELU (\"gelu_new\")", path, act);
    const char* eps = json_object_get(&o, "layer_norm_epsilon");
    if (eps && fabs(atof(eps) - LAYERNORM_EPS) > 1e-12) die("%s: layer_norm_epsilon is %s; train_gpt's LayerNorm uses %g", path, eps, LAYERNORM_EPS);
    const char* tied = json_object_get(&o, "tie_word_embeddings");
    if (tied && strcmp(tied, "true")) die("%s: tie_word_embeddings is %s; train_gpt ties the LM head to the embedding", path, tied);
    GPTConfig* c = &src->cfg;
    int64_t v[6] = {json_object_int(&o, "n_layer", -1, path), json_object_int(&o, "n_embd", -1, path),
                    json_object_int(&o, "n_head", -1, path), json_object_int(&o, "n_positions", json_object_int(&o, "n_ctx", -1, path), path),
                    json_object_int(&o, "vocab_size", -1, path), 0};
    const char* keys[5] = {"n_layer", "n_embd", "n_head", "n_positions", "vocab_size"};
    for (int k = 0; k < 5; k++)
        if (v[k] <= 0 || v[k] > INT32_MAX) die("%s: \"%s\" is missing or not a positive integer", path, keys[k]);
    v[5] = json_object_int(&o, "n_inner", 4 * v[1], path);
    if (v[5] <= 0 || v[5] > INT32_MAX) die("%s: \"n_inner\" is not a positive integer", path);
    if (v[1] % v[2]) die("%s: n_head %lld does not divide n_embd %lld", path, (long long)v[2], (long long)v[1]);
    c->L = (int)v[0]; c->C = (int)v[1]; c->NH = (int)v[2]; c->maxT = (int)v[3]; c->V = c->Vp = (int)v[4]; c->F = (int)v[5];
    c->HS = c->C / c->NH;
    json_object_free(&o);
}

// Whether two spellings name one directory: the same file where both exist, else the same
// path once "./" prefixes and trailing slashes are dropped.
static int same_dir(const char* a, const char* b) {
    struct stat sa, sb;
    if (stat(a, &sa) == 0 && stat(b, &sb) == 0) return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
    while (!strncmp(a, "./", 2)) a += 2;
    while (!strncmp(b, "./", 2)) b += 2;
    size_t na = strlen(a), nb = strlen(b);
    while (na > 1 && a[na - 1] == '/') na--;
    while (nb > 1 && b[nb - 1] == '/') nb--;
    return na == nb && !strncmp(a, b, na);
}

// Finds the checkpoint --load names. Returns 0 when there is none yet and --load is also
// --save (the usual restart loop starts from scratch then, as Megatron does).
static int checkpoint_find(const char* load, const char* save, CkptSource* src) {
    memset(src, 0, sizeof(*src));
    char path[1200];
    snprintf(path, sizeof(path), "%s/config.json", load);
    if (access(path, F_OK) == 0) {
        src->is_hf = 1;
        snprintf(src->dir, sizeof(src->dir), "%s", load);
        hf_config_read(src, load);
        return 1;
    }
    src->iteration = checkpoint_latest(load);
    if (src->iteration < 0) {
        if (save && same_dir(save, load)) {
            printf("no checkpoint in %s yet: starting from scratch\n", load);
            return 0;
        }
        die("--load %s: no checkpoint there (no %s, nor the config.json of a Hugging Face model)", load, CHECKPOINT_TRACKER);
    }
    checkpoint_iter_dir(src->dir, sizeof(src->dir), load, src->iteration);
    snprintf(path, sizeof(path), "%s/model.safetensors", src->dir);
    SafeTensors st;
    safetensors_open(&st, path);
    GPTConfig* c = &src->cfg;
    c->L = meta_int(&st, "--num-layers");
    c->C = meta_int(&st, "--hidden-size");
    c->NH = meta_int(&st, "--num-attention-heads");
    c->F = meta_int(&st, "--ffn-hidden-size");
    c->maxT = meta_int(&st, "--max-position-embeddings");
    c->V = meta_int(&st, "vocab_size");
    c->Vp = meta_int(&st, "padded_vocab_size");
    if (!c->NH || c->C % c->NH) die("%s: metadata --num-attention-heads %d does not divide --hidden-size %d", path, c->NH, c->C);
    c->HS = c->C / c->NH;
    if (safetensors_meta_int(&st, "iteration") != src->iteration)
        die("%s: holds iteration %lld but %s names %lld", path, (long long)safetensors_meta_int(&st, "iteration"), CHECKPOINT_TRACKER, (long long)src->iteration);
    safetensors_close(&st);
    return 1;
}

// Model flags not given on the command line come from the checkpoint; given ones must match it.
// vocab_size is NULL when a tokenizer decides the vocabulary (checked in checkpoint_load).
static void checkpoint_apply_config(const CkptSource* src, Args* a, int* vocab_size) {
    const GPTConfig* c = &src->cfg;
    struct { const char* flag; int* arg; int value; } shape[] = {
        {"--num-layers", &a->num_layers, c->L}, {"--hidden-size", &a->hidden_size, c->C},
        {"--num-attention-heads", &a->num_attention_heads, c->NH}, {"--ffn-hidden-size", &a->ffn_hidden_size, c->F},
        {"--max-position-embeddings", &a->max_position_embeddings, c->maxT}, {"--vocab-size", vocab_size, c->V},
    };
    for (size_t k = 0; k < sizeof(shape) / sizeof(shape[0]); k++) {
        if (!shape[k].arg) continue;
        if (*shape[k].arg == 0) *shape[k].arg = shape[k].value;
        else if (*shape[k].arg != shape[k].value)
            die("--load %s holds a model with %s %d, but this run has %s %d", src->dir, shape[k].flag, shape[k].value, shape[k].flag, *shape[k].arg);
    }
}

// Reads a checkpoint tensor of exactly this dtype and shape as floats. The word embedding's rows
// may be padded differently (another tensor-parallel size or --make-vocab-size-divisible-by): its
// real rows are read, the padding rows set to 0 (they take no part in the loss: no token selects
// them and the loss skips their logits).
static void ckpt_read(const SafeTensors* st, const CkptTensor* t, const char* prefix, const char* dtype, float* dst) {
    char name[160], got[128], want[128];
    snprintf(name, sizeof(name), "%s%s", prefix, t->name);
    const STTensor* f = st_need(st, name);
    STTensor expected;
    expected.ndim = t->ndim;
    memcpy(expected.shape, t->shape, sizeof(t->shape));
    int vocab = t->vocab_rows;
    int repad = vocab > 0 && f->ndim == 2 && t->ndim == 2 && f->shape[1] == t->shape[1] && f->shape[0] >= vocab && t->shape[0] >= vocab;
    if (!repad && (f->ndim != t->ndim || f->shape[0] != t->shape[0] || (t->ndim == 2 && f->shape[1] != t->shape[1])))
        die("%s: tensor '%s' has shape %s, the model needs %s", st->path, name, st_shape_str(f, got, sizeof(got)), st_shape_str(&expected, want, sizeof(want)));
    if (strcmp(f->dtype, dtype)) die("%s: tensor '%s' has dtype %s, the checkpoint's dtype is %s", st->path, name, f->dtype, dtype);
    if (!repad || f->shape[0] == t->shape[0]) {
        safetensors_read_floats(st, name, dst, st_numel(f));
        return;
    }
    float* rows = (float*)xmalloc(st_numel(f) * sizeof(float));
    safetensors_read_floats(st, name, rows, st_numel(f));
    size_t kept = (size_t)vocab * t->shape[1];
    memcpy(dst, rows, kept * sizeof(float));
    memset(dst + kept, 0, ((size_t)t->shape[0] * t->shape[1] - kept) * sizeof(float));
    free(rows);
}

// Loads what --load holds into the model and, unless --finetune / --no-load-optim say
// otherwise, the training state.
static void checkpoint_load(GPT* m, const CkptSource* src, const CheckpointArgs* ca, TrainState* s) {
    const GPTConfig* c = &m->cfg;
    char path[1200];
    SafeTensors st;
    GPT full = gpt_full_layout(m);
    float* host = (float*)xmalloc(full.num_params * sizeof(float));
    snprintf(path, sizeof(path), "%s/model.safetensors", src->dir);
    if (c->V != src->cfg.V)
        die("--load %s holds a vocabulary of %d, this run has %d: the tokenizer or --vocab-size differs", src->dir, src->cfg.V, c->V);
    if (!src->is_hf && c->Vp != src->cfg.Vp)
        printf("note: %s pads the vocabulary to %d rows, this run to %d (--tensor-model-parallel-size or --make-vocab-size-divisible-by): "
               "the padding rows start at 0\n", src->dir, src->cfg.Vp, c->Vp);
    safetensors_open(&st, path);
    if (src->is_hf) {
        hf_add_prefix(&st);
        hf_check_shapes(c, &st);
        hf_read_params(&full, &st, "", host);
        gpt_set_full_params(m, host);
        safetensors_close(&st);
        free(host);
        printf("loaded Hugging Face GPT-2 weights from %s (iteration 0, fresh optimizer)\n", src->dir);
        return;
    }
    const char* dtype = safetensors_meta_need(&st, "dtype");
    if (!st_dtype_size(dtype)) die("%s: metadata dtype '%.16s' is not a safetensors dtype", path, dtype);
    int same_dtype = strcmp(dtype, st_dtype_of(m->dev->dtype)) == 0;
    int count;
    CkptTensor* t = ckpt_tensors(&full, &count);
    for (int k = 0; k < count; k++) ckpt_read(&st, &t[k], "", dtype, host + t[k].offset);
    gpt_set_full_params(m, host);
    if (!ca->finetune) {
        s->iteration = src->iteration;
        s->consumed_train = safetensors_meta_int(&st, "consumed_train_samples");
        s->consumed_valid = safetensors_meta_int(&st, "consumed_valid_samples");
    }
    safetensors_close(&st);
    if (!ca->finetune && !ca->no_load_optim) {
        snprintf(path, sizeof(path), "%s/optim.safetensors", src->dir);
        safetensors_open(&st, path);
        if (safetensors_meta_int(&st, "iteration") != src->iteration)
            die("%s: holds iteration %lld but model.safetensors holds %lld", path, (long long)safetensors_meta_int(&st, "iteration"), (long long)src->iteration);
        char first[160];
        snprintf(first, sizeof(first), "fp32_param.%s", t[0].name);
        if (safetensors_find(&st, first)) {  // bf16/fp16 runs: the fp32 master weights
            for (int k = 0; k < count; k++) ckpt_read(&st, &t[k], "fp32_param.", "F32", host + t[k].offset);
            if (m->master) gpt_scatter_full_state(m, host, m->master);
            else gpt_set_full_params(m, host);  // an fp32 run continues from the master weights
        }
        for (int k = 0; k < count; k++) ckpt_read(&st, &t[k], "exp_avg.", "F32", host + t[k].offset);
        gpt_scatter_full_state(m, host, m->adam_m);
        for (int k = 0; k < count; k++) ckpt_read(&st, &t[k], "exp_avg_sq.", "F32", host + t[k].offset);
        gpt_scatter_full_state(m, host, m->adam_v);
        s->adam_step = meta_int(&st, "step");
        s->scheduler_samples = safetensors_meta_int(&st, "scheduler_samples");
        if (safetensors_meta(&st, "lr_decay_samples")) {  // (checkpoints before the schedule was saved have none)
            s->has_schedule = 1;
            s->schedule.max_lr = safetensors_meta_double(&st, "lr_max");
            s->schedule.min_lr = safetensors_meta_double(&st, "lr_min");
            s->schedule.warmup_samples = safetensors_meta_int(&st, "lr_warmup_samples");
            s->schedule.decay_samples = safetensors_meta_int(&st, "lr_decay_samples");
            snprintf(s->schedule_style, sizeof(s->schedule_style), "%s", safetensors_meta_need(&st, "lr_decay_style"));
            s->schedule.style = s->schedule_style;
        }
        if (same_dtype) {  // the loss scale belongs to the dtype it was found for
            s->scaler.scale = safetensors_meta_double(&st, "loss_scale");
            s->scaler.growth_tracker = meta_int(&st, "loss_scale_growth_tracker");
            // Megatron's hysteresis tracker keeps counting down past 0 while overflows continue
            int64_t hysteresis = safetensors_meta_int(&st, "loss_scale_hysteresis_tracker");
            if (hysteresis < INT32_MIN || hysteresis > INT32_MAX) die("%s: metadata \"loss_scale_hysteresis_tracker\" is %lld, out of range", st.path, (long long)hysteresis);
            s->scaler.hysteresis_tracker = (int)hysteresis;
        }
        safetensors_close(&st);
    }
    free(t);
    free(host);
    if (!same_dtype && !ca->finetune) printf("note: %s was saved in %s and this run computes in %s: the resumed run is not bit-identical\n", src->dir, dtype, st_dtype_of(m->dev->dtype));
    printf("loaded checkpoint from %s at iteration %lld%s\n", src->dir, (long long)src->iteration,
           ca->finetune ? " (weights only: iteration 0)" : ca->no_load_optim ? " (--no-load-optim: fresh optimizer and schedule)" : "");
}

// --export-hf DIR: the --load checkpoint as a Hugging Face GPT-2 directory (config.json and
// model.safetensors in GPT2LMHeadModel's names, Conv1D [in, out] weights, fp32).
static void export_hf(const CkptSource* src, const CheckpointArgs* ca) {
    Device cpu;
    device_init(&cpu, "cpu", DT_F32);
    GPT m;
    gpt_build(&m, &src->cfg, &cpu);
    TrainState unused;
    memset(&unused, 0, sizeof(unused));
    CheckpointArgs weights_only = *ca;
    weights_only.finetune = 1;
    checkpoint_load(&m, src, &weights_only, &unused);
    const GPTConfig* c = &m.cfg;
    char path[1200], config[1024];
    make_dirs(ca->export_hf);
    SafeTensorsWriter w;
    snprintf(path, sizeof(path), "%s/model.safetensors", ca->export_hf);
    st_writer_begin(&w, path);
    st_writer_meta(&w, "format", "pt");
    hf_write_params(&m, (const float*)m.params, &w);
    st_writer_finish(&w);
    int n = snprintf(config, sizeof(config),
                     "{\n  \"architectures\": [\"GPT2LMHeadModel\"],\n  \"model_type\": \"gpt2\",\n  \"vocab_size\": %d,\n"
                     "  \"n_positions\": %d,\n  \"n_embd\": %d,\n  \"n_layer\": %d,\n  \"n_head\": %d,\n  \"n_inner\": %d,\n"
                     "  \"activation_function\": \"gelu_new\",\n  \"layer_norm_epsilon\": 1e-05,\n  \"tie_word_embeddings\": true,\n"
                     "  \"bos_token_id\": %d,\n  \"eos_token_id\": %d,\n  \"torch_dtype\": \"float32\"\n}\n",
                     c->V, c->maxT, c->C, c->L, c->NH, c->F, c->V - 1, c->V - 1);
    snprintf(path, sizeof(path), "%s/config.json", ca->export_hf);
    write_file_atomic(path, config, n);
    printf("exported %s as Hugging Face GPT-2 to %s\n", src->dir, ca->export_hf);
    gpt_free(&m);
    device_free(&cpu);
}

// ----------------------------------------------------------------------------
// Start-up that training and the evaluation tasks share.

// The ranks (tensor-parallel fastest); only world rank 0 prints.
static void start_ranks(Args* args, Parallel* par) {
    parallel_init(par, args->tensor_model_parallel_size, args->collective_timeout);
    if (par->rank[GROUP_WORLD] != 0 && !freopen("/dev/null", "w", stdout)) die("cannot silence stdout");  // rank 0 prints the log
    args->data_parallel_size = par->size[GROUP_DP];
}

// This rank's device, once the flags are checked.
static void start_device(const Args* args, Parallel* par, Device* dev, int argc, char** argv) {
    parallel_select_gpu(par);
    device_init(dev, args->device, args->fp16 ? DT_F16 : args->fp32 ? DT_F32 : DT_BF16);
    dev->attention_fused = !strcmp(args->attention_backend, "fused");
#ifdef __CUDACC__
    matmul_autotune_enabled = args->matmul_autotune;
#endif
    if (dev->attention_fused && (!dev->is_gpu || dev->dtype == DT_F32))
        arg_error("--attention-backend fused needs a GPU and bf16 or fp16 (this run: %s, %s)", dev->name, dtype_name(dev->dtype));
    parallel_init_nccl(par, dev, args->debug_force_nccl);
    parallel_check_same_flags(par, argc, argv);
#ifdef _OPENMP
    int threads = omp_get_max_threads();
#else
    int threads = 1;
#endif
    printf("device: %s (%s%s, %d CPU threads)%s\n", dev->name, dtype_name(dev->dtype), dev->is_gpu ? "" : ", the CPU path", threads,
           attention_backend_note(dev));
    if (!dev->is_gpu && (args->bf16 || args->fp16)) printf("note: the CPU path computes in fp32; --bf16/--fp16 apply on GPUs\n");
    printf("parallel: world size %d = tensor-parallel %d x data-parallel %d%s\n", par->size[GROUP_WORLD], par->size[GROUP_TP], par->size[GROUP_DP],
           args->use_distributed_optimizer ? ", distributed optimizer" : "");
}

// GPT-2's BPE from --vocab-file/--merge-file, or NULL when neither is given.
static Tokenizer* load_tokenizer(const Args* args) {
    if (!args->vocab_file && !args->merge_file) return NULL;
    int type = tokenizer_type_from_name(args->tokenizer_type);
    if (type != TOK_GPT2BPE) arg_error("--tokenizer-type %s: train_gpt uses GPT2BPETokenizer", args->tokenizer_type);
    if (!args->vocab_file || !args->merge_file) arg_error("GPT2BPETokenizer needs both --vocab-file and --merge-file");
    return tokenizer_load(type, args->vocab_file, args->merge_file);
}

static GPTConfig gpt_config_from_args(const Args* args, int vocab_size) {
    GPTConfig cfg;
    cfg.L = args->num_layers;
    cfg.C = args->hidden_size;
    cfg.NH = args->num_attention_heads;
    cfg.HS = cfg.C / cfg.NH;
    cfg.F = args->ffn_hidden_size;
    cfg.V = vocab_size;
    int multiple = args->make_vocab_size_divisible_by * args->tensor_model_parallel_size;
    cfg.Vp = CEIL_DIV(vocab_size, multiple) * multiple;
    cfg.maxT = args->max_position_embeddings;
    return cfg;
}

// ----------------------------------------------------------------------------
// Zero-shot evaluation (Megatron's tasks/zeroshot_gpt/evaluate.py): --task WIKITEXT103, the loss
// summed over sliding windows, or LAMBADA, greedy predictions of each text's last word.
// Data-parallel ranks take every dp-th micro-batch; each window or example counts once.

static int32_t* encode_text(const void* tokenizer, const char* text, size_t n, size_t* count) {
    TokenList ids = {NULL, 0, 0};
    tokenizer_encode((const Tokenizer*)tokenizer, text, n, &ids);
    *count = ids.len;
    return ids.ids;
}

// A --valid-data file; it must be UTF-8, as Megatron's Python reads it.
static char* read_utf8_file(const char* path, size_t* n) {
    char* text = tok_read_file(path, "--valid-data file", n);
    int bad, k;
    for (size_t i = 0; i < *n; i += k)
        if (!(k = utf8_sequence((const unsigned char*)text + i, *n - i, &bad))) die("%s: invalid UTF-8 at byte %zu", path, i);
    return text;
}

// Evaluation needs the weights only.
static void gpt_drop_training_state(GPT* m) {
    float** state[4] = {&m->grads, &m->adam_m, &m->adam_v, &m->master};
    for (int i = 0; i < 4; i++) {
        if (*state[i]) dev_free(m->dev, *state[i]);
        *state[i] = NULL;
    }
}

// The model of --load with its weights only, for the modes that run it without training it
// (evaluation, generation, the server); activations are the caller's.
static void gpt_load_weights(GPT* m, const GPTConfig* cfg, Device* dev, Parallel* par, const CheckpointArgs* ckpt, const CkptSource* src) {
    gpt_build_parallel(m, cfg, dev, par, 0);
    CheckpointArgs weights_only = *ckpt;
    weights_only.finetune = 1;
    TrainState unused;
    memset(&unused, 0, sizeof(unused));
    checkpoint_load(m, src, &weights_only, &unused);
    gpt_drop_training_state(m);
}

// B samples of T + 1 tokens (rows of `samples`) and their masks (rows of T) laid out in [s, b]
// order in h and uploaded as inputs and targets.
static void upload_samples(GPT* m, HostBatch* h, const int32_t* samples, const float* masks, int B, int T) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            h->tokens[t * B + b] = samples[(size_t)b * (T + 1) + t];
            h->targets[t * B + b] = samples[(size_t)b * (T + 1) + t + 1];
            h->mask[t * B + b] = masks[(size_t)b * T + t];
        }
    gpt_upload_tokens(m, h->tokens, B * T);
    dev_upload(m->dev, m->acts.targets, h->targets, B * T * sizeof(int));
}

// Greedy predictions at rows of the last forward's logits: the argmax over the real vocabulary,
// the lowest id on ties (as torch.argmax). With tensor parallelism every rank holds a vocabulary
// shard of each row, so the shards of these rows are gathered first (Megatron: parallel_output=False).
static void gpt_argmax_rows(GPT* m, const int* rows, int n, int* out) {
    size_t es = dtype_size(m->dev->dtype), Vr = m->Vr;
    void* stored = xmalloc(Vr * es);
    float* shards = (float*)xmalloc((size_t)m->tp * n * Vr * sizeof(float));  // [rank][row][Vr]
    for (int i = 0; i < n; i++) {
        dev_download(m->dev, stored, at(m, m->acts.logits, (size_t)rows[i] * Vr), Vr * es);
        dtype_to_floats(shards + ((size_t)m->tp_rank * n + i) * Vr, stored, Vr, m->dev->dtype);
    }
    all_gather(m->par, parallel_host_device(), GROUP_TP, shards, (size_t)n * Vr, DT_F32);
    for (int i = 0; i < n; i++) {
        int best = 0;
        float best_logit = -INFINITY;
        for (int v = 0; v < m->cfg.V; v++) {
            float x = shards[((size_t)(v / Vr) * n + i) * Vr + v % Vr];
            if (x > best_logit) { best_logit = x; best = v; }
        }
        out[i] = best;
    }
    free(stored);
    free(shards);
}

// Megatron's result block: the line between two rules of dashes one longer than it.
static void print_eval_results(const char* line) {
    size_t width = strlen(line) + 1;
    char* rule = (char*)xmalloc(width + 1);
    memset(rule, '-', width);
    rule[width] = 0;
    printf("%s\n%s\n%s\n", rule, line, rule);
    free(rule);
}

// tokens, targets and dloss are page-locked: load_batch and gpt_micro_step upload them in stream
// order, so the host prepares a batch while the GPU finishes the step before (each micro-step
// ends with batch_loss's download, after which they may be rewritten).
static HostBatch host_batch_alloc(const Device* d, int B, int T) {
    HostBatch h;
    size_t N = (size_t)B * T;
    h.tokens = (int*)host_alloc_pinned(d, N * sizeof(int));
    h.targets = (int*)host_alloc_pinned(d, N * sizeof(int));
    h.mask = (float*)xmalloc(N * sizeof(float));
    h.dloss = (float*)host_alloc_pinned(d, N * sizeof(float));
    h.losses = (float*)xmalloc(N * sizeof(float));
    h.sample = (int32_t*)xmalloc((T + 1) * sizeof(int32_t));
    return h;
}

static void host_batch_free(const Device* d, HostBatch* h) {
    host_free_pinned(d, h->tokens); host_free_pinned(d, h->targets); host_free_pinned(d, h->dloss);
    free(h->mask); free(h->losses); free(h->sample);
}

// The loss summed over every window's scored targets (micro-batches of B windows).
static double wikitext_loss_sum(GPT* m, const LMWindows* w, const int32_t* tokens, int eod, int B, int log_interval) {
    Parallel* p = m->par;
    int T = w->seq_len;
    HostBatch h = host_batch_alloc(m->dev, B, T);
    int32_t* samples = (int32_t*)xmalloc((size_t)B * (T + 1) * sizeof(int32_t));
    float* masks = (float*)xmalloc((size_t)B * T * sizeof(float));
    double sum = 0;
    int64_t batches = CEIL_DIV(w->count, (int64_t)B);
    for (int64_t k = p->rank[GROUP_DP], local = 0; k < batches; k += p->size[GROUP_DP], local++) {
        if (local % log_interval == 0) printf("> working on iteration: %lld\n", (long long)local);
        int nb = (int)(w->count - k * B < B ? w->count - k * B : B);
        for (int b = 0; b < nb; b++) lm_window(w, tokens, k * B + b, eod, samples + (size_t)b * (T + 1), masks + (size_t)b * T);
        upload_samples(m, &h, samples, masks, nb, T);
        sum += gpt_micro_step(m, &h, nb, T, 1.0, 0.0, 0.0f, 0.0f);  // count 1: the masked sum of the losses
    }
    all_reduce_host(p, GROUP_DP, &sum, 1);
    free(samples);
    free(masks);
    host_batch_free(m->dev, &h);
    return sum;
}

static void evaluate_wikitext(GPT* m, const Tokenizer* tokenizer, const char* path, int seq_len, int stride, int B, int log_interval) {
    size_t n, detok_n, num_tokenized;
    char* raw = read_utf8_file(path, &n);
    int64_t num_original = wikitext_word_count(raw, n);
    char* text = wikitext_detokenize(raw, n, &detok_n);
    int32_t* tokens = encode_text(tokenizer, text, detok_n, &num_tokenized);
    printf(" > number of original tokens: %lld, number of detokenized tokens: %zu\n", (long long)num_original, num_tokenized);
    if (num_tokenized < 2 || num_original < 2)
        die("%s: %lld words, %zu tokens: WIKITEXT103 needs at least 2 of each", path, (long long)num_original, num_tokenized);
    LMWindows w = lm_windows((int64_t)num_tokenized, seq_len, stride);
    double loss_sum = wikitext_loss_sum(m, &w, tokens, tokenizer_eod(tokenizer), B, log_interval);
    LMMetrics r = lm_metrics(loss_sum, (int64_t)num_tokenized, num_original);
    char ratio[48], line[512];
    python_float_repr(r.token_ratio, ratio, sizeof(ratio));
    snprintf(line, sizeof(line), " validation results on WIKITEXT103 | avg loss: %.4E | ppl: %.4E | adjusted ppl: %.4E | token ratio: %s |",
             r.avg_loss, r.ppl, r.adjusted_ppl, ratio);
    print_eval_results(line);
    printf(" > full precision: loss sum %.17g over %zu targets, %lld windows | avg loss %.12e | ppl %.12e | adjusted ppl %.12e\n",
           loss_sum, num_tokenized - 1, (long long)w.count, r.avg_loss, r.ppl, r.adjusted_ppl);
    free(raw);
    free(text);
    free(tokens);
}

// Examples whose every label token is the model's greedy prediction (micro-batches of B
// examples, each batch as long as its longest example: with causal attention the padding
// after an example does not change its logits).
static int64_t lambada_correct(GPT* m, const LambadaExample* ex, int64_t count, int eod, int B, int log_interval) {
    Parallel* p = m->par;
    int T = m->T;
    HostBatch h = host_batch_alloc(m->dev, B, T);
    int32_t* samples = (int32_t*)xmalloc((size_t)B * (T + 1) * sizeof(int32_t));
    float* masks = (float*)xmalloc((size_t)B * T * sizeof(float));
    int *rows = (int*)xmalloc((size_t)B * T * sizeof(int)), *predicted = (int*)xmalloc((size_t)B * T * sizeof(int));
    int* all_right = (int*)xmalloc(B * sizeof(int));
    double correct = 0;
    int64_t batches = CEIL_DIV(count, (int64_t)B);
    for (int64_t k = p->rank[GROUP_DP], local = 0; k < batches; k += p->size[GROUP_DP], local++) {
        if (local % log_interval == 0) printf("> working on iteration: %lld\n", (long long)local);
        const LambadaExample* e = ex + k * B;
        int nb = (int)(count - k * B < B ? count - k * B : B), Tb = 1;
        for (int b = 0; b < nb; b++) Tb = e[b].num_context + e[b].num_label - 1 > Tb ? e[b].num_context + e[b].num_label - 1 : Tb;
        for (int b = 0; b < nb; b++) lambada_window(&e[b], Tb, eod, samples + (size_t)b * (Tb + 1), masks + (size_t)b * Tb);
        upload_samples(m, &h, samples, masks, nb, Tb);
        gpt_forward(m, nb, Tb, 0.0f, 0.0f);
        int n = 0;
        for (int i = 0; i < nb * Tb; i++)
            if (h.mask[i] != 0.0f) rows[n++] = i;
        gpt_argmax_rows(m, rows, n, predicted);
        for (int b = 0; b < nb; b++) all_right[b] = 1;
        for (int i = 0; i < n; i++) all_right[rows[i] % nb] &= predicted[i] == h.targets[rows[i]];
        for (int b = 0; b < nb; b++) correct += all_right[b];
    }
    all_reduce_host(p, GROUP_DP, &correct, 1);
    free(samples); free(masks); free(rows); free(predicted); free(all_right);
    host_batch_free(m->dev, &h);
    return (int64_t)correct;
}

static void evaluate_lambada(GPT* m, const Tokenizer* tokenizer, const char* path, int strict, int seq_len, int B, int log_interval) {
    printf("> building lambada dataset from %s ...\n", path);
    size_t n;
    int64_t count;
    char* text = read_utf8_file(path, &n);
    LambadaExample* ex = lambada_read(path, text, n, strict, encode_text, tokenizer, &count);
    for (int64_t i = 0; i < count; i++)
        if (ex[i].num_context + ex[i].num_label > seq_len + 1)
            die("%s:%lld: %d tokens, more than --seq-length %d + 1", path, (long long)i + 1, ex[i].num_context + ex[i].num_label, seq_len);
    printf(" > found %lld samples.\n", (long long)count);
    int64_t correct = lambada_correct(m, ex, count, tokenizer_eod(tokenizer), B, log_interval);
    char line[512];
    snprintf(line, sizeof(line), " validation results on LAMBADA | number correct: %.4E | total examples: %.4E | avg accuracy: %.4E",
             (double)correct, (double)count, (double)correct / count);
    print_eval_results(line);
    printf(" > full precision: %lld correct of %lld (%s) | accuracy %.12e\n", (long long)correct, (long long)count,
           strict ? "strict" : "last token", (double)correct / count);
    for (int64_t i = 0; i < count; i++) free(ex[i].tokens);
    free(ex);
    free(text);
}

// --task: the --load model on one of Megatron's zero-shot tasks, with Megatron's result lines.
static void run_eval_task(const EvalArgs* e, Args* args, const CheckpointArgs* ckpt, const CkptSource* source, int argc, char** argv) {
    if (!source) arg_error("--task needs --load: a checkpoint directory or a Hugging Face GPT-2 directory");
    checkpoint_apply_config(source, args, NULL);
    if (!args->seq_length) args->seq_length = args->max_position_embeddings;
    if (!args->micro_batch_size && !arg_given("--micro-batch-size")) args->micro_batch_size = 1;
    eval_args_check_length(e, args->seq_length);
    Tokenizer* tokenizer = load_tokenizer(args);
    if (!tokenizer) arg_error("--task %s needs the tokenizer: --vocab-file and --merge-file", e->task);
    Parallel par;
    start_ranks(args, &par);
    args_validate_model(args);
    recompute_args_validate(args);  // checked, though a forward pass alone recomputes nothing
    Device dev;
    start_device(args, &par, &dev, argc, argv);
    GPTConfig cfg = gpt_config_from_args(args, tokenizer_vocab_size(tokenizer));
    GPT model;
    gpt_load_weights(&model, &cfg, &dev, &par, ckpt, source);
    gpt_alloc_activations(&model, args->micro_batch_size, args->seq_length);
    const char* path = e->valid_data.values[0];
    if (!strcmp(e->task, "WIKITEXT103"))
        evaluate_wikitext(&model, tokenizer, path, args->seq_length, e->overlapping_eval, args->micro_batch_size, args->log_interval);
    else
        evaluate_lambada(&model, tokenizer, path, e->strict_lambada, args->seq_length, args->micro_batch_size, args->log_interval);
    printf("done :-)\n");
    gpt_free(&model);
    tokenizer_free(tokenizer);
    device_free(&dev);
    parallel_finalize(&par);
}

#ifndef TESTING
// ----------------------------------------------------------------------------
// The training loop (megatron/training.py: pretrain -> train -> train_step).

// The recompute plan --recompute-granularity/-method ask for (checked by args_validate).
static int recompute_mode(const Args* a) {
    if (!a->recompute_granularity) return RECOMPUTE_NONE;
    if (!strcmp(a->recompute_granularity, "selective")) return RECOMPUTE_SELECTIVE;
    return !strcmp(a->recompute_method, "uniform") ? RECOMPUTE_UNIFORM : RECOMPUTE_BLOCK;
}

static void print_memory_report(const GPT* m) {
    double mib = 1048576.0;
    size_t n = m->num_params, es = dtype_size(m->dev->dtype);
    printf("[memory] parameters %.1f MiB | gradients %.1f MiB | optimizer %.1f MiB | activations %.1f MiB",
           n * es / mib, n * 4 / mib, (m->opt_end - m->opt_begin) * (m->master ? 12 : 8) / mib, m->activation_bytes / mib);
#ifdef __CUDACC__
    if (m->dev->is_gpu) {  // the stream-ordered pool keeps what it took, so this is the peak so far
        size_t free_b, total_b;
        cudaCheck(cudaMemGetInfo(&free_b, &total_b));
        printf(" | GPU in use %.1f MiB of %.1f MiB", (total_b - free_b) / mib, total_b / mib);
    }
#endif
    printf("\n");
    // activations per layer: measured (allocated) beside Megatron-3's formulas (§4.1, §5)
    int L = m->cfg.L, k = m->recompute_layers;
    char plan[96];
    if (m->recompute == RECOMPUTE_UNIFORM) snprintf(plan, sizeof(plan), "full, uniform groups of %d layer%s", k, k > 1 ? "s" : "");
    else if (m->recompute == RECOMPUTE_BLOCK) snprintf(plan, sizeof(plan), "full, block: the first %d of %d layers", k, L);
    else snprintf(plan, sizeof(plan), "%s (flash attention keeps no s x s scores: selective's memory)", m->recompute ? "selective" : "none");
    size_t other = m->activation_bytes - m->stored_bytes - m->recompute_bytes;
    printf("[memory] recompute %s | activations kept for the backward %.2f MiB = %.3f MiB per layer | recompute scratch %.2f MiB | "
           "other activation buffers %.2f MiB\n", plan, m->stored_bytes / mib, m->stored_bytes / mib / L, m->recompute_bytes / mib, other / mib);
    double s = m->T, b = m->B, h = m->cfg.C, a = m->cfg.NH, t = m->tp, sbh = s * b * h;
    printf("[memory] Megatron-3 per layer (s %d, b %d, h %d, a %d, t %d; 16-bit): none sbh(10+24/t+5as/ht) %.3f MiB | "
           "selective sbh(10+24/t) %.3f MiB | full 2sbh %.3f MiB | this run's activations are %zu-byte: x%g\n",
           m->T, m->B, m->cfg.C, m->cfg.NH, m->tp, sbh * (10 + 24 / t + 5 * a * s / (h * t)) / mib, sbh * (10 + 24 / t) / mib,
           2 * sbh / mib, es, es / 2.0);
}

// Data parallelism splits every global batch as Megatron's MegatronPretrainingSampler: of each
// dp consecutive micro-batches, data-parallel rank r takes the r-th. So a run sees the same
// samples, and the same dropout masks, whatever the data-parallel size.
static double evaluate(GPT* m, HostBatch* h, const GPTSampleSet* valid, int64_t* consumed, const Args* a, int eod) {
    Parallel* p = m->par;
    double total = 0;
    int B = a->micro_batch_size, T = a->seq_length, micro = a->global_batch_size / B;
    for (int it = 0; it < a->eval_iters; it++) {
        for (int k = p->rank[GROUP_DP]; k < micro; k += p->size[GROUP_DP]) {
            double count = load_batch(m, h, valid, *consumed + (int64_t)k * B, B, T, eod, a->eod_mask_loss);
            total += gpt_micro_step(m, h, B, T, count, 0.0, 0.0f, 0.0f);
        }
        *consumed += (int64_t)micro * B;
    }
    all_reduce_host(p, GROUP_DP, &total, 1);
    return total / ((double)a->eval_iters * micro);
}

// --debug-dump-params: the full fp32 parameters in the single-device layout, raw, from world rank 0.
static void dump_full_params(GPT* m, const char* path) {
    float* full = gpt_gather_full_params(m);
    size_t sizes[NUM_PARAMS], n = 0;
    param_sizes(&m->cfg, 1, sizes);
    for (int i = 0; i < NUM_PARAMS; i++) n += sizes[i];
    if (m->par->rank[GROUP_WORLD] == 0) {
        FILE* f = fopen(path, "wb");
        if (!f || fwrite(full, sizeof(float), n, f) != n || fclose(f)) die("cannot write %s: %s", path, strerror(errno));
    }
    free(full);
}

// ----------------------------------------------------------------------------
// Generation mode (--prompt / --sample-input-file with --load): Megatron's
// tools/generate_samples_gpt.py instead of training.

// Token ids as text through the tokenizer, or as numbers without one.
static void write_tokens(FILE* f, const Tokenizer* tok, const int* ids, int n) {
    if (tok) {
        char* text = tokenizer_decode(tok, ids, n);
        fputs(text, f);
        free(text);
    } else {
        for (int i = 0; i < n; i++) fprintf(f, i ? " %d" : "%d", ids[i]);
    }
}

// --sample-length after training: text from a document boundary on, with the sampling flags,
// running on past the ends of documents (to the position table at most).
static void print_sample(GPT* m, const Tokenizer* tok, int eod, int n, const GenerationArgs* g, uint32_t seed, FILE* out) {
    int* text = (int*)xmalloc((1 + (size_t)n) * sizeof(int));
    text[0] = eod;
    MT19937 rng;
    mt_seed(&rng, seed);
    SamplingParams sp = sampling_from_args(g);
    int len = gpt_generate(m, text, 1, n, &sp, &rng, -1, NULL);
    fprintf(out, "---- sample (%d tokens) ----\n", len - 1);
    write_tokens(out, tok, text + 1, len - 1);
    fprintf(out, "\n----\n");
    free(text);
}

// The prompts: --prompt, or the lines of --sample-input-file (a last newline ends the last line).
static int read_prompts(const GenerationArgs* g, char*** prompts) {
    if (g->prompt) {
        *prompts = (char**)xmalloc(sizeof(char*));
        (*prompts)[0] = strdup(g->prompt);
        return 1;
    }
    struct stat st;
    if (stat(g->sample_input_file, &st) == 0 && S_ISDIR(st.st_mode)) arg_error("--sample-input-file %s is a directory", g->sample_input_file);
    FILE* f = fopen(g->sample_input_file, "rb");
    if (!f) arg_error("--sample-input-file %s: %s", g->sample_input_file, strerror(errno));
    int n = 0, cap = 0;
    char* line = NULL;
    size_t line_cap = 0;
    ssize_t len;
    while ((len = getline(&line, &line_cap, f)) >= 0) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
        if (n == cap) *prompts = (char**)realloc(*prompts, (cap = cap ? 2 * cap : 16) * sizeof(char*));
        (*prompts)[n++] = strdup(line);
    }
    free(line);
    fclose(f);
    if (n == 0) arg_error("--sample-input-file %s is empty: one prompt per line", g->sample_input_file);
    return n;
}

// A prompt's token ids: its text through the tokenizer, or (no tokenizer) token ids separated by
// blanks. An empty prompt starts from a document boundary. `where` names it in errors.
static void prompt_tokens(const Tokenizer* tok, const char* text, const GPTConfig* c, int eod, const char* where, TokenList* ids) {
    ids->len = 0;
    if (tok) tokenizer_encode(tok, text, strlen(text), ids);
    else {
        char* copy = strdup(text);
        for (char* word = strtok(copy, " \t"); word; word = strtok(NULL, " \t")) {
            int64_t id;
            if (!parse_int64(word, &id) || id < 0 || id >= c->V)
                arg_error("%s: '%.20s' is not a token id below %d (without --vocab-file prompts are token ids)", where, word, c->V);
            token_list_push(ids, (int32_t)id);
        }
        free(copy);
    }
    if (ids->len == 0) token_list_push(ids, eod);
    if (ids->len > (size_t)c->maxT)
        arg_error("%s: the prompt has %zu tokens, more than the model's %d positions (--max-position-embeddings)", where, ids->len, c->maxT);
}

// The start-up of the modes that generate from --load (--prompt, --port): its flags, and ranks
// that hold one copy of the model.
static void start_generation_ranks(const char* mode_flag, Args* args, const CkptSource* src, int* vocab_size, Parallel* par) {
    if (!src) arg_error("%s needs --load (a checkpoint directory or a Hugging Face GPT-2 directory)", mode_flag);
    checkpoint_apply_config(src, args, args->vocab_file || args->merge_file ? NULL : vocab_size);
    if (!args->seq_length) args->seq_length = args->max_position_embeddings;  // prompt tokens per forward pass
    if (!args->micro_batch_size && !arg_given("--micro-batch-size")) args->micro_batch_size = 1;
    start_ranks(args, par);
    args_validate_model(args);
    if (par->size[GROUP_DP] > 1)
        arg_error("generation runs one copy of the model: start --tensor-model-parallel-size ranks (%d), not %d", par->size[GROUP_TP], par->size[GROUP_WORLD]);
}

static int generate_mode(const GenerationArgs* g, Args* args, const CheckpointArgs* ckpt, const CkptSource* src, int vocab_size,
                         int argc, char** argv) {
    char** prompts = NULL;
    int n_prompts = read_prompts(g, &prompts);
    Parallel par;
    start_generation_ranks(g->prompt ? "--prompt" : "--sample-input-file", args, src, &vocab_size, &par);
    FILE* out = stdout;
    if (g->sample_output_file && par.rank[GROUP_WORLD] == 0 && !(out = fopen(g->sample_output_file, "wb")))
        arg_error("--sample-output-file %s: %s", g->sample_output_file, strerror(errno));
    Device dev;
    start_device(args, &par, &dev, argc, argv);
    Tokenizer* tok = load_tokenizer(args);
    if (tok) vocab_size = tokenizer_vocab_size(tok);
    generation_args_check_vocab(g, vocab_size);
    GPTConfig cfg = gpt_config_from_args(args, vocab_size);
    GPT model;
    gpt_load_weights(&model, &cfg, &dev, &par, ckpt, src);
    gpt_alloc_activations(&model, 1, args->seq_length);

    int eod = tok ? tokenizer_eod(tok) : cfg.V - 1;
    SamplingParams sp = sampling_from_args(g);
    MT19937 rng;
    mt_seed(&rng, (uint32_t)args->seed);
    TokenList ids = {};
    for (int k = 0; k < n_prompts; k++) {
        char where[1100];
        if (g->prompt) snprintf(where, sizeof(where), "--prompt");
        else snprintf(where, sizeof(where), "--sample-input-file %s line %d", g->sample_input_file, k + 1);
        prompt_tokens(tok, prompts[k], &cfg, eod, where, &ids);
        int* tokens = (int*)xmalloc((ids.len + (size_t)g->out_seq_length) * sizeof(int));
        for (size_t i = 0; i < ids.len; i++) tokens[i] = ids.ids[i];
        int len = gpt_generate(&model, tokens, (int)ids.len, g->out_seq_length, &sp, &rng, eod, NULL);
        // as generate_samples_gpt.py writes each sample: the context, then the continuation
        fprintf(out, "\nContext: %s\n\nMegatron-LM: ", prompts[k]);
        write_tokens(out, tok, tokens + ids.len, len - (int)ids.len);
        fprintf(out, "\n");
        fflush(out);
        free(tokens);
        free(prompts[k]);
    }
    if (out != stdout && fclose(out)) die("cannot write %s: %s", g->sample_output_file, strerror(errno));
    free(ids.ids);
    free(prompts);
    gpt_free(&model);
    if (tok) tokenizer_free(tok);
    device_free(&dev);
    parallel_finalize(&par);
    return 0;
}

// ----------------------------------------------------------------------------
// Server mode (--port with --load): Megatron's tools/run_text_generation_server.py. World rank 0
// answers HTTP (megatron.h section server); with tensor parallelism it sends each request to the
// other ranks, which generate with it as rank 0 does (Megatron's send_do_generate broadcast).

enum { SERVE_IDLE, SERVE_GENERATE };

// A request as every rank runs it: the prompts' token ids and the sampling settings.
typedef struct {
    int n_prompts, tokens_to_generate, logprobs;
    SamplingParams sp;
    uint32_t seed;
    int* lengths;  // of each prompt
    int* tokens;   // the prompts' ids one after another
} ServeJob;

// What a job generates: each prompt continued (len[i] tokens, the prompt's included) and, when
// asked, log p of each token after the first.
typedef struct {
    int n;
    int** tokens;
    int* len;
    float** logprobs;
} ServeOutput;

// Rank 0's values on every tensor-parallel rank: a sum to which the others add zeros (exact:
// counts, token ids and seeds are integers below 2^53).
static void tp_share(GPT* m, double* x, int n) {
    if (m->tp_rank) memset(x, 0, n * sizeof(double));
    all_reduce_host(m->par, GROUP_TP, x, n);
}

// Rank 0 sends the command and, for SERVE_GENERATE, its job; the other ranks (job zeroed) receive
// them. Returns the command.
static int serve_exchange(GPT* m, int command, ServeJob* job) {
    int total = 0;
    for (int i = 0; i < job->n_prompts; i++) total += job->lengths[i];
    double head[9] = {(double)command, (double)job->n_prompts, (double)job->tokens_to_generate, (double)job->logprobs,
                      job->sp.temperature, (double)job->sp.top_k, job->sp.top_p, (double)job->seed, (double)total};
    tp_share(m, head, 9);
    if (head[0] == SERVE_IDLE) return SERVE_IDLE;
    if (m->tp_rank) {
        total = (int)head[8];
        *job = ServeJob{(int)head[1], (int)head[2], (int)head[3], {head[4], (int)head[5], head[6]}, (uint32_t)head[7],
                        (int*)xmalloc((size_t)head[1] * sizeof(int)), (int*)xmalloc((size_t)total * sizeof(int))};
    }
    int n = job->n_prompts + total;
    double* ids = (double*)xmalloc(n * sizeof(double));
    for (int i = 0; i < job->n_prompts; i++) ids[i] = job->lengths[i];
    for (int k = 0; k < total; k++) ids[job->n_prompts + k] = job->tokens[k];
    tp_share(m, ids, n);
    for (int i = 0; i < job->n_prompts; i++) job->lengths[i] = (int)ids[i];
    for (int k = 0; k < total; k++) job->tokens[k] = (int)ids[job->n_prompts + k];
    free(ids);
    return SERVE_GENERATE;
}

// Every rank: each prompt continued by gpt_generate, one after another, drawing from one MT19937
// seeded with job->seed.
static void serve_run(GPT* m, const ServeJob* job, int eod, ServeOutput* out) {
    int n = job->n_prompts;
    *out = ServeOutput{n, (int**)xmalloc(n * sizeof(int*)), (int*)xmalloc(n * sizeof(int)), (float**)xmalloc(n * sizeof(float*))};
    MT19937 rng;
    mt_seed(&rng, job->seed);
    const int* prompt = job->tokens;
    for (int i = 0; i < n; i++) {
        size_t room = (size_t)job->lengths[i] + job->tokens_to_generate;
        out->tokens[i] = (int*)xmalloc(room * sizeof(int));
        memcpy(out->tokens[i], prompt, job->lengths[i] * sizeof(int));
        out->logprobs[i] = job->logprobs ? (float*)xmalloc(room * sizeof(float)) : NULL;
        out->len[i] = gpt_generate(m, out->tokens[i], job->lengths[i], job->tokens_to_generate, &job->sp, &rng, eod, out->logprobs[i]);
        prompt += job->lengths[i];
    }
}

static void serve_output_free(ServeOutput* out) {
    for (int i = 0; i < out->n; i++) {
        free(out->tokens[i]);
        free(out->logprobs[i]);
    }
    free(out->tokens);
    free(out->len);
    free(out->logprobs);
}

typedef struct {
    GPT* model;
    const Tokenizer* tok;
    int eod;
    MT19937 seeds;  // the seed of each request that names none
} ServedModel;

// Rank 0 with a checked job: the other ranks join, then every prompt's text, segments and logprobs.
static void serve_answer(ServedModel* s, ServeJob* job, GenerateResponse* answer) {
    ServeOutput out;
    serve_exchange(s->model, SERVE_GENERATE, job);
    serve_run(s->model, job, s->eod, &out);
    for (int i = 0; i < out.n; i++) {
        GeneratedText* g = &answer->items[i];
        g->text = tokenizer_decode(s->tok, out.tokens[i], out.len[i]);
        g->n_tokens = out.len[i];
        g->segments = (char**)xmalloc(out.len[i] * sizeof(char*));
        for (int k = 0; k < out.len[i]; k++) g->segments[k] = tokenizer_decode(s->tok, out.tokens[i] + k, 1);
        g->logprobs = out.logprobs[i];  // the answer's now
        out.logprobs[i] = NULL;
    }
    serve_output_free(&out);
}

// The server's GenerateFn (rank 0): tokenize (add_BOS puts end-of-document first, as Megatron's
// tokenize_prompts), refuse what the model cannot take, answer.
static int serve_generate(void* ctx, const GenerateRequest* req, GenerateResponse* answer, char* err, size_t err_cap) {
    ServedModel* s = (ServedModel*)ctx;
    const GPTConfig* c = &s->model->cfg;
    if (req->top_k >= c->V) {
        snprintf(err, err_cap, "top_k must be less than the vocabulary size %d", c->V);
        return 1;
    }
    ServeJob job = {req->n_prompts, req->tokens_to_generate, req->logprobs, {req->temperature, req->top_k, req->top_p},
                    req->random_seed >= 0 ? (uint32_t)req->random_seed : mt_u32(&s->seeds), (int*)xcalloc(req->n_prompts, sizeof(int)), NULL};
    TokenList ids = {};
    int too_long = 0;
    for (int i = 0; i < req->n_prompts; i++) {
        size_t start = ids.len;
        if (req->add_BOS) token_list_push(&ids, s->eod);
        tokenizer_encode(s->tok, req->prompts[i], strlen(req->prompts[i]), &ids);
        job.lengths[i] = (int)(ids.len - start);
        too_long |= ids.len - start + req->tokens_to_generate > (size_t)c->maxT;
    }
    job.tokens = ids.ids;
    if (too_long) snprintf(err, err_cap, "Length of prompt + tokens_to_generate longer than allowed");
    else serve_answer(s, &job, answer);
    free(job.lengths);
    free(ids.ids);
    return too_long;
}

// Rank 0, between requests: keeps the other ranks' wait for the next one inside --collective-timeout.
static void serve_idle(void* ctx) {
    ServeJob nothing;
    memset(&nothing, 0, sizeof(nothing));
    serve_exchange(((ServedModel*)ctx)->model, SERVE_IDLE, &nothing);
}

// The other tensor-parallel ranks, until killed: each job rank 0 sends, generated alongside it.
static void serve_follow(GPT* m, int eod) {
    for (;;) {
        ServeJob job;
        memset(&job, 0, sizeof(job));
        if (serve_exchange(m, SERVE_IDLE, &job) == SERVE_IDLE) continue;
        ServeOutput out;
        serve_run(m, &job, eod, &out);
        serve_output_free(&out);
        free(job.lengths);
        free(job.tokens);
    }
}

static int serve_mode(const ServerArgs* sa, Args* args, const CheckpointArgs* ckpt, const CkptSource* src, int vocab_size, int argc,
                      char** argv) {
    Parallel par;
    start_generation_ranks("--port", args, src, &vocab_size, &par);
    Tokenizer* tok = load_tokenizer(args);
    if (!tok) arg_error("--port needs --vocab-file and --merge-file: the server takes and answers text");
    Device dev;
    start_device(args, &par, &dev, argc, argv);
    GPTConfig cfg = gpt_config_from_args(args, tokenizer_vocab_size(tok));
    GPT model;
    gpt_load_weights(&model, &cfg, &dev, &par, ckpt, src);
    gpt_alloc_activations(&model, 1, args->seq_length);
    ServedModel served = {&model, tok, tokenizer_eod(tok)};
    mt_seed(&served.seeds, (uint32_t)args->seed);
    if (model.tp_rank) serve_follow(&model, served.eod);
    server_run(sa, serve_generate, par.size[GROUP_TP] > 1 ? serve_idle : NULL, args->collective_timeout / 4, &served);
    return 0;  // not reached: the server runs until the process is killed
}

int main(int argc, char** argv) {
    Args args;
    ArgSpec specs[MAX_ARGS];
    args_defaults(&args);
    int n_specs = args_table(&args, specs);
    int vocab_size = 0;
    specs[n_specs++] = ArgSpec{"--vocab-size", ARG_INT, &vocab_size, "vocabulary size when no tokenizer files are given"};
    CheckpointArgs ckpt;
    n_specs += checkpoint_args_table(&ckpt, specs + n_specs);
    GenerationArgs gen;
    n_specs += generation_args_table(&gen, specs + n_specs);
    EvalArgs eval;
    n_specs += eval_args_table(&eval, specs + n_specs);
    ServerArgs serve;
    n_specs += server_args_table(&serve, specs + n_specs);
    args_parse(argc, argv, specs, n_specs);
    checkpoint_args_validate(&ckpt);
    generation_args_validate(&gen);
    eval_args_validate(&eval);
    server_args_validate(&serve);
    if (serve.port >= 0 && (gen.prompt || gen.sample_input_file || eval.task)) arg_error("--port does not go with --prompt, --sample-input-file or --task");
    CkptSource source;
    int have_source = ckpt.load && checkpoint_find(ckpt.load, ckpt.save, &source);
    if (ckpt.export_hf) {  // a single-process tool: before any parallel start-up
        if (!have_source) die("--export-hf: no checkpoint in %s", ckpt.load);
        export_hf(&source, &ckpt);
        return 0;
    }
    if (eval.task) {
        run_eval_task(&eval, &args, &ckpt, have_source ? &source : NULL, argc, argv);
        return 0;
    }
    if (serve.port >= 0) return serve_mode(&serve, &args, &ckpt, have_source ? &source : NULL, vocab_size, argc, argv);
    if (gen.prompt || gen.sample_input_file) return generate_mode(&gen, &args, &ckpt, have_source ? &source : NULL, vocab_size, argc, argv);
    if (have_source) checkpoint_apply_config(&source, &args, args.vocab_file || args.merge_file ? NULL : &vocab_size);
    Parallel par;
    start_ranks(&args, &par);
    args_validate(&args);
    Device dev;
    start_device(&args, &par, &dev, argc, argv);

    Tokenizer* tokenizer = load_tokenizer(&args);
    if (tokenizer && arg_given("--vocab-size") && vocab_size != tokenizer_vocab_size(tokenizer))  // (Megatron ignores it too)
        printf("note: --vocab-size %d is ignored: the tokenizer (--vocab-file) has %d tokens\n", vocab_size, tokenizer_vocab_size(tokenizer));
    if (tokenizer) vocab_size = tokenizer_vocab_size(tokenizer);
    if (vocab_size <= 0) arg_error("give --vocab-file/--merge-file or --vocab-size");
    // the text after training: stdout, or --sample-output-file (opened now, not after the run)
    FILE* sample_out = stdout;
    if (gen.sample_output_file && !args.sample_length) arg_error("--sample-output-file without --prompt or --sample-input-file needs --sample-length");
    if (gen.sample_output_file && par.rank[GROUP_WORLD] == 0 && !(sample_out = fopen(gen.sample_output_file, "wb")))
        arg_error("--sample-output-file %s: %s", gen.sample_output_file, strerror(errno));
    int eod = tokenizer ? tokenizer_eod(tokenizer) : vocab_size - 1;
    generation_args_check_vocab(&gen, vocab_size);
    GPTConfig cfg = gpt_config_from_args(&args, vocab_size);
    int B = args.micro_batch_size, T = args.seq_length;

    // Megatron's sample counts: train, then enough validation for every evaluation, then test.
    int64_t train_samples = args.train_samples ? args.train_samples : args.train_iters * args.global_batch_size;
    int64_t train_iters = args.train_iters;
    if (!train_iters) train_iters = train_iterations_for_samples(&args, train_samples);
    size_t requested[3] = {(size_t)train_samples,
                           (size_t)((train_iters / args.eval_interval + 1) * args.eval_iters * args.global_batch_size),
                           (size_t)(args.eval_iters * args.global_batch_size)};
    GPTSampleSet sets[3];
    gpt_build_datasets(sets, args.data_path.n, args.data_path.values, args.split, requested, T, (uint32_t)args.seed);
    printf("data: %zu train, %zu validation, %zu test samples of %d tokens\n", sets[0].num_samples, sets[1].num_samples, sets[2].num_samples, T);

    GPT model;
    gpt_build_parallel(&model, &cfg, &dev, &par, args.use_distributed_optimizer);
    model.grad_bucket = (size_t)args.ddp_bucket_size;
    gpt_init(&model, args.init_method_std, (uint32_t)args.seed);
    TrainState state;
    memset(&state, 0, sizeof(state));
    state.scaler = loss_scaler_from_args(&args, dev.dtype == DT_F16);
    if (have_source) checkpoint_load(&model, &source, &ckpt, &state);
    model.recompute = recompute_mode(&args);
    model.recompute_layers = args.recompute_num_layers;
    gpt_alloc_activations(&model, B, T);
    printf("model: %d layers, hidden %d, %d heads, ffn %d, vocab %d (padded %d), %zu parameters\n", cfg.L, cfg.C, cfg.NH, cfg.F,
           cfg.V, cfg.Vp, model.num_params);

    HostBatch h = host_batch_alloc(&dev, B, T);

    LRSchedule schedule = lr_schedule_from_args(&args, train_samples);
    if (state.has_schedule) schedule = lr_schedule_resume(&schedule, &state.schedule, &ckpt);
    LossScaler scaler = state.scaler;
    LogFile log_file;
    log_file_open(&log_file, par.rank[GROUP_WORLD] == 0 ? args.log_file : NULL);
    double peak = args.peak_tflops > 0 ? args.peak_tflops : dev.is_gpu ? peak_tflops_for(dev.name) : 0.0;
    double flops_per_token = gpt_flops_per_token(cfg.L, cfg.C, T, cfg.Vp);

    int64_t consumed = state.consumed_train, consumed_valid = state.consumed_valid, lr_samples = state.scheduler_samples;
    int updates = state.adam_step, skipped = 0, nan_iters = 0, interval_iters = 0, reported_memory = 0;
    double interval_loss = 0, interval_start = now_seconds(), interval_tokens = 0, last_norm = 0;
    float p_hidden = (float)args.hidden_dropout, p_attn = (float)args.attention_dropout;
    int dp = par.size[GROUP_DP];
    if (state.iteration >= train_iters) printf("the checkpoint is at iteration %lld: nothing left to train\n", (long long)state.iteration);
    for (int64_t iteration = state.iteration + 1; iteration <= train_iters; iteration++) {
        int gbs = global_batch_at(&args, consumed), micro = gbs / B;
        if (micro % dp) die("iteration %lld: global batch %d is not a multiple of micro-batch %d x data-parallel %d", (long long)iteration, gbs, B, dp);
        if (iteration == 1 && args.debug_hang_rank == par.rank[GROUP_WORLD])
            for (;;) sleep(60);  // the others' first collective must time out
        gpt_start_gradients(&model);
        double loss = 0;
        for (int k = par.rank[GROUP_DP]; k < micro; k += dp) {  // the sampler's split (see evaluate)
            double count = load_batch(&model, &h, &sets[0], consumed + (int64_t)k * B, B, T, eod, args.eod_mask_loss);
            gpt_set_dropout_stream(&model, (uint32_t)args.seed, iteration, k);
            model.reduce_in_backward = k + dp >= micro && !model.distributed_optimizer;
            loss += gpt_micro_step(&model, &h, B, T, count, scaler.scale / micro, p_hidden, p_attn) / micro;
        }
        gpt_reduce_gradients(&model);
        all_reduce_host(&par, GROUP_DP, &loss, 1);
        consumed += gbs;
        double norm = sqrt(gpt_grad_norm_squared(&model)) / scaler.scale;
        int found_inf = !isfinite(norm);
        if (found_inf && dev.dtype != DT_F16) die("iteration %lld: the gradient norm is %f (loss %f): training diverged", (long long)iteration, norm, loss);
        if (!isfinite(loss) && dev.dtype != DT_F16) die("iteration %lld: the loss is %f: training diverged", (long long)iteration, loss);
        if (found_inf) {
            skipped++;
            nan_iters += norm != norm;
        } else {
            double clip = args.clip_grad > 0 && norm > args.clip_grad ? args.clip_grad / (norm + 1e-6) : 1.0;
            float lr = (float)lr_at(&schedule, lr_samples);
            gpt_update(&model, lr, &args, (float)args.weight_decay, (float)(clip / scaler.scale), ++updates);
            lr_samples += gbs;
            last_norm = norm;
        }
        loss_scaler_update(&scaler, found_inf);
        interval_loss += loss;
        interval_iters++;
        interval_tokens += (double)gbs * T;

        if (iteration % args.log_interval == 0 || iteration == train_iters) {
            dev_sync(&dev);
            double seconds = now_seconds() - interval_start;
            LogRow row;
            row.iteration = iteration;
            row.train_iters = train_iters;
            row.consumed_samples = consumed;
            row.ms_per_iter = 1000.0 * seconds / interval_iters;
            row.lr = lr_at(&schedule, lr_samples);
            row.global_batch = gbs;
            row.lm_loss = interval_loss / interval_iters;
            row.loss_scale = scaler.scale;
            row.grad_norm = last_norm;
            row.skipped = skipped;
            row.nan_iters = nan_iters;
            row.tokens_per_s = interval_tokens / seconds;
            row.tflops = row.tokens_per_s * flops_per_token / 1e12;
            row.mfu = peak > 0 ? row.tflops / peak : 0.0;
            log_print(&row);
            log_file_train(&log_file, &row);
            if (!reported_memory) print_memory_report(&model);  // after the first log line, as Megatron
            reported_memory = 1;
            interval_loss = interval_tokens = 0;
            interval_iters = skipped = nan_iters = 0;
            interval_start = now_seconds();
        }
        int last = iteration == train_iters;
        if (args.eval_iters > 0 && sets[1].num_samples > 0 && (iteration % args.eval_interval == 0 || last)) {
            log_validation(&log_file, iteration, evaluate(&model, &h, &sets[1], &consumed_valid, &args, eod));
            interval_start = now_seconds();
        }
        int exiting = ckpt.exit_interval && iteration % ckpt.exit_interval == 0;
        if (ckpt.save && (iteration % ckpt.save_interval == 0 || last || exiting)) {
            TrainState now = {iteration, consumed, consumed_valid, lr_samples, updates, scaler, schedule, 1, {0}};
            checkpoint_save(&model, &now, ckpt.save, specs, n_specs);
            interval_start = now_seconds();
        }
        if (exiting) {
            printf("exiting at iteration %lld (--exit-interval %d)\n", (long long)iteration, ckpt.exit_interval);
            break;
        }
    }

    if (args.sample_length > 0) print_sample(&model, tokenizer, eod, args.sample_length, &gen, (uint32_t)args.seed, sample_out);
    if (sample_out != stdout && fclose(sample_out)) die("cannot write %s: %s", gen.sample_output_file, strerror(errno));

    if (args.debug_dump_params) dump_full_params(&model, args.debug_dump_params);
    if (log_file.f) fclose(log_file.f);
    for (int i = 0; i < 3; i++) gpt_sampleset_free(&sets[i]);
    host_batch_free(&dev, &h);
    gpt_free(&model);
    if (tokenizer) tokenizer_free(tokenizer);
    device_free(&dev);
    parallel_finalize(&par);
    return 0;
}
#endif
