/*
test_generation.cu: text generation (the generation section of megatron.h, gpt_generate).

Sampler, on the host: greedy is the argmax; top-k and top-p never draw a token they remove
and draw the kept ones as often as their renormalised probabilities (Megatron's top-p keeps the
token that crosses p); temperature divides the logits; a seed fixes the draws; token_logprob is
the log-softmax.
Model: test/make_generation_fixture.py ran Hugging Face's generate(do_sample=False) on the tiny
GPT-2 of test_gpt.cu for three prompts (an ordinary one, one that fills the 32 positions, one
that stops at its end-of-document token). Our greedy tokens equal HF's exactly; the logits of
every step through the KV cache equal HF's and our own full forward's; the log-probabilities
equal the full forward's log-softmax; a prefill in chunks (activations smaller than the prompt)
changes nothing; a seed fixes the sampled text. On the CPU always, on a GPU (fp32, and bf16 for
the cache against the full forward) when one is found.
*/
#define TESTING
#include "../train_gpt.cu"
#include "test.h"

static const char* WEIGHTS = "test/fixtures/gpt2_tiny_hf.safetensors";
static const char* REFERENCE = "test/fixtures/gpt2_tiny_generate.safetensors";
enum { CASES = 3, V_TINY = 200, MAXT_TINY = 32 };

// ---- the sampler

static void softmax(double* p, const double* z, int n) {
    double max = -INFINITY, sum = 0;
    for (int i = 0; i < n; i++) max = fmax(max, z[i]);
    for (int i = 0; i < n; i++) sum += p[i] = exp(z[i] - max);
    for (int i = 0; i < n; i++) p[i] /= sum;
}

// Draw `draws` tokens; returns the largest |frequency - want| over the tokens (want 0 = never drawn).
static double draw_frequencies(const float* logits, int V, const SamplingParams* sp, const double* want, int draws, uint32_t seed) {
    MT19937 rng;
    mt_seed(&rng, seed);
    double* count = (double*)xcalloc(V, sizeof(double));
    for (int k = 0; k < draws; k++) count[sample_token(logits, V, sp, &rng)] += 1;
    double worst = 0;
    for (int i = 0; i < V; i++) {
        if (want[i] == 0 && count[i] > 0) worst = INFINITY;  // a removed token was drawn
        worst = fmax(worst, fabs(count[i] / draws - want[i]));
    }
    free(count);
    return worst;
}

static void test_greedy(void) {
    MT19937 mt, rng;
    mt_seed(&mt, 1);
    mt_seed(&rng, 2);
    float logits[50];
    int same = 1;
    for (int trial = 0; trial < 100; trial++) {
        fill_normal(logits, 50, &mt, 3.0);
        int best = 0;
        for (int i = 1; i < 50; i++) best = logits[i] > logits[best] ? i : best;
        SamplingParams top1 = {1.0, 1, 0.0}, cold = {0.0, 0, 0.0};
        same &= sample_token(logits, 50, &top1, &rng) == best && sample_token(logits, 50, &cold, &rng) == best;
    }
    check(same, "top_k=1 and temperature 0 pick the argmax (100 random logit vectors)", "a draw differed");
    float tied[8] = {0, 1, 2, 5, 1, 0, 5, 3};
    SamplingParams greedy = {1.0, 1, 0.0};
    check(sample_token(tied, 8, &greedy, &rng) == 3, "greedy takes the first of equal maxima (torch.argmax)", "not token 3");
}

