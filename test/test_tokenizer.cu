/*
test_tokenizer.cu: prepro/tokenizer.h against the references (CPU only).

- test/fixtures/tokenizer.txt (made by test/make_tokenizer_fixtures.py from tiktoken and
  transformers): exact ids of hand-picked strings and of each corpus' first 16 KB, and count +
  hash of the ids of whole corpora (tiny Shakespeare, WikiText-2 test, LAMBADA), for GPT-2 BPE,
  BERT uncased and BERT cased. The corpora come from $MEGATRON_DATA (default ../shared/data).
- decode(encode(x)) == x for GPT-2 on valid UTF-8; invalid UTF-8 decodes to U+FFFD.
- Megatron-specific BERT behaviour that transformers does not share.
- the same ids from 4 threads sharing one tokenizer.
- malformed vocabulary/merge files: the loader dies with a one-line error (checked in a fork).
- split_sentences on a few paragraphs.
*/
#include <sys/wait.h>

#include "../megatron.h"
#include "../prepro/tokenizer.h"
#include "test.h"

static const char* data_dir(void) { return getenv("MEGATRON_DATA") ? getenv("MEGATRON_DATA") : "../shared/data"; }

static int file_exists(const char* path) { return access(path, R_OK) == 0; }

static uint64_t fnv1a_docs_add(uint64_t h, const int32_t* ids, size_t n) {
    uint32_t len = (uint32_t)n;
    for (size_t i = 0; i <= n; i++) {
        uint32_t w = i == 0 ? len : (uint32_t)ids[i - 1];
        for (int b = 0; b < 4; b++) h = (h ^ ((w >> (8 * b)) & 0xFF)) * 0x100000001B3ull;
    }
    return h;
}

typedef struct {
    char* text;  // all documents back to back
    size_t* start;
    size_t* len;
    size_t n;
} Corpus;

// tiny Shakespeare and WikiText are one document each; LAMBADA is one per line's "text".
static Corpus corpus_load(const char* name) {
    char path[1024];
    Corpus c = {0, 0, 0, 0};
    int jsonl = strcmp(name, "lambada") == 0;
    snprintf(path, sizeof(path), "%s/%s", data_dir(),
             jsonl ? "lambada/lambada_test.jsonl" : strcmp(name, "tinyshakespeare") == 0 ? "tinyshakespeare/input.txt" : "wikitext/wikitext-2.test.tokens");
    if (!file_exists(path)) return c;
    size_t len;
    char* raw = tok_read_file(path, "corpus", &len);
    c.start = (size_t*)xmalloc(8192 * sizeof(size_t));
    c.len = (size_t*)xmalloc(8192 * sizeof(size_t));
    if (!jsonl) {
        c.text = raw;
        c.start[0] = 0;
        c.len[0] = len;
        c.n = 1;
        return c;
    }
    c.text = (char*)xmalloc(len);
    size_t used = 0;
    JsonReader r = {"LAMBADA file", path, raw, 0, len};
    while (r.pos < len && c.n < 8192) {  // {"text": "..."} per line
        json_expect(&r, '{', "'{'");
        unsigned char key[16];
        size_t klen = json_string(&r, key, sizeof(key));
        if (klen != 4 || memcmp(key, "text", 4) != 0) json_fail(&r, "the key \"text\"");
        json_expect(&r, ':', "':'");
        size_t n = json_string(&r, (unsigned char*)c.text + used, len - used);
        json_expect(&r, '}', "'}'");
        json_skip_space(&r);
        c.start[c.n] = used;
        c.len[c.n++] = n;
        used += n;
    }
    free(raw);
    return c;
}

static void corpus_free(Corpus* c) { free(c->text); free(c->start); free(c->len); }

static int tokenizer_index(const char* name) {
    return strcmp(name, "gpt2") == 0 ? 0 : strcmp(name, "bert-lower") == 0 ? 1 : strcmp(name, "bert-case") == 0 ? 2 : -1;
}

