/*
test_evaluate.cu: the zero-shot evaluation's model-independent parts (megatron.h, evaluation)
against test/fixtures/eval.txt, which test/make_eval_fixtures.py wrote from a Python port of
Megatron-LM's tasks/zeroshot_gpt with tiktoken's GPT-2 BPE (CPU only):

- the WikiText detokenizer byte for byte on hand-picked strings and real lines, the word count,
  and on the whole WikiText-2 test and validation files: bytes, words, detokenized bytes and
  tokens (counts and FNV-1a 64 hashes);
- the sliding windows: every window of small cases exactly, and count + hash over the test file;
- LAMBADA examples (context and label tokens), plain and --strict-lambada: the first 24 lines
  exactly, hand-picked texts, and count + hash of all 5,153;
- Python's repr of floats and evaluate.py's figures.
The whole files come from $MEGATRON_DATA (default ../shared/data); without them those parts skip.
test/test_evaluate.sh runs train_gpt --task end to end against torch's figures.
*/
#define TESTING
#include "../train_gpt.cu"
#include "test.h"

static const char* data_dir(void) { return getenv("MEGATRON_DATA") ? getenv("MEGATRON_DATA") : "../shared/data"; }

static uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
    const unsigned char* p = (const unsigned char*)data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    return h;
}

static const uint64_t FNV_START = 0xCBF29CE484222325ull;

// Little-endian int32s (the fixtures' byte order) into the hash.
static uint64_t fnv1a_int32s(uint64_t h, const int32_t* v, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char b[4] = {(unsigned char)v[i], (unsigned char)(v[i] >> 8), (unsigned char)(v[i] >> 16), (unsigned char)(v[i] >> 24)};
        h = fnv1a(h, b, 4);
    }
    return h;
}

static char* hex_decode(const char* hex, size_t* n) {
    *n = strcmp(hex, "-") == 0 ? 0 : strlen(hex) / 2;
    char* out = (char*)xmalloc(*n + 1);
    for (size_t i = 0; i < *n; i++) {
        unsigned v;
        sscanf(hex + 2 * i, "%2x", &v);
        out[i] = (char)v;
    }
    out[*n] = 0;
    return out;
}

// The space-separated integers of s into out (at most cap); returns the count.
static int read_ints(const char* s, int32_t* out, int cap) {
    int n = 0, used;
    long v;
    while (n < cap && sscanf(s, "%ld%n", &v, &used) == 1) {
        out[n++] = (int32_t)v;
        s += used;
    }
    return n;
}

// A group of records: counts them and remembers the first mismatch.
typedef struct {
    int total, ok;
    char first_bad[320];
} RecordGroup;

static void group_add(RecordGroup* g, int ok, const char* what) {
    g->total++;
    g->ok += ok;
    if (!ok && !g->first_bad[0]) snprintf(g->first_bad, sizeof(g->first_bad), "%s", what);
}

static void group_check(const RecordGroup* g, const char* name) {
    char label[320];
    snprintf(label, sizeof(label), "%s: %d of %d equal the Python port", name, g->ok, g->total);
    check(g->total > 0 && g->ok == g->total, label, "first difference: %s", g->first_bad);
}

static void check_detok(const char* fields, RecordGroup* g) {
    char in_hex[8192], out_hex[8192];
    sscanf(fields, "%8191s %8191s", in_hex, out_hex);
    size_t n, want_n, got_n;
    char *in = hex_decode(in_hex, &n), *want = hex_decode(out_hex, &want_n);
    char* got = wikitext_detokenize(in, n, &got_n);
    char what[256];
    snprintf(what, sizeof(what), "input %.60s... gives %.60s, want %.60s", in, got, want);
    group_add(g, got_n == want_n && memcmp(got, want, got_n) == 0, what);
    free(in); free(want); free(got);
}

static void check_words(const char* fields, RecordGroup* g) {
    char hex[1024];
    long long want;
    sscanf(fields, "%1023s %lld", hex, &want);
    size_t n;
    char* text = hex_decode(hex, &n);
    char what[256];
    snprintf(what, sizeof(what), "'%s': %lld words, want %lld", text, (long long)wikitext_word_count(text, n), want);
    group_add(g, wikitext_word_count(text, n) == want, what);
    free(text);
}