static void test_top_k(void) {
    MT19937 mt;
    mt_seed(&mt, 3);
    enum { V = 20, K = 5 };
    float logits[V];
    fill_normal(logits, V, &mt, 2.0);
    double z[V], p[V], want[V] = {0}, kept = 0;
    for (int i = 0; i < V; i++) z[i] = logits[i];
    softmax(p, z, V);
    for (int i = 0; i < V; i++) {  // at least the k-th largest: fewer than k values above it
        int above = 0;
        for (int j = 0; j < V; j++) above += z[j] > z[i];
        want[i] = above < K ? p[i] : 0;
        kept += want[i];
    }
    for (int i = 0; i < V; i++) want[i] /= kept;
    SamplingParams sp = {1.0, K, 0.0};
    double worst = draw_frequencies(logits, V, &sp, want, 40000, 7);
    check(worst < 0.01, "top-k 5: only the 5 largest drawn, at their renormalised probabilities (40000 draws)",
          "largest frequency error %.4f", worst);
    // Megatron keeps every logit >= the k-th: a tie at the k-th value keeps both
    float tied[5] = {3, 2, 2, 1, 0};
    double p3[5], want3[5] = {0};
    double zt[5] = {3, 2, 2, 1, 0};
    softmax(p3, zt, 5);
    for (int i = 0; i < 3; i++) want3[i] = p3[i] / (p3[0] + p3[1] + p3[2]);
    SamplingParams k2 = {1.0, 2, 0.0};
    worst = draw_frequencies(tied, 5, &k2, want3, 40000, 8);
    check(worst < 0.01, "top-k 2 with a tie at the 2nd value keeps both tied tokens", "largest frequency error %.4f", worst);
}

static void test_top_p(void) {
    // probabilities 0.5, 0.3, 0.2 in shuffled positions: p = 0.55 keeps 0.5 and the 0.3 that crosses p
    // (cumulative 0.8 > p: a plain "remove cumulative > p" would drop it)
    float logits[3] = {(float)log(0.2), (float)log(0.5), (float)log(0.3)};
    double want[3] = {0, 0.5 / 0.8, 0.3 / 0.8};
    SamplingParams sp = {1.0, 0, 0.55};
    double worst = draw_frequencies(logits, 3, &sp, want, 40000, 9);
    check(worst < 0.01, "top-p 0.55 over {0.5, 0.3, 0.2}: the token that crosses p stays (Megatron's shift), 0.2 never drawn",
          "largest frequency error %.4f", worst);
    double first_only[3] = {0, 1, 0};
    SamplingParams tiny = {1.0, 0, 1e-9};
    check(draw_frequencies(logits, 3, &tiny, first_only, 1000, 10) == 0, "top-p 1e-9 keeps the most likely token only", "another was drawn");
    // random logits: token i is kept iff the tokens above it hold at most p
    MT19937 mt;
    mt_seed(&mt, 4);
    enum { V = 30 };
    float l[V];
    fill_normal(l, V, &mt, 1.5);
    double z[V], p[V], w[V], kept = 0;
    for (int i = 0; i < V; i++) z[i] = l[i] / 0.7;  // with a temperature: the nucleus is of the tempered distribution
    softmax(p, z, V);
    for (int i = 0; i < V; i++) {
        double above = 0;
        for (int j = 0; j < V; j++) above += z[j] > z[i] ? p[j] : 0;
        w[i] = above <= 0.6 ? p[i] : 0;
        kept += w[i];
    }
    for (int i = 0; i < V; i++) w[i] /= kept;
    SamplingParams p6 = {0.7, 0, 0.6};
    worst = draw_frequencies(l, V, &p6, w, 40000, 11);
    check(worst < 0.01, "top-p 0.6 at temperature 0.7: only the nucleus drawn, at its renormalised probabilities",
          "largest frequency error %.4f", worst);
}

static void test_temperature_and_seed(void) {
    float logits[6] = {1.0f, 0.5f, -0.3f, 2.0f, 0.0f, -1.0f};
    double z[6], want[6], temperatures[2] = {0.5, 2.0};
    for (double t : temperatures) {
        for (int i = 0; i < 6; i++) z[i] = logits[i] / t;
        softmax(want, z, 6);
        SamplingParams sp = {t, 0, 0.0};
        double worst = draw_frequencies(logits, 6, &sp, want, 50000, 12);
        char name[128];
        snprintf(name, sizeof(name), "temperature %.1f draws softmax(logits / %.1f) (50000 draws)", t, t);
        check(worst < 0.01, name, "largest frequency error %.4f", worst);
    }
    MT19937 a, b, c;
    mt_seed(&a, 42);
    mt_seed(&b, 42);
    mt_seed(&c, 43);
    SamplingParams sp = {1.0, 0, 0.0};
    int same = 1, differ = 0;
    for (int k = 0; k < 1000; k++) {
        int x = sample_token(logits, 6, &sp, &a), y = sample_token(logits, 6, &sp, &b), w = sample_token(logits, 6, &sp, &c);
        same &= x == y;
        differ |= x != w;
    }
    check(same && differ, "the same seed gives the same draws, another seed others", "same %d differ %d", same, differ);
    double lp = token_logprob(logits, 6, 3), sum = 0;
    for (int i = 0; i < 6; i++) sum += exp((double)logits[i]);
    check(fabs(lp - (2.0 - log(sum))) < 1e-12, "token_logprob is the log-softmax", "%.15f vs %.15f", lp, 2.0 - log(sum));
}