static int corpus_index(const char* name) {
    return strcmp(name, "tinyshakespeare") == 0 ? 0 : strcmp(name, "wikitext2-test") == 0 ? 1 : strcmp(name, "lambada") == 0 ? 2 : -1;
}

static const char* corpus_names[3] = {"tinyshakespeare", "wikitext2-test", "lambada"};

// Parses "id id id ..." into ids; returns the count.
static size_t parse_ids(char* s, TokenList* ids) {
    ids->len = 0;
    for (char* p = strtok(s, " \n"); p; p = strtok(NULL, " \n")) token_list_push(ids, atoi(p));
    return ids->len;
}

static int hex_value(char c) { return c >= '0' && c <= '9' ? c - '0' : c - 'a' + 10; }

static int same_ids(const TokenList* got, const TokenList* want, size_t* first_diff) {
    size_t i = 0;
    while (i < got->len && i < want->len && got->ids[i] == want->ids[i]) i++;
    *first_diff = i;
    return got->len == want->len && i == got->len;
}

static void test_fixtures(Tokenizer** toks, Corpus* corpora) {
    char path[] = "test/fixtures/tokenizer.txt";
    if (!file_exists(path)) { check(0, "fixtures", "%s not found (run from the repo root)", path); return; }
    size_t len;
    char* text = tok_read_file(path, "fixture", &len);
    TokenList want = {0, 0, 0}, got = {0, 0, 0};
    int cases = 0, cases_ok = 0;
    char* save = NULL;
    for (char* line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char kind[16], tname[32], cname[32], hash_hex[32], unit[16];
        int consumed = 0;
        if (line[0] == '#') continue;
        sscanf(line, "%15s %31s%n", kind, tname, &consumed);
        int t = tokenizer_index(tname);
        if (t < 0 || !toks[t]) continue;
        char* rest = line + consumed;
        if (strcmp(kind, "case") == 0) {
            char hex[8192];
            sscanf(rest, " %8191s%n", hex, &consumed);
            size_t n = strcmp(hex, "-") == 0 ? 0 : strlen(hex) / 2;
            unsigned char input[4096];
            for (size_t i = 0; i < n; i++) input[i] = (unsigned char)(16 * hex_value(hex[2 * i]) + hex_value(hex[2 * i + 1]));
            parse_ids(rest + consumed, &want);
            got.len = 0;
            tokenizer_encode(toks[t], (const char*)input, n, &got);
            size_t at = 0;
            cases++;
            if (same_ids(&got, &want, &at)) cases_ok++;
            else printf("     %s case %s: %zu ids, want %zu, first difference at %zu (%d vs %d)\n", tname, hex, got.len, want.len, at,
                        at < got.len ? got.ids[at] : -1, at < want.len ? want.ids[at] : -1);
        } else if (strcmp(kind, "prefix") == 0) {
            size_t count;
            sscanf(rest, " %31s %zu %15s%n", cname, &count, unit, &consumed);
            Corpus* c = &corpora[corpus_index(cname)];
            if (!c->text) continue;
            parse_ids(rest + consumed, &want);
            got.len = 0;
            if (strcmp(unit, "bytes") == 0) tokenizer_encode(toks[t], c->text, count, &got);
            else for (size_t d = 0; d < count; d++) tokenizer_encode(toks[t], c->text + c->start[d], c->len[d], &got);
            size_t at = 0;
            int ok = same_ids(&got, &want, &at);
            char name[128];
            snprintf(name, sizeof(name), "%s %s first %zu %s: exact ids", tname, cname, count, unit);
            check(ok, name, "%zu ids, want %zu, first difference at %zu", got.len, want.len, at);
        } else if (strcmp(kind, "corpus") == 0) {
            size_t docs, tokens;
            sscanf(rest, " %31s %zu %zu %31s", cname, &docs, &tokens, hash_hex);
            Corpus* c = &corpora[corpus_index(cname)];
            char name[128];
            snprintf(name, sizeof(name), "%s %s: all %zu tokens", tname, cname, tokens);
            if (!c->text) { printf("skip %s: corpus not found in %s (set MEGATRON_DATA)\n", name, data_dir()); continue; }
            uint64_t h = 0xCBF29CE484222325ull;
            size_t n = 0;
            double t0 = now_seconds();
            for (size_t d = 0; d < c->n; d++) {
                got.len = 0;
                tokenizer_encode(toks[t], c->text + c->start[d], c->len[d], &got);
                h = fnv1a_docs_add(h, got.ids, got.len);
                n += got.len;
            }
            double seconds = now_seconds() - t0;
            size_t bytes = 0;
            for (size_t d = 0; d < c->n; d++) bytes += c->len[d];
            char got_hex[32];
            snprintf(got_hex, sizeof(got_hex), "%016llx", (unsigned long long)h);
            check(docs == c->n && n == tokens && strcmp(got_hex, hash_hex) == 0, name,
                  "%zu docs, %zu tokens, hash %s; want %zu docs, %zu tokens, hash %s", c->n, n, got_hex, docs, tokens, hash_hex);
            printf("     %.1f MB/s (one thread, fresh cache the first time)\n", bytes / 1e6 / seconds);
        }
    }
    check(cases > 0 && cases_ok == cases, "hand-picked strings", "%d of %d match", cases_ok, cases);
    free(want.ids);
    free(got.ids);
    free(text);
}