static void check_window_case(const char* fields, RecordGroup* g) {
    int n, s, o, k, used;
    long long count;
    sscanf(fields, "%d %d %d %lld %d%n", &n, &s, &o, &count, &k, &used);
    int32_t tokens[64], want[64], got[64], want_mask[64];
    float mask[64];
    for (int i = 0; i < n; i++) tokens[i] = 100 + i;
    const char* slash = strchr(fields, '/');
    int nt = read_ints(fields + used, want, 64), nm = read_ints(slash + 1, want_mask, 64);
    LMWindows w = lm_windows(n, s, o);
    lm_window(&w, tokens, k, 7, got, mask);
    int same = w.count == count && nt == s + 1 && nm == s && !memcmp(got, want, (s + 1) * sizeof(int32_t));
    for (int t = 0; t < s && same; t++) same = mask[t] == (float)want_mask[t];
    char what[128];
    snprintf(what, sizeof(what), "n %d, s %d, stride %d: window %d of %lld (we make %lld)", n, s, o, k, count, (long long)w.count);
    group_add(g, same, what);
}

// Example e equals the fixture's "num_context tokens..." fields.
static int same_example(const LambadaExample* e, const char* fields) {
    int32_t want[4096];
    int used, num_context;
    sscanf(fields, "%d%n", &num_context, &used);
    int n = read_ints(fields + used, want, 4096);
    return e->num_context == num_context && e->num_context + e->num_label == n && !memcmp(e->tokens, want, n * sizeof(int32_t));
}

static void check_lambada_case(const Tokenizer* tok, const char* fields, RecordGroup* g) {
    int strict, used;
    char hex[4096];
    sscanf(fields, "%d %4095s%n", &strict, hex, &used);
    size_t n;
    char* text = hex_decode(hex, &n);
    LambadaExample e = lambada_example(text, n, strict, encode_text, tok, "fixture");
    char what[256];
    snprintf(what, sizeof(what), "%s '%.60s': %d context + %d label tokens", strict ? "strict" : "plain", text, e.num_context, e.num_label);
    group_add(g, same_example(&e, fields + used), what);
    free(e.tokens);
    free(text);
}

static void check_repr(const char* fields, RecordGroup* g) {
    char hex[64], want[64], got[64];
    sscanf(fields, "%63s %63s", hex, want);
    python_float_repr(strtod(hex, NULL), got, sizeof(got));
    char what[256];
    snprintf(what, sizeof(what), "%s: %s, want %s", hex, got, want);
    group_add(g, strcmp(got, want) == 0, what);
}

static void check_metrics(const char* fields, RecordGroup* g) {
    char sum_hex[64], avg_hex[64], ppl_hex[64], adj_hex[64], ratio_want[64], ratio_got[64];
    long long tokenized, original;
    sscanf(fields, "%63s %lld %lld %63s %63s %63s %63s", sum_hex, &tokenized, &original, avg_hex, ppl_hex, adj_hex, ratio_want);
    LMMetrics r = lm_metrics(strtod(sum_hex, NULL), tokenized, original);
    python_float_repr(r.token_ratio, ratio_got, sizeof(ratio_got));
    double ppl = strtod(ppl_hex, NULL), adjusted = strtod(adj_hex, NULL);
    int ok = r.avg_loss == strtod(avg_hex, NULL) && fabs(r.ppl - ppl) <= 1e-14 * ppl && fabs(r.adjusted_ppl - adjusted) <= 1e-14 * adjusted &&
             strcmp(ratio_got, ratio_want) == 0;
    char what[320];
    snprintf(what, sizeof(what), "loss sum %s: avg %.17g ppl %.17g adjusted %.17g ratio %s", sum_hex, r.avg_loss, r.ppl, r.adjusted_ppl, ratio_got);
    group_add(g, ok, what);
}