// ---- the model against Hugging Face's generate()

typedef struct {
    int prompt_len, length, max_new, eod;
    int tokens[MAXT_TINY];
    float* logits;  // (length - prompt_len, V) HF's logits of each generated position
} HFCase;

static void load_cases(HFCase* cases) {
    SafeTensors st;
    safetensors_open(&st, REFERENCE);
    int32_t max_new[CASES], eod[CASES];
    safetensors_read_raw(&st, "max_new", max_new, sizeof(max_new));
    safetensors_read_raw(&st, "eod", eod, sizeof(eod));
    for (int k = 0; k < CASES; k++) {
        HFCase* c = &cases[k];
        char name[32];
        snprintf(name, sizeof(name), "prompt.%d", k);
        c->prompt_len = (int)st_numel(st_need(&st, name));
        snprintf(name, sizeof(name), "tokens.%d", k);
        c->length = (int)st_numel(st_need(&st, name));
        safetensors_read_raw(&st, name, c->tokens, c->length * sizeof(int32_t));
        snprintf(name, sizeof(name), "logits.%d", k);
        c->logits = (float*)xmalloc((size_t)(c->length - c->prompt_len) * V_TINY * sizeof(float));
        safetensors_read_floats(&st, name, c->logits, (size_t)(c->length - c->prompt_len) * V_TINY);
        c->max_new = max_new[k];
        c->eod = eod[k];
    }
    safetensors_close(&st);
}

static void tiny_model(GPT* m, const Device* dev, int B, int T) {
    GPTConfig c;
    c.L = 2; c.C = 64; c.NH = 2; c.HS = 32; c.F = 256; c.V = V_TINY; c.Vp = 256; c.maxT = MAXT_TINY;
    SafeTensors st;
    safetensors_open(&st, WEIGHTS);
    gpt_build(m, &c, dev);
    gpt_load_hf(m, &st);
    safetensors_close(&st);
    gpt_alloc_activations(m, B, T);
}

// Logits (n rows of V) of tokens[0, n) through one full forward.
static void full_forward_logits(GPT* m, const int* tokens, int n, float* out) {
    size_t es = dtype_size(m->dev->dtype), Vp = m->cfg.Vp;
    void* raw = xmalloc(n * Vp * es);
    float* all = (float*)xmalloc(n * Vp * sizeof(float));
    gpt_upload_tokens(m, tokens, n);
    gpt_forward(m, 1, n, 0.0f, 0.0f);
    dev_download(m->dev, raw, m->acts.logits, n * Vp * es);
    dtype_to_floats(all, raw, n * Vp, m->dev->dtype);
    for (int r = 0; r < n; r++) memcpy(out + (size_t)r * V_TINY, all + r * Vp, V_TINY * sizeof(float));
    free(raw);
    free(all);
}

// The logits gpt_generate sees at each generated position of `c` (the prompt as one prefill,
// then HF's tokens one by one through the cache), rows of V.
static void cached_logits(GPT* m, const HFCase* c, float* out) {
    float* row = (float*)xmalloc(m->cfg.Vp * sizeof(float));
    void* scratch = xmalloc(m->Vr * dtype_size(m->dev->dtype));
    if (!m->kv_cache) m->kv_cache = dev_malloc(m->dev, (size_t)m->cfg.L * m->cfg.maxT * 3 * m->Cr * dtype_size(m->dev->dtype));
    gpt_forward_cached(m, c->tokens, 0, c->prompt_len);
    gpt_logits_row(m, c->prompt_len - 1, row, scratch);
    for (int t = c->prompt_len; t < c->length; t++) {
        memcpy(out + (size_t)(t - c->prompt_len) * V_TINY, row, V_TINY * sizeof(float));
        if (t + 1 < c->length) {
            gpt_forward_cached(m, c->tokens + t, t, 1);
            gpt_logits_row(m, 0, row, scratch);
        }
    }
    free(row);
    free(scratch);
}