static void test_round_trip(const Tokenizer* gpt2, const Corpus* corpora) {
    const char* samples[] = {"Hello world", "  \n\n  x", "naïve café 中文 😀 \xc2\xa0 tab\tend ", "'s'S'll 1234567890", ""};
    int ok = 1;
    TokenList ids = {0, 0, 0};
    for (size_t k = 0; k < sizeof(samples) / sizeof(samples[0]); k++) {
        ids.len = 0;
        tokenizer_encode(gpt2, samples[k], strlen(samples[k]), &ids);
        char* back = tokenizer_decode(gpt2, ids.ids, ids.len);
        ok &= strcmp(back, samples[k]) == 0;
        free(back);
    }
    for (int c = 0; c < 3; c++) {
        if (!corpora[c].text) continue;
        const Corpus* cp = &corpora[c];
        size_t n = cp->n < 64 ? cp->n : 64;
        for (size_t d = 0; d < n; d++) {
            ids.len = 0;
            tokenizer_encode(gpt2, cp->text + cp->start[d], cp->len[d], &ids);
            char* back = tokenizer_decode(gpt2, ids.ids, ids.len);
            ok &= strlen(back) == cp->len[d] && memcmp(back, cp->text + cp->start[d], cp->len[d]) == 0;
            free(back);
        }
    }
    check(ok, "gpt2 decode(encode(x)) == x", "a round trip changed the text");
    // Invalid UTF-8 is replaced before encoding; a token cut inside a character decodes to U+FFFD.
    ids.len = 0;
    tokenizer_encode(gpt2, "a\xff" "b", 3, &ids);
    char* back = tokenizer_decode(gpt2, ids.ids, ids.len);
    int32_t half[1] = {tokenizer_token_id(gpt2, "\xe2")};  // first byte of a 3-byte character
    char* cut = tokenizer_decode(gpt2, half, 1);
    int32_t out_of_range[2] = {50257, -1};
    char* bad = tokenizer_decode(gpt2, out_of_range, 2);
    check(strcmp(back, "a\xef\xbf\xbd" "b") == 0 && half[0] >= 0 && strcmp(cut, "\xef\xbf\xbd") == 0 &&
              strcmp(bad, "\xef\xbf\xbd\xef\xbf\xbd") == 0,
          "gpt2 invalid UTF-8 -> U+FFFD", "got '%s', '%s', '%s'", back, cut, bad);
    free(back); free(cut); free(bad);
    free(ids.ids);
}