// The whole-file records: "wikitext FILE ..." and "windows FILE ...".
static void check_wikitext_file(const Tokenizer* tok, const char* fields, char* const* window_records, int n_window_records) {
    char name[128], detok_hash[32], tokens_hash[32], path[1200], label[256];
    size_t bytes, detok_bytes, num_tokens;
    long long words;
    sscanf(fields, "%127s %zu %lld %zu %31s %zu %31s", name, &bytes, &words, &detok_bytes, detok_hash, &num_tokens, tokens_hash);
    snprintf(path, sizeof(path), "%s/wikitext/%s", data_dir(), name);
    if (access(path, R_OK) != 0) { printf("skip %s: not found in %s (set MEGATRON_DATA)\n", name, data_dir()); return; }
    size_t n, detok_n, count;
    char* raw = read_utf8_file(path, &n);
    char* detok = wikitext_detokenize(raw, n, &detok_n);
    int32_t* tokens = encode_text(tok, detok, detok_n, &count);
    char got_detok[32], got_tokens[32];
    snprintf(got_detok, sizeof(got_detok), "%016llx", (unsigned long long)fnv1a(FNV_START, detok, detok_n));
    snprintf(got_tokens, sizeof(got_tokens), "%016llx", (unsigned long long)fnv1a_int32s(FNV_START, tokens, count));
    snprintf(label, sizeof(label), "%s: %zu bytes, %lld words, detokenized to %zu bytes (hash %s), %zu tokens", name, n,
             (long long)wikitext_word_count(raw, n), detok_n, got_detok, count);
    check(n == bytes && wikitext_word_count(raw, n) == words && detok_n == detok_bytes && !strcmp(got_detok, detok_hash) &&
          count == num_tokens && !strcmp(got_tokens, tokens_hash), label, "want %zu bytes, %lld words, %zu bytes (hash %s), %zu tokens (hash %s, ours %s)",
          bytes, words, detok_bytes, detok_hash, num_tokens, tokens_hash, got_tokens);
    for (int r = 0; r < n_window_records; r++) {
        char file[128], hash[32];
        int s, o;
        long long want_count;
        sscanf(window_records[r], "%127s %d %d %lld %31s", file, &s, &o, &want_count, hash);
        if (strcmp(file, name)) continue;
        LMWindows w = lm_windows((int64_t)count, s, o);
        int32_t* window = (int32_t*)xmalloc((s + 1) * sizeof(int32_t));
        float* mask = (float*)xmalloc(s * sizeof(float));
        unsigned char* mask_bytes = (unsigned char*)xmalloc(s);
        uint64_t h = FNV_START;
        int64_t scored = 0;
        for (int64_t k = 0; k < w.count; k++) {
            scored += lm_window(&w, tokens, k, tokenizer_eod(tok), window, mask);
            for (int t = 0; t < s; t++) mask_bytes[t] = mask[t] != 0.0f;
            h = fnv1a(fnv1a_int32s(h, window, s + 1), mask_bytes, s);
        }
        char got_hash[32];
        snprintf(got_hash, sizeof(got_hash), "%016llx", (unsigned long long)h);
        int hash_ok = !strcmp(hash, "-") || !strcmp(hash, got_hash);
        snprintf(label, sizeof(label), "%s windows of %d, stride %d: %lld windows%s, %lld targets scored once each", name, s, o,
                 (long long)w.count, strcmp(hash, "-") ? " (hashed)" : "", (long long)scored);
        check(w.count == want_count && hash_ok && scored == (int64_t)count - 1, label, "want %lld windows, hash %s (ours %s), %zu targets",
              want_count, hash, got_hash, count - 1);
        free(window); free(mask); free(mask_bytes);
    }
    free(raw); free(detok); free(tokens);
}

// "lambada STRICT EXAMPLES HASH" and the "lambada_line" records of that mode.
static void check_lambada_file(const Tokenizer* tok, const char* fields, char* const* line_records, int n_line_records) {
    int strict;
    long long want_count;
    char hash[32], path[1200], label[200];
    sscanf(fields, "%d %lld %31s", &strict, &want_count, hash);
    snprintf(path, sizeof(path), "%s/lambada/lambada_test.jsonl", data_dir());
    if (access(path, R_OK) != 0) { printf("skip LAMBADA: not found in %s (set MEGATRON_DATA)\n", data_dir()); return; }
    size_t n;
    int64_t count;
    char* text = read_utf8_file(path, &n);
    LambadaExample* ex = lambada_read(path, text, n, strict, encode_text, tok, &count);
    uint64_t h = FNV_START;
    for (int64_t i = 0; i < count; i++) {
        uint32_t sizes[2] = {(uint32_t)ex[i].num_context, (uint32_t)ex[i].num_label};
        h = fnv1a_int32s(h, (const int32_t*)sizes, 2);
        h = fnv1a_int32s(h, ex[i].tokens, ex[i].num_context + ex[i].num_label);
    }
    char got[32];
    snprintf(got, sizeof(got), "%016llx", (unsigned long long)h);
    snprintf(label, sizeof(label), "LAMBADA%s: %lld examples, context and label tokens (hash %s)", strict ? " strict" : "", (long long)count, got);
    check(count == want_count && !strcmp(got, hash), label, "want %lld examples, hash %s", want_count, hash);
    RecordGroup g = {0, 0, ""};
    for (int r = 0; r < n_line_records; r++) {
        int line_strict, line, used;
        sscanf(line_records[r], "%d %d%n", &line_strict, &line, &used);
        if (line_strict != strict || line > count) continue;
        char what[64];
        snprintf(what, sizeof(what), "line %d", line);
        group_add(&g, same_example(&ex[line - 1], line_records[r] + used), what);
    }
    snprintf(label, sizeof(label), "LAMBADA%s first lines", strict ? " strict" : "");
    group_check(&g, label);
    for (int64_t i = 0; i < count; i++) free(ex[i].tokens);
    free(ex);
    free(text);
}