// Greedy generation, the cached logits and the log-probabilities against HF and the full forward.
static void test_against_hf(const Device* dev, const char* tag, const HFCase* cases, double tol) {
    GPT m;
    tiny_model(&m, dev, 1, MAXT_TINY);
    char name[200];
    for (int k = 0; k < CASES; k++) {
        const HFCase* c = &cases[k];
        int max_new = c->max_new + (k == 1 ? 8 : 0);  // case 1 asks for more than the 32 positions hold
        int* tokens = (int*)xmalloc((c->prompt_len + max_new) * sizeof(int));
        float* logprobs = (float*)xmalloc((c->prompt_len + max_new) * sizeof(float));
        memcpy(tokens, c->tokens, c->prompt_len * sizeof(int));
        SamplingParams greedy = {1.0, 1, 0.0};
        MT19937 rng;
        mt_seed(&rng, 1);
        int len = gpt_generate(&m, tokens, c->prompt_len, max_new, &greedy, &rng, c->eod, logprobs);
        int first_diff = 0;
        while (first_diff < len && first_diff < c->length && tokens[first_diff] == c->tokens[first_diff]) first_diff++;
        int same = len == c->length && first_diff == len;
        snprintf(name, sizeof(name), "%s case %d: greedy tokens equal HF generate()'s (%d new%s)", tag, k, c->length - c->prompt_len,
                 k == 1 ? ", to the last position" : c->eod >= 0 ? ", stopped after the end-of-document token" : "");
        check(same, name, "length %d vs HF %d, first difference at position %d", len, c->length, first_diff);

        int steps = c->length - c->prompt_len;
        float* cached = (float*)xmalloc((size_t)steps * V_TINY * sizeof(float));
        float* full = (float*)xmalloc((size_t)c->length * V_TINY * sizeof(float));
        cached_logits(&m, c, cached);
        full_forward_logits(&m, c->tokens, c->length, full);
        snprintf(name, sizeof(name), "%s case %d: KV-cache logits equal HF's at every step", tag, k);
        check_close(name, cached, c->logits, (size_t)steps * V_TINY, tol);
        snprintf(name, sizeof(name), "%s case %d: KV-cache logits equal the full forward's at every step", tag, k);
        check_close(name, cached, full + (size_t)(c->prompt_len - 1) * V_TINY, (size_t)steps * V_TINY, tol);
        double* want = (double*)xmalloc(c->length * sizeof(double));
        for (int i = 0; i + 1 < c->length; i++) want[i] = token_logprob(full + (size_t)i * V_TINY, V_TINY, c->tokens[i + 1]);
        snprintf(name, sizeof(name), "%s case %d: logprobs equal the full forward's log-softmax (prompt and generated)", tag, k);
        if (same) check_close(name, logprobs, want, c->length - 1, tol);
        free(tokens); free(logprobs); free(cached); free(full); free(want);
    }
    gpt_free(&m);
}