static void test_gpt2_basics(const Tokenizer* gpt2) {
    check(tokenizer_vocab_size(gpt2) == 50257 && tokenizer_eod(gpt2) == 50256 && tokenizer_token_id(gpt2, "<|endoftext|>") == 50256,
          "gpt2 vocab size 50257, eod 50256", "vocab %d eod %d", tokenizer_vocab_size(gpt2), tokenizer_eod(gpt2));
    check(tokenizer_type_from_name("GPT2BPETokenizer") == TOK_GPT2BPE && tokenizer_type_from_name("BertWordPieceLowerCase") == TOK_BERT_LOWER &&
              tokenizer_type_from_name("BertWordPieceCase") == TOK_BERT_CASE && tokenizer_type_from_name("SentencePiece") == -1,
          "tokenizer_type_from_name", "wrong types");
}

// Where Megatron's BERT (Google's code) differs from transformers' BertTokenizer: private-use and
// unassigned characters stay (Megatron drops only Cc/Cf), no NFC composition, and the special
// token strings in the text are split like any other text.
static void test_bert_megatron(const Tokenizer* lower, const Tokenizer* cased, const char* vocab_uncased) {
    TokenList ids = {0, 0, 0};
    int unk = tokenizer_token_id(lower, "[UNK]");
    tokenizer_encode(lower, "a\xee\x80\x80" "b", 5, &ids);  // a U+E000 b: one word, no cover -> [UNK]
    check(ids.len == 1 && ids.ids[0] == unk, "bert private-use char kept (Megatron's _is_control)", "%zu ids", ids.len);
    ids.len = 0;
    tokenizer_encode(cased, "e\xcc\x81", 3, &ids);  // e + U+0301: cased keeps the mark, uncomposed
    int e = tokenizer_token_id(cased, "e"), mark = tokenizer_token_id(cased, "##\xcc\x81");
    check(ids.len == 2 && ids.ids[0] == e && ids.ids[1] == mark, "bert cased: no NFC", "%zu ids (%d %d)", ids.len,
          ids.len > 0 ? ids.ids[0] : -1, ids.len > 1 ? ids.ids[1] : -1);
    ids.len = 0;
    tokenizer_encode(lower, "[CLS]", 5, &ids);
    check(ids.len > 1 && ids.ids[0] == tokenizer_token_id(lower, "["), "bert [CLS] in text is plain text", "%zu ids", ids.len);
    check(tokenizer_vocab_size(lower) == 30524 && tokenizer_token_id(lower, "[BOS]") == 30522 && tokenizer_token_id(lower, "[EOS]") == 30523 &&
              tokenizer_eod(lower) == -1 && tokenizer_vocab_size(cased) == 28998,
          "bert vocab size len(vocab)+2 ([BOS], [EOS])", "uncased %d, cased %d", tokenizer_vocab_size(lower), tokenizer_vocab_size(cased));
    Tokenizer* t5 = tokenizer_load(TOK_BERT_LOWER, vocab_uncased, NULL);
    tokenizer_add_extra_ids(t5, 100);
    check(tokenizer_vocab_size(t5) == 30624 && tokenizer_token_id(t5, "<extra_id_0>") == 30524 && tokenizer_token_id(t5, "<extra_id_99>") == 30623,
          "bert --vocab-extra-ids 100 (T5 sentinels)", "vocab %d", tokenizer_vocab_size(t5));
    tokenizer_free(t5);
    ids.len = 0;
    tokenizer_encode(lower, "Unaffable!", 10, &ids);  // una ##ffa ##ble !
    char* text = tokenizer_decode(lower, ids.ids, ids.len);
    check(ids.len == 4 && strcmp(text, "unaffable !") == 0, "bert decode joins ## pieces", "got '%s'", text);
    free(text);
    free(ids.ids);
}

typedef struct {
    const Tokenizer* tok;
    const Corpus* corpus;
    uint64_t hash;
} ThreadJob;