static void test_lambada_window(void) {
    int32_t tokens[5] = {11, 12, 13, 14, 15}, out[8];
    float mask[7];
    LambadaExample e = {tokens, 3, 2};
    lambada_window(&e, 7, 99, out, mask);
    int32_t want[8] = {11, 12, 13, 14, 15, 99, 99, 99};
    float want_mask[7] = {0, 0, 1, 1, 0, 0, 0};
    check(!memcmp(out, want, sizeof(want)) && !memcmp(mask, want_mask, sizeof(want_mask)),
          "a LAMBADA sample: tokens padded, mask on the targets that are label tokens", "wrong sample");
}

int main(void) {
    const char* fixture = "test/fixtures/eval.txt";
    if (access(fixture, R_OK) != 0) { check(0, "fixtures", "%s not found (run from the repo root)", fixture); return test_summary(); }
    size_t len;
    char* text = tok_read_file(fixture, "fixture", &len);
    char encoder[1024], merges[1024];
    snprintf(encoder, sizeof(encoder), "%s/gpt2/encoder.json", data_dir());
    snprintf(merges, sizeof(merges), "%s/gpt2/vocab.bpe", data_dir());
    Tokenizer* tok = access(encoder, R_OK) == 0 && access(merges, R_OK) == 0 ? tokenizer_load(TOK_GPT2BPE, encoder, merges) : NULL;
    if (!tok) printf("skip the token checks: GPT-2 BPE files not found in %s (set MEGATRON_DATA)\n", data_dir());

    RecordGroup detok = {0, 0, ""}, words = {0, 0, ""}, windows = {0, 0, ""}, cases = {0, 0, ""}, reprs = {0, 0, ""}, metrics = {0, 0, ""};
    char *files[8], *window_records[8], *lambada_files[4], *lambada_lines[128];
    int n_files = 0, n_windows = 0, n_lambada = 0, n_lines = 0;
    char* save = NULL;
    for (char* line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char* fields = strchr(line, ' ');
        if (line[0] == '#' || !fields) continue;
        *fields++ = 0;
        if (!strcmp(line, "detok")) check_detok(fields, &detok);
        else if (!strcmp(line, "words")) check_words(fields, &words);
        else if (!strcmp(line, "window_case")) check_window_case(fields, &windows);
        else if (!strcmp(line, "repr")) check_repr(fields, &reprs);
        else if (!strcmp(line, "metrics")) check_metrics(fields, &metrics);
        else if (!strcmp(line, "lambada_case") && tok) check_lambada_case(tok, fields, &cases);
        else if (!strcmp(line, "wikitext") && n_files < 8) files[n_files++] = fields;
        else if (!strcmp(line, "windows") && n_windows < 8) window_records[n_windows++] = fields;
        else if (!strcmp(line, "lambada") && n_lambada < 4) lambada_files[n_lambada++] = fields;
        else if (!strcmp(line, "lambada_line") && n_lines < 128) lambada_lines[n_lines++] = fields;
    }
    group_check(&detok, "wikitext_detokenize");
    group_check(&words, "wikitext_word_count");
    group_check(&windows, "lm_window on small cases (every window)");
    group_check(&reprs, "python_float_repr");
    group_check(&metrics, "lm_metrics");
    test_lambada_window();
    if (tok) {
        group_check(&cases, "LAMBADA examples of hand-picked texts");
        for (int i = 0; i < n_files; i++) check_wikitext_file(tok, files[i], window_records, n_windows);
        for (int i = 0; i < n_lambada; i++) check_lambada_file(tok, lambada_files[i], lambada_lines, n_lines);
        tokenizer_free(tok);
    }
    free(text);
    return test_summary();
}