// Activations of 3 rows: the prompts go through in chunks; tokens and logprobs as in one piece.
static void test_chunked_prefill(const Device* dev, const char* tag, const HFCase* cases) {
    GPT whole, chunked;
    tiny_model(&whole, dev, 1, MAXT_TINY);
    tiny_model(&chunked, dev, 1, 3);
    int ok = 1;
    double err = 0;
    for (int k = 0; k < CASES; k++) {
        const HFCase* c = &cases[k];
        int a[MAXT_TINY], b[MAXT_TINY];
        float la[MAXT_TINY], lb[MAXT_TINY];
        memcpy(a, c->tokens, c->prompt_len * sizeof(int));
        memcpy(b, c->tokens, c->prompt_len * sizeof(int));
        SamplingParams greedy = {1.0, 1, 0.0};
        MT19937 rng;
        mt_seed(&rng, 1);
        int na = gpt_generate(&whole, a, c->prompt_len, c->max_new, &greedy, &rng, c->eod, la);
        int nb = gpt_generate(&chunked, b, c->prompt_len, c->max_new, &greedy, &rng, c->eod, lb);
        ok &= na == nb && !memcmp(a, b, na * sizeof(int));
        if (ok) err = fmax(err, rel_error(lb, la, na - 1));
    }
    char name[160];
    snprintf(name, sizeof(name), "%s prefill in chunks of 3 rows: same tokens, same logprobs (relative error %.1e)", tag, err);
    check(ok && err < 1e-5, name, "tokens differ or logprobs off");
    gpt_free(&whole);
    gpt_free(&chunked);
}

// Sampling through the model: the seed fixes the text.
static void test_sampled_text(const Device* dev, const char* tag, const HFCase* cases) {
    GPT m;
    tiny_model(&m, dev, 1, MAXT_TINY);
    int text[3][MAXT_TINY], len[3];
    uint32_t seeds[3] = {5, 5, 6};
    for (int r = 0; r < 3; r++) {
        memcpy(text[r], cases[0].tokens, cases[0].prompt_len * sizeof(int));
        SamplingParams sp = {1.0, 0, 0.0};
        MT19937 rng;
        mt_seed(&rng, seeds[r]);
        len[r] = gpt_generate(&m, text[r], cases[0].prompt_len, 20, &sp, &rng, -1, NULL);
    }
    char name[128];
    snprintf(name, sizeof(name), "%s sampled text: the same seed gives the same 20 tokens, another seed others", tag);
    check(len[0] == len[1] && !memcmp(text[0], text[1], len[0] * sizeof(int)) && memcmp(text[0], text[2], len[0] * sizeof(int)),
          name, "lengths %d %d %d", len[0], len[1], len[2]);
    gpt_free(&m);
}

int main(void) {
    test_greedy();
    test_top_k();
    test_top_p();
    test_temperature_and_seed();
    HFCase cases[CASES];
    load_cases(cases);
    Device cpu;
    device_init(&cpu, "cpu", DT_F32);
    test_against_hf(&cpu, "cpu fp32", cases, 1e-5);
    test_chunked_prefill(&cpu, "cpu", cases);
    test_sampled_text(&cpu, "cpu", cases);
    device_free(&cpu);
#ifdef __CUDACC__
    if (gpu_available()) {
        Device gpu;
        device_init(&gpu, "cuda", DT_F32);
        test_against_hf(&gpu, "gpu fp32", cases, 1e-5);
        test_chunked_prefill(&gpu, "gpu fp32", cases);
        test_sampled_text(&gpu, "gpu fp32", cases);
        device_free(&gpu);
        device_init(&gpu, "cuda", DT_BF16);
        GPT m;
        tiny_model(&m, &gpu, 1, MAXT_TINY);
        for (int k = 0; k < CASES; k++) {
            const HFCase* c = &cases[k];
            int steps = c->length - c->prompt_len;
            float* cached = (float*)xmalloc((size_t)steps * V_TINY * sizeof(float));
            float* full = (float*)xmalloc((size_t)c->length * V_TINY * sizeof(float));
            cached_logits(&m, c, cached);
            full_forward_logits(&m, c->tokens, c->length, full);
            char name[128];
            snprintf(name, sizeof(name), "gpu bf16 case %d: KV-cache logits equal the full forward's at every step", k);
            check_close(name, cached, full + (size_t)(c->prompt_len - 1) * V_TINY, (size_t)steps * V_TINY, 2e-2);
            free(cached); free(full);
        }
        gpt_free(&m);
        device_free(&gpu);
    } else {
        cudaGetLastError();
        printf("skip gpu generation tests: no GPU\n");
    }
#else
    printf("skip gpu generation tests: built without CUDA\n");
#endif
    for (int k = 0; k < CASES; k++) free(cases[k].logits);
    return test_summary();
}