static void* thread_encode(void* p) {
    ThreadJob* job = (ThreadJob*)p;
    TokenList ids = {0, 0, 0};
    job->hash = 0xCBF29CE484222325ull;
    for (size_t d = 0; d < job->corpus->n; d++) {
        ids.len = 0;
        tokenizer_encode(job->tok, job->corpus->text + job->corpus->start[d], job->corpus->len[d], &ids);
        job->hash = fnv1a_docs_add(job->hash, ids.ids, ids.len);
    }
    free(ids.ids);
    return NULL;
}

static void test_threads(Tokenizer** toks, const Corpus* lambada) {
    if (!lambada->text) return;
    ThreadJob jobs[4];
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) {  // two threads on GPT-2 and two on BERT, at once
        jobs[i].tok = toks[i % 2];
        jobs[i].corpus = lambada;
        pthread_create(&threads[i], NULL, thread_encode, &jobs[i]);
    }
    for (int i = 0; i < 4; i++) pthread_join(threads[i], NULL);
    ThreadJob alone = {toks[0], lambada, 0};
    thread_encode(&alone);
    check(jobs[0].hash == jobs[2].hash && jobs[1].hash == jobs[3].hash && jobs[0].hash == alone.hash, "4 threads share a tokenizer",
          "hashes differ");
}

// Runs tokenizer_load in a child: it must exit non-zero with one line on stderr containing want.
static void expect_load_error(const char* name, int type, const char* vocab, const char* merges, const char* want) {
    char err_path[] = "/tmp/test_tokenizer_err_XXXXXX";
    int fd = mkstemp(err_path);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd, 2);
        tokenizer_load(type, vocab, merges);
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    size_t len;
    char* err = tok_read_file(err_path, "stderr capture", &len);
    int lines = 0;
    for (size_t i = 0; i < len; i++) lines += err[i] == '\n';
    check(WIFEXITED(status) && WEXITSTATUS(status) != 0 && lines == 1 && strstr(err, want), name, "status %d, stderr: %s", status, err);
    free(err);
    close(fd);
    unlink(err_path);
}

static void write_file(const char* path, const char* text) {
    FILE* f = fopen(path, "wb");
    fputs(text, f);
    fclose(f);
}

static void test_bad_files(const char* encoder, const char* merges) {
    const char* dir = "/tmp";
    char vj[256], vb[256], vt[256];
    snprintf(vj, sizeof(vj), "%s/test_tokenizer_%d.json", dir, (int)getpid());
    snprintf(vb, sizeof(vb), "%s/test_tokenizer_%d.bpe", dir, (int)getpid());
    snprintf(vt, sizeof(vt), "%s/test_tokenizer_%d.txt", dir, (int)getpid());
    expect_load_error("missing vocab file", TOK_GPT2BPE, "/nonexistent/encoder.json", merges, "cannot open GPT-2 vocab file");
    expect_load_error("missing merge file", TOK_GPT2BPE, encoder, "/nonexistent/vocab.bpe", "cannot open GPT-2 merge file");
    write_file(vj, "{\"a\": 0,\n \"b\": }");
    expect_load_error("encoder.json: bad value", TOK_GPT2BPE, vj, merges, "at line 2");
    write_file(vj, "{\"a\": 0, \"b\": 0}");
    expect_load_error("encoder.json: repeated id", TOK_GPT2BPE, vj, merges, "appears twice");
    write_file(vj, "[1, 2]");
    expect_load_error("encoder.json: not an object", TOK_GPT2BPE, vj, merges, "expected '{'");
    write_file(vj, "{\"a\": 0, \"b\": 1}");
    expect_load_error("encoder.json: byte tokens missing", TOK_GPT2BPE, vj, merges, "has no token for byte");
    write_file(vb, "#version: 0.2\n\xc4\xa0 t\nonlyone\n");
    expect_load_error("vocab.bpe: one token on a line", TOK_GPT2BPE, encoder, vb, "at line 3");
    write_file(vb, "#version: 0.2\n\xc4\xa0 t\nzzzz qqqq\n");
    expect_load_error("vocab.bpe: unknown merge", TOK_GPT2BPE, encoder, vb, "line 3");
    write_file(vt, "[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\nthe\n[MASK]\n");
    expect_load_error("vocab.txt: repeated token", TOK_BERT_LOWER, vt, NULL, "at line 6");
    write_file(vt, "[PAD]\n[UNK]\nthe\n");
    expect_load_error("vocab.txt: no [CLS]", TOK_BERT_LOWER, vt, NULL, "no [CLS]");
    unlink(vj); unlink(vb); unlink(vt);
}

static void test_split_sentences(void) {
    const char* text = "  Mr. Smith went to Washington. He arrived at 5 p.m. on Tuesday! Did J. R. R. Tolkien write it?\n"
                       "\"Yes,\" she said. \"It was great.\" Then... nothing\n\n"
                       "A new paragraph without a full stop\n  \nLast one e.g. this. ";
    const char* want[] = {"Mr. Smith went to Washington.", "He arrived at 5 p.m. on Tuesday!", "Did J. R. R. Tolkien write it?",
                          "\"Yes,\" she said.", "\"It was great.\"", "Then... nothing", "A new paragraph without a full stop",
                          "Last one e.g. this."};
    size_t starts[16], lens[16];
    size_t n = split_sentences(text, strlen(text), starts, lens, 16);
    int ok = n == 8;
    for (size_t i = 0; ok && i < n; i++) ok = lens[i] == strlen(want[i]) && memcmp(text + starts[i], want[i], lens[i]) == 0;
    if (!ok) for (size_t i = 0; i < n && i < 16; i++) printf("     sentence %zu: '%.*s'\n", i, (int)lens[i], text + starts[i]);
    check(ok, "split_sentences", "%zu sentences, want 8", n);
    check(split_sentences(text, strlen(text), starts, lens, 2) == 8 && split_sentences(" \n\t ", 4, starts, lens, 16) == 0 &&
              split_sentences("no end", 6, starts, lens, 16) == 1 && lens[0] == 6,
          "split_sentences counts past max, skips blank text", "wrong count");
}

int main(void) {
    char encoder[1024], merges[1024], uncased[1024], cased[1024];
    snprintf(encoder, sizeof(encoder), "%s/gpt2/encoder.json", data_dir());
    snprintf(merges, sizeof(merges), "%s/gpt2/vocab.bpe", data_dir());
    snprintf(uncased, sizeof(uncased), "%s/bert/vocab-uncased.txt", data_dir());
    snprintf(cased, sizeof(cased), "%s/bert/vocab-cased.txt", data_dir());
    test_split_sentences();
    if (!file_exists(encoder) || !file_exists(merges) || !file_exists(uncased) || !file_exists(cased)) {
        printf("skip tokenizer tests: vocabularies not found in %s (set MEGATRON_DATA)\n", data_dir());
        return test_summary();
    }
    Tokenizer* toks[3] = {tokenizer_load(TOK_GPT2BPE, encoder, merges), tokenizer_load(TOK_BERT_LOWER, uncased, NULL),
                          tokenizer_load(TOK_BERT_CASE, cased, NULL)};
    Corpus corpora[3];
    for (int c = 0; c < 3; c++) corpora[c] = corpus_load(corpus_names[c]);
    test_gpt2_basics(toks[0]);
    test_fixtures(toks, corpora);
    test_round_trip(toks[0], corpora);
    test_bert_megatron(toks[1], toks[2], uncased);
    test_threads(toks, &corpora[2]);
    test_bad_files(encoder, merges);
    for (int c = 0; c < 3; c++) corpus_free(&corpora[c]);
    for (int t = 0; t < 3; t++) tokenizer_free(toks[t]);
    return test_summary();
}
