/*
tokenizer.h: Megatron's tokenizers (megatron/tokenizer/) in C, for prepro/ and the trainers.

- GPT2BPETokenizer: OpenAI's byte-level BPE from encoder.json + vocab.bpe. Text is cut into
  pre-tokens by GPT-2's regex, each pre-token's UTF-8 bytes are merged pair by pair, lowest
  merge rank first, and the final pieces are looked up in encoder.json. Ids equal tiktoken's
  `gpt2` encode_ordinary and Hugging Face's GPT2TokenizerFast.
- BertWordPieceLowerCase / BertWordPieceCase: Google BERT's FullTokenizer, which Megatron
  copies (bert_tokenization.py): clean-up, CJK spacing, whitespace split, lower-case and accent
  stripping (LowerCase only), punctuation split, greedy longest-match WordPiece.
- split_sentences: a rule-based stand-in for NLTK punkt (preprocess_data.py --split-sentences).

Input text is UTF-8 bytes. Megatron's tokenizers work on Python str, i.e. on text already
decoded from UTF-8; we decode like Python's bytes.decode('utf-8', errors='replace'): each
maximal invalid subsequence (Unicode's "maximal subpart" rule, as CPython does it) becomes one
U+FFFD. GPT-2 then encodes U+FFFD as its UTF-8 bytes EF BF BD; BERT's clean-up drops it.

Character classes come from prepro/unicode_tables.h, generated from Python's unicodedata
(Unicode 14.0 in Python 3.11). tiktoken and HF tokenizers use their regex engines' (newer)
tables: GPT-2 ids can differ only on characters assigned (or re-classified) after Unicode 14.

BERT follows Megatron's copy of Google's code where Hugging Face's BertTokenizer differs: the
clean-up drops only Cc/Cf characters (HF: every C*, so also private-use and unassigned ones),
there is no NFC composition first (HF composes, which matters for BertWordPieceCase on
decomposed text), words over 200 characters become [UNK] (HF: 100), and "[CLS]" etc. in the
text are plain text (HF keeps them whole). HF's Rust `tokenizers` lower-cases without Python's
final-sigma rule; we follow Python's str.lower().

Threads: a Tokenizer is read-only after tokenizer_load / tokenizer_add_extra_ids, so several
threads may call tokenizer_encode on one Tokenizer at once. Each thread keeps its own cache of
pre-token -> ids (text repeats words a lot), found through a pthread key of the Tokenizer.
*/
#ifndef MEGATRON_TOKENIZER_H
#define MEGATRON_TOKENIZER_H

#include <pthread.h>

#include "../megatron.h"
#include "unicode_tables.h"

enum { TOK_GPT2BPE, TOK_BERT_LOWER, TOK_BERT_CASE };
typedef struct Tokenizer Tokenizer;
typedef struct { int32_t* ids; size_t len, cap; } TokenList;  // growable; start zeroed, free(ids) when done

static void token_list_push(TokenList* out, int32_t id) {
    if (out->len == out->cap) {
        out->cap = out->cap ? 2 * out->cap : 256;
        out->ids = (int32_t*)realloc(out->ids, out->cap * sizeof(int32_t));
        if (!out->ids) die("out of host memory growing a token list to %zu ids", out->cap);
    }
    out->ids[out->len++] = id;
}

// ----------------------------------------------------------------------------
// UTF-8

// Length of the well-formed UTF-8 sequence at s[0..n) (Unicode Table 3-7), or 0 if there is
// none; then *bad is the length of the maximal subpart to replace by one U+FFFD.
static int utf8_sequence(const unsigned char* s, size_t n, int* bad) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    int need = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
    unsigned char lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80;  // bounds of the second byte
    unsigned char hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
    int k = 1;
    while (k < need && (size_t)k < n && s[k] >= (k == 1 ? lo : 0x80) && s[k] <= (k == 1 ? hi : 0xBF)) k++;
    if (need && k == need) return need;
    *bad = k;
    return 0;
}

// The code point of the (valid) UTF-8 sequence at s; *len gets its length.
static inline uint32_t utf8_decode(const unsigned char* s, int* len) {
    if (s[0] < 0x80) { *len = 1; return s[0]; }
    if (s[0] < 0xE0) { *len = 2; return ((s[0] & 0x1Fu) << 6) | (s[1] & 0x3Fu); }
    if (s[0] < 0xF0) { *len = 3; return ((s[0] & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu); }
    *len = 4;
    return ((s[0] & 0x07u) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) | (s[3] & 0x3Fu);
}

static int utf8_encode(uint32_t cp, unsigned char* out) {
    if (cp < 0x80) { out[0] = (unsigned char)cp; return 1; }
    if (cp < 0x800) { out[0] = 0xC0 | (cp >> 6); out[1] = 0x80 | (cp & 0x3F); return 2; }
    if (cp < 0x10000) {
        out[0] = 0xE0 | (cp >> 12); out[1] = 0x80 | ((cp >> 6) & 0x3F); out[2] = 0x80 | (cp & 0x3F);
        return 3;
    }
    out[0] = 0xF0 | (cp >> 18); out[1] = 0x80 | ((cp >> 12) & 0x3F);
    out[2] = 0x80 | ((cp >> 6) & 0x3F); out[3] = 0x80 | (cp & 0x3F);
    return 4;
}

// NULL if text is valid UTF-8, else a malloc'd copy (length *out_len) with each maximal invalid
// subpart replaced by U+FFFD: Python's decode(errors='replace').
static unsigned char* utf8_replace_invalid(const unsigned char* text, size_t len, size_t* out_len) {
    size_t i = 0;
    int k, bad = 0;
    while (i < len && (k = text[i] < 0x80 ? 1 : utf8_sequence(text + i, len - i, &bad))) i += k;
    if (i == len) return NULL;
    unsigned char* out = (unsigned char*)xmalloc(3 * len);  // each bad byte grows to at most 3
    memcpy(out, text, i);
    size_t o = i;
    while (i < len) {
        int n = utf8_sequence(text + i, len - i, &bad);
        if (n) { memcpy(out + o, text + i, n); o += n; i += n; }
        else { o += utf8_encode(0xFFFD, out + o); i += bad; }
    }
    *out_len = o;
    return out;
}

// ----------------------------------------------------------------------------
// Unicode character data (see prepro/gen_unicode_tables.py)

static inline int uc_flags(uint32_t cp) {
    return cp < 0x110000 ? uc_blocks[uc_block_index[cp / UC_BLOCK]][cp % UC_BLOCK] : 0;
}

static int uc_in_ranges(const uint32_t (*ranges)[2], int n, uint32_t cp) {
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < ranges[mid][0]) hi = mid - 1;
        else if (cp > ranges[mid][1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

// ----------------------------------------------------------------------------
// A vocabulary: token strings (bytes) <-> ids 0..n-1, with an open-addressing hash index.

typedef struct {
    char* pool;  // token bytes, back to back
    size_t pool_len, pool_cap;
    size_t* off;
    uint32_t* len;
    int n, cap;
    int32_t* slots;  // id + 1, 0 = empty
    size_t mask;
} TokVocab;

static uint64_t tok_hash(const unsigned char* s, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xD6E8FEB86659FD93ull);
    for (; n >= 8; s += 8, n -= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 29;
    }
    uint64_t w = 0;
    memcpy(&w, s, n);
    h = (h ^ w) * 0x94D049BB133111EBull;
    return h ^ (h >> 31);
}

static int tok_vocab_find(const TokVocab* v, const void* s, size_t n) {
    if (!v->slots) return -1;
    for (size_t i = tok_hash((const unsigned char*)s, n) & v->mask;; i = (i + 1) & v->mask) {
        int32_t id = v->slots[i] - 1;
        if (id < 0) return -1;
        if (v->len[id] == n && memcmp(v->pool + v->off[id], s, n) == 0) return id;
    }
}

static void tok_vocab_index(TokVocab* v, int id) {
    size_t i = tok_hash((const unsigned char*)v->pool + v->off[id], v->len[id]) & v->mask;
    while (v->slots[i]) i = (i + 1) & v->mask;
    v->slots[i] = id + 1;
}

// Adds a token with the next id; returns -1-id_of_existing when it is already there.
static int tok_vocab_add(TokVocab* v, const void* s, size_t n) {
    int existing = tok_vocab_find(v, s, n);
    if (existing >= 0) return -1 - existing;
    if (v->n == v->cap) {
        v->cap = v->cap ? 2 * v->cap : 1024;
        v->off = (size_t*)realloc(v->off, v->cap * sizeof(size_t));
        v->len = (uint32_t*)realloc(v->len, v->cap * sizeof(uint32_t));
        if (!v->off || !v->len) die("out of host memory loading a vocabulary");
    }
    if (v->pool_len + n > v->pool_cap) {
        v->pool_cap = 2 * (v->pool_len + n) + 4096;
        v->pool = (char*)realloc(v->pool, v->pool_cap);
        if (!v->pool) die("out of host memory loading a vocabulary");
    }
    memcpy(v->pool + v->pool_len, s, n);
    v->off[v->n] = v->pool_len;
    v->len[v->n] = (uint32_t)n;
    v->pool_len += n;
    int id = v->n++;
    if (2 * (size_t)v->n > v->mask) {  // keep the index at most half full
        free(v->slots);
        v->mask = v->mask ? 2 * v->mask + 1 : 4095;
        v->slots = (int32_t*)xcalloc(v->mask + 1, sizeof(int32_t));
        for (int j = 0; j < v->n; j++) tok_vocab_index(v, j);
    } else {
        tok_vocab_index(v, id);
    }
    return id;
}

static void tok_vocab_free(TokVocab* v) {
    free(v->pool); free(v->off); free(v->len); free(v->slots);
}

// ----------------------------------------------------------------------------
// Per-thread cache: pre-token (GPT-2) or word (BERT) bytes -> ids, plus merge scratch space.

#define TOK_CACHE_SLOTS (1 << 16)
#define TOK_CACHE_KEY_BYTES (1 << 20)
#define TOK_CACHE_IDS (1 << 18)
#define TOK_CACHE_MAX_KEY 256  // longer pieces are not cached

typedef struct {
    uint64_t hash;
    uint32_t key_off, ids_off;
    uint16_t key_len, n_ids;  // key_len 0 = empty slot
} TokCacheSlot;

typedef struct TokCacheRegistry TokCacheRegistry;
typedef struct {
    TokCacheSlot* slots;
    size_t used;
    unsigned char* keys;
    size_t keys_len;
    int32_t* ids;
    size_t ids_len;
    // BPE merge scratch, grown to the longest pre-token seen
    int32_t* sym;
    int32_t *next, *prev;
    uint64_t* heap;
    size_t scratch_cap;
    // BERT: code points of the current whitespace-separated token, and its lower-cased form
    uint32_t *word, *folded;
    size_t word_cap;
    TokCacheRegistry* registry;
} TokCache;

struct TokCacheRegistry {  // every thread's cache of one Tokenizer, freed with it
    pthread_mutex_t lock;
    pthread_key_t key;
    TokCache** caches;
    int n, cap;
};

static TokCache* tok_cache_new(void) {
    TokCache* c = (TokCache*)xcalloc(1, sizeof(TokCache));
    c->slots = (TokCacheSlot*)xcalloc(TOK_CACHE_SLOTS, sizeof(TokCacheSlot));
    c->keys = (unsigned char*)xmalloc(TOK_CACHE_KEY_BYTES);
    c->ids = (int32_t*)xmalloc(TOK_CACHE_IDS * sizeof(int32_t));
    return c;
}

static void tok_cache_free(TokCache* c) {
    free(c->slots); free(c->keys); free(c->ids);
    free(c->sym); free(c->next); free(c->prev); free(c->heap);
    free(c->word); free(c->folded);
    free(c);
}

static void tok_cache_thread_exit(void* p) {
    TokCache* c = (TokCache*)p;
    TokCacheRegistry* r = c->registry;
    pthread_mutex_lock(&r->lock);
    for (int i = 0; i < r->n; i++)
        if (r->caches[i] == c) { r->caches[i] = r->caches[--r->n]; break; }
    pthread_mutex_unlock(&r->lock);
    tok_cache_free(c);
}

static TokCache* tok_cache_for_thread(TokCacheRegistry* r) {
    TokCache* c = (TokCache*)pthread_getspecific(r->key);
    if (c) return c;
    c = tok_cache_new();
    c->registry = r;
    pthread_mutex_lock(&r->lock);
    if (r->n == r->cap) {
        r->cap = r->cap ? 2 * r->cap : 16;
        r->caches = (TokCache**)realloc(r->caches, r->cap * sizeof(TokCache*));
        if (!r->caches) die("out of host memory");
    }
    r->caches[r->n++] = c;
    pthread_mutex_unlock(&r->lock);
    pthread_setspecific(r->key, c);
    return c;
}

// Finds key in the cache: returns its ids (count in *n) or NULL.
static const int32_t* tok_cache_get(const TokCache* c, const unsigned char* key, size_t len, uint64_t hash, size_t* n) {
    for (size_t i = hash & (TOK_CACHE_SLOTS - 1);; i = (i + 1) & (TOK_CACHE_SLOTS - 1)) {
        const TokCacheSlot* s = &c->slots[i];
        if (!s->key_len) return NULL;
        if (s->hash == hash && s->key_len == len && memcmp(c->keys + s->key_off, key, len) == 0) {
            *n = s->n_ids;
            return c->ids + s->ids_off;
        }
    }
}

static void tok_cache_put(TokCache* c, const unsigned char* key, size_t len, uint64_t hash, const int32_t* ids, size_t n) {
    if (len > TOK_CACHE_MAX_KEY || n > len) return;
    if (2 * (c->used + 1) > TOK_CACHE_SLOTS || c->keys_len + len > TOK_CACHE_KEY_BYTES || c->ids_len + n > TOK_CACHE_IDS) {
        memset(c->slots, 0, TOK_CACHE_SLOTS * sizeof(TokCacheSlot));  // full: start over
        c->used = c->keys_len = c->ids_len = 0;
    }
    size_t i = hash & (TOK_CACHE_SLOTS - 1);
    while (c->slots[i].key_len) i = (i + 1) & (TOK_CACHE_SLOTS - 1);
    TokCacheSlot* s = &c->slots[i];
    s->hash = hash;
    s->key_off = (uint32_t)c->keys_len;
    s->key_len = (uint16_t)len;
    s->ids_off = (uint32_t)c->ids_len;
    s->n_ids = (uint16_t)n;
    memcpy(c->keys + c->keys_len, key, len);
    memcpy(c->ids + c->ids_len, ids, n * sizeof(int32_t));
    c->keys_len += len;
    c->ids_len += n;
    c->used++;
}

static void tok_cache_reserve(TokCache* c, size_t n) {
    if (n <= c->scratch_cap) return;
    c->scratch_cap = 2 * n;
    free(c->sym); free(c->next); free(c->prev); free(c->heap);
    c->sym = (int32_t*)xmalloc(c->scratch_cap * sizeof(int32_t));
    c->next = (int32_t*)xmalloc(c->scratch_cap * sizeof(int32_t));
    c->prev = (int32_t*)xmalloc(c->scratch_cap * sizeof(int32_t));
    c->heap = (uint64_t*)xmalloc(3 * c->scratch_cap * sizeof(uint64_t));
}

// ----------------------------------------------------------------------------
// The tokenizer

typedef struct {
    uint64_t key;  // bpe_key(left id, right id); 0 = empty slot
    int32_t rank, merged;
} BpeMerge;

struct Tokenizer {
    int type;
    TokVocab vocab;  // GPT-2: raw token bytes; BERT: token text (UTF-8)
    // GPT-2
    int32_t byte_id[256];         // id of each single byte
    int16_t byte_of_char[0x144];  // bytes_to_unicode inverted: code point -> byte, -1 if none
    BpeMerge* merges;             // open-addressing table of the merge rules, by pair
    size_t merges_mask;
    int eod;
    // BERT
    int lower, unk_id, max_piece_bytes;
    TokCacheRegistry* caches;
};

static int tokenizer_type_from_name(const char* name) {
    if (strcmp(name, "GPT2BPETokenizer") == 0) return TOK_GPT2BPE;
    if (strcmp(name, "BertWordPieceLowerCase") == 0) return TOK_BERT_LOWER;
    if (strcmp(name, "BertWordPieceCase") == 0) return TOK_BERT_CASE;
    return -1;
}

// Megatron's vocab_size: GPT-2 len(encoder) (50257); BERT len(vocab) + [BOS] + [EOS] (+ extra ids).
static int tokenizer_vocab_size(const Tokenizer* tok) { return tok->vocab.n; }

// GPT-2's <|endoftext|> (50256). Megatron's BERT tokenizer has no eod: -1.
static int tokenizer_eod(const Tokenizer* tok) { return tok->eod; }

// The id of a token string ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "[BOS]", "[EOS]",
// "<extra_id_0>", "<|endoftext|>", ...), -1 if it is not in the vocabulary.
static int tokenizer_token_id(const Tokenizer* tok, const char* token) {
    return tok_vocab_find(&tok->vocab, token, strlen(token));
}

// The bytes of token id (*len of them), NULL for an id out of range.
static const char* tokenizer_token_bytes(const Tokenizer* tok, int id, size_t* len) {
    if (id < 0 || id >= tok->vocab.n) return NULL;
    *len = tok->vocab.len[id];
    return tok->vocab.pool + tok->vocab.off[id];
}

static char* tok_read_file(const char* path, const char* what, size_t* len) {
    if (!path) die("no %s given", what);
    FILE* f = fopen(path, "rb");
    if (!f) die("cannot open %s '%s': %s", what, path, strerror(errno));
    size_t cap = 1 << 20, n = 0, got;
    char* buf = (char*)xmalloc(cap + 1);
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            cap *= 2;
            buf = (char*)realloc(buf, cap + 1);
            if (!buf) die("out of host memory reading %s '%s'", what, path);
        }
    }
    if (ferror(f)) die("cannot read %s '%s': %s", what, path, strerror(errno));
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

static int tok_is_blank(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; }

static int tok_line_of(const char* text, size_t offset) {
    int line = 1;
    for (size_t i = 0; i < offset; i++) line += text[i] == '\n';
    return line;
}

// GPT-2's bytes_to_unicode: bytes that are printable Latin-1 characters stand for themselves,
// the other 68 bytes are U+0100 + k in byte order. Returns the code point of byte b.
static int gpt2_byte_is_printable(int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); }

static uint32_t gpt2_byte_char(int b) {
    if (gpt2_byte_is_printable(b)) return (uint32_t)b;
    int k = 0;
    for (int i = 0; i < b; i++) k += !gpt2_byte_is_printable(i);
    return 0x100 + k;
}

// The inverse, on a string of such characters: writes the raw bytes to out, returns their
// count, or -1 if a character is not one of the 256.
static int gpt2_chars_to_bytes(const Tokenizer* tok, const unsigned char* s, size_t n, unsigned char* out) {
    int m = 0;
    for (size_t i = 0; i < n;) {
        int bad, len = utf8_sequence(s + i, n - i, &bad);
        if (!len) return -1;
        uint32_t cp = utf8_decode(s + i, &len);
        if (cp >= 0x144 || tok->byte_of_char[cp] < 0) return -1;
        out[m++] = (unsigned char)tok->byte_of_char[cp];
        i += len;
    }
    return m;
}

// ---- encoder.json: one JSON object of "token": id

typedef struct {
    const char* what;  // for errors: "GPT-2 vocab file"
    const char* path;
    const char* text;
    size_t pos, len;
} JsonReader;

static void json_fail(const JsonReader* r, const char* expected) {
    die("malformed %s '%s' at line %d (byte %zu): expected %s", r->what, r->path, tok_line_of(r->text, r->pos), r->pos, expected);
}

static void json_skip_space(JsonReader* r) {
    while (r->pos < r->len && r->text[r->pos] && strchr(" \t\r\n", r->text[r->pos])) r->pos++;
}

static int json_hex4(JsonReader* r) {
    if (r->pos + 4 > r->len) json_fail(r, "4 hex digits after \\u");
    int v = 0;
    for (int i = 0; i < 4; i++) {
        char c = r->text[r->pos++];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) { r->pos--; json_fail(r, "a hex digit"); }
        v = 16 * v + d;
    }
    return v;
}

// Reads a JSON string into out (UTF-8, at most cap bytes); returns its length.
static size_t json_string(JsonReader* r, unsigned char* out, size_t cap) {
    json_skip_space(r);
    if (r->pos >= r->len || r->text[r->pos] != '"') json_fail(r, "a string");
    r->pos++;
    size_t n = 0;
    for (;;) {
        if (r->pos >= r->len) json_fail(r, "a closing quote");
        if (n + 4 > cap) json_fail(r, "a shorter token");
        unsigned char c = (unsigned char)r->text[r->pos++];
        if (c == '"') return n;
        if (c < 0x20) { r->pos--; json_fail(r, "no control character inside a string"); }
        if (c != '\\') { out[n++] = c; continue; }
        if (r->pos >= r->len) json_fail(r, "an escape");
        c = (unsigned char)r->text[r->pos++];
        const char* from = "\"\\/bfnrt";
        const char* to = "\"\\/\b\f\n\r\t";
        const char* e = c ? strchr(from, c) : NULL;
        if (e) { out[n++] = (unsigned char)to[e - from]; continue; }
        if (c != 'u') { r->pos--; json_fail(r, "a valid escape"); }
        uint32_t cp = (uint32_t)json_hex4(r);
        if (cp >= 0xD800 && cp <= 0xDBFF && r->pos + 6 <= r->len && r->text[r->pos] == '\\' && r->text[r->pos + 1] == 'u') {
            r->pos += 2;
            uint32_t low = (uint32_t)json_hex4(r);
            if (low < 0xDC00 || low > 0xDFFF) json_fail(r, "a low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        }
        if (cp >= 0xD800 && cp <= 0xDFFF) json_fail(r, "no lone surrogate");
        n += utf8_encode(cp, out + n);
    }
}

static long json_int(JsonReader* r) {
    json_skip_space(r);
    size_t start = r->pos;
    long v = 0;
    while (r->pos < r->len && r->text[r->pos] >= '0' && r->text[r->pos] <= '9' && v < 100000000)
        v = 10 * v + (r->text[r->pos++] - '0');
    if (r->pos == start || v >= 100000000) { r->pos = start; json_fail(r, "a token id (a non-negative integer)"); }
    return v;
}

static void json_expect(JsonReader* r, char c, const char* what) {
    json_skip_space(r);
    if (r->pos >= r->len || r->text[r->pos] != c) json_fail(r, what);
    r->pos++;
}

typedef struct {
    long id;
    size_t off, len;  // the token's bytes in the reader's byte buffer
    size_t at;        // where the entry starts in the file, for errors
} EncoderEntry;

static void gpt2_load_encoder(Tokenizer* tok, const char* path) {
    size_t len;
    char* text = tok_read_file(path, "GPT-2 vocab file (encoder.json)", &len);
    JsonReader r = {"GPT-2 vocab file", path, text, 0, len};
    size_t n = 0, cap = 1024;
    EncoderEntry* entries = (EncoderEntry*)xmalloc(cap * sizeof(EncoderEntry));
    unsigned char* bytes = (unsigned char*)xmalloc(len);  // token bytes are shorter than their JSON
    size_t bytes_len = 0;
    unsigned char key[1024];
    json_expect(&r, '{', "'{' (a JSON object of token: id)");
    json_skip_space(&r);
    if (r.pos < len && text[r.pos] == '}') json_fail(&r, "at least one token");
    for (;;) {
        if (n == cap) {
            cap *= 2;
            entries = (EncoderEntry*)realloc(entries, cap * sizeof(EncoderEntry));
            if (!entries) die("out of host memory reading '%s'", path);
        }
        EncoderEntry* e = &entries[n++];
        json_skip_space(&r);
        e->at = r.pos;
        size_t key_len = json_string(&r, key, sizeof(key));
        int m = gpt2_chars_to_bytes(tok, key, key_len, bytes + bytes_len);
        if (m < 0) { r.pos = e->at; json_fail(&r, "a token made of GPT-2's 256 byte characters"); }
        e->off = bytes_len;
        e->len = m;
        bytes_len += m;
        json_expect(&r, ':', "':'");
        e->id = json_int(&r);
        json_skip_space(&r);
        if (r.pos < len && text[r.pos] == ',') { r.pos++; continue; }
        json_expect(&r, '}', "',' or '}'");
        break;
    }
    json_skip_space(&r);
    if (r.pos != len) json_fail(&r, "the end of the file after the object");
    // The ids must be 0..n-1, each once; the vocabulary takes the tokens in id order.
    size_t* entry_of_id = (size_t*)xmalloc(n * sizeof(size_t));
    for (size_t i = 0; i < n; i++) entry_of_id[i] = n;
    for (size_t i = 0; i < n; i++) {
        const EncoderEntry* e = &entries[i];
        if (e->id >= (long)n || entry_of_id[e->id] != n)
            die("malformed GPT-2 vocab file '%s' at line %d: id %ld %s", path, tok_line_of(text, e->at), e->id,
                e->id >= (long)n ? "out of range (ids must be 0..number of tokens - 1)" : "appears twice");
        entry_of_id[e->id] = i;
    }
    for (size_t id = 0; id < n; id++) {
        const EncoderEntry* e = &entries[entry_of_id[id]];
        if (tok_vocab_add(&tok->vocab, bytes + e->off, e->len) < 0)
            die("malformed GPT-2 vocab file '%s' at line %d: token appears twice", path, tok_line_of(text, e->at));
    }
    free(entry_of_id); free(entries); free(bytes); free(text);
}

// ---- vocab.bpe: "#version" line, then one merge "left right" per line, rank = order

static BpeMerge* bpe_merge_slot(const Tokenizer* tok, uint64_t key) {
    size_t i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 20) & tok->merges_mask;
    while (tok->merges[i].key && tok->merges[i].key != key) i = (i + 1) & tok->merges_mask;
    return &tok->merges[i];
}

static inline uint64_t bpe_key(int32_t left, int32_t right) {
    return ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) + 1;  // +1: key 0 marks an empty slot
}

// The next whitespace-separated field of [*p, end): returns its start, sets its end in *p.
static const char* tok_next_field(const char** p, const char* end) {
    const char* a = *p;
    while (a < end && tok_is_blank(*a)) a++;
    const char* b = a;
    while (b < end && !tok_is_blank(*b)) b++;
    *p = b;
    return a;
}

static void gpt2_load_merges(Tokenizer* tok, const char* path) {
    size_t len;
    char* text = tok_read_file(path, "GPT-2 merge file (vocab.bpe)", &len);
    size_t n_lines = 0;
    for (size_t i = 0; i < len; i++) n_lines += text[i] == '\n';
    size_t cap = 1024;
    while (cap < 2 * n_lines + 2) cap *= 2;
    tok->merges = (BpeMerge*)xcalloc(cap, sizeof(BpeMerge));
    tok->merges_mask = cap - 1;
    // Like Megatron (and tiktoken): split('\n')[1:-1], i.e. the first line (#version) and
    // whatever follows the last newline are not merges.
    const char* eof = text + len;
    const char* line = (const char*)memchr(text, '\n', len);
    if (!line) die("malformed GPT-2 merge file '%s': no merges after the first line", path);
    unsigned char left[1024], right[1024];
    int rank = 0;
    for (int lineno = 2;; lineno++, rank++) {
        const char* p = line + 1;
        line = (const char*)memchr(p, '\n', eof - p);
        if (!line) break;
        const char* a = tok_next_field(&p, line);
        const char* a_end = p;
        const char* b = tok_next_field(&p, line);
        const char* b_end = p;
        const char* rest = tok_next_field(&p, line);
        if (a == a_end || b == b_end || rest != line || a_end - a > 512 || b_end - b > 512)
            die("malformed GPT-2 merge file '%s' at line %d: expected two tokens separated by a space", path, lineno);
        int na = gpt2_chars_to_bytes(tok, (const unsigned char*)a, a_end - a, left);
        int nb = gpt2_chars_to_bytes(tok, (const unsigned char*)b, b_end - b, right);
        if (na < 0 || nb < 0) die("malformed GPT-2 merge file '%s' at line %d: a token is not made of GPT-2's 256 byte characters", path, lineno);
        memcpy(left + na, right, nb);
        int id_a = tok_vocab_find(&tok->vocab, left, na), id_b = tok_vocab_find(&tok->vocab, right, nb);
        int id_ab = tok_vocab_find(&tok->vocab, left, na + nb);
        if (id_a < 0 || id_b < 0 || id_ab < 0)
            die("GPT-2 merge file '%s' line %d: merge '%.*s %.*s' uses a token missing from the vocab file", path, lineno,
                (int)(a_end - a), a, (int)(b_end - b), b);
        BpeMerge* m = bpe_merge_slot(tok, bpe_key(id_a, id_b));
        m->key = bpe_key(id_a, id_b);  // a repeated merge takes its last rank, as Python's dict does
        m->rank = rank;
        m->merged = id_ab;
    }
    free(text);
}

static Tokenizer* gpt2_load(const char* vocab_file, const char* merge_file) {
    Tokenizer* tok = (Tokenizer*)xcalloc(1, sizeof(Tokenizer));
    tok->type = TOK_GPT2BPE;
    for (int i = 0; i < 0x144; i++) tok->byte_of_char[i] = -1;
    for (int b = 0; b < 256; b++) tok->byte_of_char[gpt2_byte_char(b)] = (int16_t)b;
    gpt2_load_encoder(tok, vocab_file);
    for (int b = 0; b < 256; b++) {
        unsigned char c = (unsigned char)b;
        tok->byte_id[b] = tok_vocab_find(&tok->vocab, &c, 1);
        if (tok->byte_id[b] < 0) die("GPT-2 vocab file '%s' has no token for byte 0x%02x", vocab_file, b);
    }
    gpt2_load_merges(tok, merge_file);
    tok->eod = tokenizer_token_id(tok, "<|endoftext|>");
    if (tok->eod < 0) die("GPT-2 vocab file '%s' has no <|endoftext|> token", vocab_file);
    return tok;
}

// ---- GPT-2 encoding

enum { PRE_LETTER, PRE_NUMBER, PRE_SPACE, PRE_OTHER };

// Class of the character at s (in the pre-tokenizer's terms) and its length in bytes.
static inline int gpt2_class_at(const unsigned char* s, int* len) {
    uint32_t cp = utf8_decode(s, len);
    int f = uc_flags(cp);
    return f & UC_LETTER ? PRE_LETTER : f & UC_NUMBER ? PRE_NUMBER : f & UC_SPACE ? PRE_SPACE : PRE_OTHER;
}

// End of the pre-token that starts at s[i], as GPT-2's regex cuts it (first alternative that
// matches wins, quantifiers greedy):
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
static size_t gpt2_pretoken_end(const unsigned char* s, size_t n, size_t i) {
    if (s[i] == '\'' && i + 1 < n) {
        unsigned char c = s[i + 1], d = i + 2 < n ? s[i + 2] : 0;
        if (c == 's' || c == 't' || c == 'm' || c == 'd') return i + 2;
        if ((c == 'r' && d == 'e') || (c == 'v' && d == 'e') || (c == 'l' && d == 'l')) return i + 3;
    }
    int len, cls = gpt2_class_at(s + i, &len);
    size_t j = i;
    if (s[i] == ' ' && i + 1 < n) {  // " ?" before a letter, number or other run
        int next_len, next = gpt2_class_at(s + i + 1, &next_len);
        if (next != PRE_SPACE) { j = i + 1; cls = next; len = next_len; }
    }
    if (cls != PRE_SPACE) {
        for (j += len; j < n && gpt2_class_at(s + j, &len) == cls; j += len) {}
        return j;
    }
    size_t last = i;  // start of the last whitespace character of the run
    for (; j < n && gpt2_class_at(s + j, &len) == PRE_SPACE; j += len) last = j;
    if (j == n || last == i) return j;  // up to the end of the text, or a lone space before \S: \s+
    return last;                        // \s+(?!\S): leave the last space to the next pre-token
}

static void heap_push(uint64_t* heap, size_t* n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0 && heap[(i - 1) / 2] > v) { heap[i] = heap[(i - 1) / 2]; i = (i - 1) / 2; }
    heap[i] = v;
}

static uint64_t heap_pop(uint64_t* heap, size_t* n) {
    uint64_t top = heap[0], v = heap[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && heap[c + 1] < heap[c]) c++;
        if (heap[c] >= v) break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = v;
    return top;
}

// Byte-pair merging of one pre-token (GPT-2 paper §2.2, Sennrich et al.): starting from single
// bytes, repeatedly merge the adjacent pair with the lowest merge rank, leftmost first, until no
// pair has a rule. A heap of (rank, position) keeps it O(n log n); entries made stale by
// earlier merges are skipped when popped. Writes the ids to c->sym; returns their count.
static size_t bpe_merge(const Tokenizer* tok, TokCache* c, const unsigned char* s, size_t n) {
    tok_cache_reserve(c, n);
    int32_t *sym = c->sym, *next = c->next, *prev = c->prev;
    size_t heap_n = 0;
    for (size_t i = 0; i < n; i++) {
        sym[i] = tok->byte_id[s[i]];
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
        prev[i] = (int32_t)i - 1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        const BpeMerge* m = bpe_merge_slot(tok, bpe_key(sym[i], sym[i + 1]));
        if (m->key) heap_push(c->heap, &heap_n, (uint64_t)m->rank << 32 | i);
    }
    while (heap_n) {
        uint64_t top = heap_pop(c->heap, &heap_n);
        int32_t rank = (int32_t)(top >> 32), i = (int32_t)(top & 0xFFFFFFFF), j = next[i];
        if (sym[i] < 0 || j < 0) continue;  // i was merged away, or has no right neighbour now
        const BpeMerge* m = bpe_merge_slot(tok, bpe_key(sym[i], sym[j]));
        if (!m->key || m->rank != rank) continue;  // stale: this pair is not (i, j) any more
        sym[i] = m->merged;
        sym[j] = -1;
        next[i] = next[j];
        if (next[j] >= 0) prev[next[j]] = i;
        if (prev[i] >= 0) {
            const BpeMerge* l = bpe_merge_slot(tok, bpe_key(sym[prev[i]], sym[i]));
            if (l->key) heap_push(c->heap, &heap_n, (uint64_t)l->rank << 32 | (uint32_t)prev[i]);
        }
        if (next[i] >= 0) {
            const BpeMerge* r = bpe_merge_slot(tok, bpe_key(sym[i], sym[next[i]]));
            if (r->key) heap_push(c->heap, &heap_n, (uint64_t)r->rank << 32 | (uint32_t)i);
        }
    }
    size_t m = 0;
    for (int32_t i = 0; i >= 0; i = next[i]) sym[m++] = sym[i];
    return m;
}

static void gpt2_encode_pretoken(const Tokenizer* tok, TokCache* c, const unsigned char* s, size_t n, TokenList* out) {
    if (n == 1) { token_list_push(out, tok->byte_id[s[0]]); return; }
    uint64_t hash = tok_hash(s, n);
    size_t m;
    const int32_t* ids = tok_cache_get(c, s, n, hash, &m);
    if (!ids) {
        m = bpe_merge(tok, c, s, n);
        ids = c->sym;
        tok_cache_put(c, s, n, hash, ids, m);
    }
    for (size_t k = 0; k < m; k++) token_list_push(out, ids[k]);
}

static void gpt2_encode(const Tokenizer* tok, TokCache* c, const unsigned char* s, size_t n, TokenList* out) {
    for (size_t i = 0; i < n;) {
        size_t end = gpt2_pretoken_end(s, n, i);
        gpt2_encode_pretoken(tok, c, s + i, end - i, out);
        i = end;
    }
}

// ---- BERT: vocab.txt, one token per line, id = line number - 1

static Tokenizer* bert_load(int type, const char* vocab_file) {
    Tokenizer* tok = (Tokenizer*)xcalloc(1, sizeof(Tokenizer));
    tok->type = type;
    tok->lower = type == TOK_BERT_LOWER;
    tok->eod = -1;
    size_t len;
    char* text = tok_read_file(vocab_file, "BERT vocab file (vocab.txt)", &len);
    int lineno = 1;
    for (char* line = text; line < text + len; lineno++) {
        char* end = (char*)memchr(line, '\n', text + len - line);
        if (!end) end = text + len;
        char *a = line, *b = end;  // Python's strip() of the line (ASCII whitespace)
        while (a < b && tok_is_blank(*a)) a++;
        while (b > a && tok_is_blank(b[-1])) b--;
        int bad;
        for (char* p = a; p < b;) {
            int k = utf8_sequence((unsigned char*)p, b - p, &bad);
            if (!k) die("malformed BERT vocab file '%s' at line %d: not UTF-8", vocab_file, lineno);
            p += k;
        }
        if (b - a > 4096) die("malformed BERT vocab file '%s' at line %d: token longer than 4096 bytes", vocab_file, lineno);
        if (tok_vocab_add(&tok->vocab, a, b - a) < 0)
            die("malformed BERT vocab file '%s' at line %d: token '%.*s' appears twice", vocab_file, lineno, (int)(b - a), a);
        size_t piece = (b - a >= 2 && a[0] == '#' && a[1] == '#') ? b - a - 2 : b - a;
        if ((int)piece > tok->max_piece_bytes) tok->max_piece_bytes = (int)piece;
        line = end + 1;
    }
    free(text);
    const char* required[] = {"[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"};
    for (int i = 0; i < 5; i++)
        if (tokenizer_token_id(tok, required[i]) < 0) die("malformed BERT vocab file '%s': no %s token", vocab_file, required[i]);
    tok->unk_id = tokenizer_token_id(tok, "[UNK]");
    tok_vocab_add(&tok->vocab, "[BOS]", 5);  // Megatron appends these (unless present)
    tok_vocab_add(&tok->vocab, "[EOS]", 5);
    return tok;
}

// Megatron's --vocab-extra-ids n: appends <extra_id_0> .. <extra_id_{n-1}> (T5's sentinels).
// Call before sharing the tokenizer between threads.
static void tokenizer_add_extra_ids(Tokenizer* tok, int n) {
    if (tok->type == TOK_GPT2BPE && n > 0) die("--vocab-extra-ids needs a BERT WordPiece tokenizer");
    for (int i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof(name), "<extra_id_%d>", i);
        tok_vocab_add(&tok->vocab, name, strlen(name));
    }
}

// ---- BERT encoding (Devlin et al. 2018, §3 / Google's tokenization.py, as Megatron uses it)

static inline int bert_is_chinese(uint32_t cp) {
    return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x20000 && cp <= 0x2A6DF) ||
           (cp >= 0x2A700 && cp <= 0x2B73F) || (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B820 && cp <= 0x2CEAF) ||
           (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

// Whitespace for the basic tokenizer: the clean-up maps ' ', \t, \n, \r and Zs to ' ', and
// Python's str.split() also splits at U+2028/U+2029 (the other isspace() characters are Cc,
// already dropped by the clean-up).
static inline int bert_is_space(uint32_t cp, int flags) {
    return cp == ' ' || cp == '\t' || cp == '\n' || cp == '\r' || cp == 0x2028 || cp == 0x2029 || (flags & UC_ZS);
}

static inline int bert_is_punct(uint32_t cp) {  // all non-alphanumeric ASCII, and Unicode P*
    if (cp < 128) return (cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) || (cp >= 123 && cp <= 126);
    return uc_flags(cp) & UC_PUNCT;
}

static const UcFold* uc_fold_find(uint32_t cp) {
    int lo = 0, hi = (int)(sizeof(uc_fold) / sizeof(uc_fold[0])) - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < uc_fold[mid].cp) hi = mid - 1;
        else if (cp > uc_fold[mid].cp) lo = mid + 1;
        else return &uc_fold[mid];
    }
    return NULL;
}

#define UC_RANGES(t) (t), (int)(sizeof(t) / sizeof((t)[0]))

// str.lower()'s Final_Sigma rule: capital sigma becomes final sigma when a cased letter precedes
// it and none follows (skipping case-ignorable characters both ways), within the word.
static uint32_t bert_lower_sigma(const uint32_t* w, int n, int i) {
    int j = i - 1;
    while (j >= 0 && uc_in_ranges(UC_RANGES(uc_case_ignorable), w[j])) j--;
    if (j < 0 || !uc_in_ranges(UC_RANGES(uc_cased), w[j])) return 0x3C3;
    for (j = i + 1; j < n && uc_in_ranges(UC_RANGES(uc_case_ignorable), w[j]); j++) {}
    return j < n && uc_in_ranges(UC_RANGES(uc_cased), w[j]) ? 0x3C3 : 0x3C2;
}

// Lower-cases w[0..n) and strips accents (NFD, drop Mn) into out; returns the new length
// (at most 3n). Canonical reordering is left out: it only moves combining marks, which are
// then dropped, except among a few Mc characters (Tibetan/musical) that never meet in text.
static int bert_lower_strip(const uint32_t* w, int n, uint32_t* out) {
    int m = 0;
    for (int i = 0; i < n; i++) {
        uint32_t cp = w[i];
        if (cp < 128) { out[m++] = cp >= 'A' && cp <= 'Z' ? cp + 32 : cp; continue; }
        if (cp == 0x3A3) { out[m++] = bert_lower_sigma(w, n, i); continue; }
        if (uc_flags(cp) & UC_MN) continue;
        if (cp >= 0xAC00 && cp <= 0xD7A3) {  // Hangul syllable: NFD into its jamo
            uint32_t k = cp - 0xAC00;
            out[m++] = 0x1100 + k / 588;
            out[m++] = 0x1161 + (k % 588) / 28;
            if (k % 28) out[m++] = 0x11A7 + k % 28;
            continue;
        }
        const UcFold* f = uc_fold_find(cp);
        if (!f) { out[m++] = cp; continue; }
        for (int k = 0; k < f->n; k++) out[m++] = f->out[k];
    }
    return m;
}

// Greedy longest-match-first WordPiece of one word (UTF-8, nchars characters): pieces after
// the first carry "##"; a word with no full cover, or longer than 200 characters, is [UNK].
static void wordpiece(const Tokenizer* tok, TokCache* c, const unsigned char* w, size_t n, size_t nchars, TokenList* out) {
    if (nchars > 200) {
        token_list_push(out, tok->unk_id);
        return;
    }
    uint64_t hash = tok_hash(w, n);
    size_t m;
    const int32_t* ids = tok_cache_get(c, w, n, hash, &m);
    if (ids) {
        for (size_t k = 0; k < m; k++) token_list_push(out, ids[k]);
        return;
    }
    size_t first = out->len;
    unsigned char key[2 + 4 * 200];
    for (size_t start = 0; start < n;) {
        size_t prefix = start ? 2 : 0, end = n;
        if (end - start > (size_t)tok->max_piece_bytes) end = start + tok->max_piece_bytes;
        while (end < n && (w[end] & 0xC0) == 0x80) end--;  // back to a character boundary
        memcpy(key, "##", 2);
        int id = -1;
        for (; end > start; end--) {
            if (end < n && (w[end] & 0xC0) == 0x80) continue;
            memcpy(key + prefix, w + start, end - start);
            if ((id = tok_vocab_find(&tok->vocab, start ? key : w + start, prefix + end - start)) >= 0) break;
        }
        if (id < 0) {
            out->len = first;
            token_list_push(out, tok->unk_id);
            break;
        }
        token_list_push(out, id);
        start = end;
    }
    tok_cache_put(c, w, n, hash, out->ids + first, out->len - first);
}

// One whitespace-separated token w[0..n): lower-case + strip accents (LowerCase), then split
// off each punctuation character as its own word, then WordPiece each word.
static void bert_encode_token(const Tokenizer* tok, TokCache* c, const uint32_t* w, int n, uint32_t* folded, TokenList* out) {
    if (tok->lower) { n = bert_lower_strip(w, n, folded); w = folded; }
    unsigned char word[4 * 200 + 4];
    size_t len = 0, nchars = 0, too_long = 0;
    for (int i = 0; i <= n; i++) {
        int punct = i < n && bert_is_punct(w[i]);
        if (i == n || punct) {
            if (nchars) wordpiece(tok, c, word, len, too_long ? 201 : nchars, out);
            len = nchars = too_long = 0;
        }
        if (i == n) break;
        if (punct) {
            len = utf8_encode(w[i], word);
            wordpiece(tok, c, word, len, 1, out);
            len = 0;
            continue;
        }
        if (nchars < 200) len += utf8_encode(w[i], word + len);
        else too_long = 1;
        nchars++;
    }
}

// Room for a token of n characters in c->word, and for its lower-cased form (at most 3 code
// points per character) in c->folded.
static void bert_reserve_word(TokCache* c, size_t n) {
    if (n <= c->word_cap) return;
    c->word_cap = 2 * n + 256;
    c->word = (uint32_t*)realloc(c->word, c->word_cap * sizeof(uint32_t));
    c->folded = (uint32_t*)realloc(c->folded, 3 * c->word_cap * sizeof(uint32_t));
    if (!c->word || !c->folded) die("out of host memory");
}

// Basic tokenizer (clean-up, CJK spacing, whitespace split), then bert_encode_token per token.
static void bert_encode(const Tokenizer* tok, TokCache* c, const unsigned char* s, size_t n, TokenList* out) {
    size_t m = 0;
    bert_reserve_word(c, 1);
    for (size_t i = 0; i <= n;) {
        uint32_t cp = ' ';
        int len = 1;
        if (i < n) cp = utf8_decode(s + i, &len);
        int f = uc_flags(cp);
        i += len;
        if (cp == 0 || cp == 0xFFFD || (f & UC_CONTROL)) continue;  // clean-up drops these
        int chinese = bert_is_chinese(cp);
        if (bert_is_space(cp, f) || chinese) {
            if (m) bert_encode_token(tok, c, c->word, (int)m, c->folded, out);
            m = 0;
            if (chinese) bert_encode_token(tok, c, &cp, 1, c->folded, out);
            continue;
        }
        bert_reserve_word(c, m + 1);
        c->word[m++] = cp;
    }
}

// ----------------------------------------------------------------------------
// Public API

// vocab_file: encoder.json (GPT-2) or vocab.txt (BERT); merge_file: vocab.bpe (GPT-2 only).
// Dies with a one-line error on a missing or malformed file.
static Tokenizer* tokenizer_load(int type, const char* vocab_file, const char* merge_file) {
    Tokenizer* tok = NULL;
    if (type == TOK_GPT2BPE) tok = gpt2_load(vocab_file, merge_file);
    else if (type == TOK_BERT_LOWER || type == TOK_BERT_CASE) tok = bert_load(type, vocab_file);
    else die("unknown tokenizer type %d", type);
    tok->caches = (TokCacheRegistry*)xcalloc(1, sizeof(TokCacheRegistry));
    pthread_mutex_init(&tok->caches->lock, NULL);
    if (pthread_key_create(&tok->caches->key, tok_cache_thread_exit) != 0) die("pthread_key_create failed");
    return tok;
}

// Appends the ids of text[0..len) to out. Thread-safe.
static void tokenizer_encode(const Tokenizer* tok, const char* text, size_t len, TokenList* out) {
    TokCache* c = tok_cache_for_thread(tok->caches);
    size_t clean_len;
    unsigned char* clean = utf8_replace_invalid((const unsigned char*)text, len, &clean_len);
    const unsigned char* s = clean ? clean : (const unsigned char*)text;
    size_t n = clean ? clean_len : len;
    if (tok->type == TOK_GPT2BPE) gpt2_encode(tok, c, s, n, out);
    else bert_encode(tok, c, s, n, out);
    free(clean);
}

// malloc'd, NUL-terminated UTF-8 text of ids[0..n). GPT-2: the tokens' bytes decoded with
// errors='replace' (ids out of range also give U+FFFD). BERT: tokens joined by spaces, "##"
// pieces glued to the one before (' '.join(tokens).replace(' ##', '')).
static char* tokenizer_decode(const Tokenizer* tok, const int32_t* ids, size_t n) {
    size_t cap = 64, len = 0;
    for (size_t i = 0; i < n; i++) cap += (ids[i] >= 0 && ids[i] < tok->vocab.n ? tok->vocab.len[ids[i]] : 3) + 1;
    char* s = (char*)xmalloc(cap);
    for (size_t i = 0; i < n; i++) {
        size_t tlen;
        const char* t = tokenizer_token_bytes(tok, ids[i], &tlen);
        if (!t) { t = "\xEF\xBF\xBD"; tlen = 3; }
        if (tok->type != TOK_GPT2BPE) {
            if (i > 0 && tlen >= 2 && t[0] == '#' && t[1] == '#') { t += 2; tlen -= 2; }
            else if (i > 0) s[len++] = ' ';
        }
        memcpy(s + len, t, tlen);
        len += tlen;
    }
    size_t clean_len;
    unsigned char* clean = utf8_replace_invalid((unsigned char*)s, len, &clean_len);
    if (clean) {
        free(s);
        s = (char*)realloc(clean, clean_len + 1);
        len = clean_len;
    }
    s[len] = 0;
    return s;
}

static void tokenizer_free(Tokenizer* tok) {
    if (!tok) return;
    TokCacheRegistry* r = tok->caches;
    pthread_key_delete(r->key);
    for (int i = 0; i < r->n; i++) tok_cache_free(r->caches[i]);
    pthread_mutex_destroy(&r->lock);
    free(r->caches);
    free(r);
    tok_vocab_free(&tok->vocab);
    free(tok->merges);
    free(tok);
}

// ----------------------------------------------------------------------------
// split_sentences: Megatron's --split-sentences runs NLTK's punkt (english.pickle), a model
// trained on a corpus. This is a fixed-rule stand-in with punkt's output shape. Rules:
//  1. A sentence ends after a run of terminators (. ? ! … ‼ ⁇ ⁈ ⁉ 。 ！ ？) and any closing
//     quotes or brackets right after it (" ' ) ] } ” ’ » 」 』), when whitespace or the end of
//     the text follows,
//  2. unless the next word starts with an ASCII lower-case letter ("e.g. the", "Yes? no"),
//  3. or the run is a single '.' after an initial ("J. R. R. Tolkien") or after a known
//     abbreviation (Mr Mrs Ms Dr Prof Rev St Jr Sr Gen Col Capt Lt Sgt Gov Sen Rep Hon Messrs
//     Mt Ft vs cf viz approx fig figs vol vols pp eds dept univ jan feb apr aug sept oct nov dec,
//     any case).
//  4. A blank line (two newlines with only spaces, tabs or \r between) also ends a sentence.
// Spans leave out the whitespace around sentences; whitespace-only text has no sentence.
// Differences from punkt: punkt learned its abbreviations, collocations and sentence starters
// from data (e.g. it knows "U.S." and "Inc."), splits after ? and ! even before a lower-case
// word, and never splits at a blank line; so a few boundaries differ on real text.

static const char* const sentence_abbreviations[] = {
    "mr", "mrs", "ms", "dr", "prof", "rev", "st", "jr", "sr", "gen", "col", "capt", "lt", "sgt", "gov",
    "sen", "rep", "hon", "messrs", "mt", "ft", "vs", "cf", "viz", "approx", "fig", "figs", "vol", "vols",
    "pp", "eds", "dept", "univ", "jan", "feb", "apr", "aug", "sept", "oct", "nov", "dec"};

// The code point at s[i] (U+FFFD for an invalid byte) and its length.
static uint32_t sentence_char(const unsigned char* s, size_t n, size_t i, int* len) {
    int bad;
    if (!utf8_sequence(s + i, n - i, &bad)) { *len = 1; return 0xFFFD; }
    return utf8_decode(s + i, len);
}

static int sentence_is_space(uint32_t cp) { return uc_flags(cp) & UC_SPACE; }

static int sentence_is_terminator(uint32_t cp) {
    return cp == '.' || cp == '?' || cp == '!' || cp == 0x2026 || cp == 0x203C || (cp >= 0x2047 && cp <= 0x2049) ||
           cp == 0x3002 || cp == 0xFF01 || cp == 0xFF1F;
}

static int sentence_is_closer(uint32_t cp) {
    return cp == '"' || cp == '\'' || cp == ')' || cp == ']' || cp == '}' || cp == 0x201D || cp == 0x2019 ||
           cp == 0xBB || cp == 0x300D || cp == 0x300F;
}

// Rule 3: is the word ending just before the '.' at s[dot] an initial or an abbreviation?
static int sentence_abbreviation_before(const unsigned char* s, size_t dot) {
    size_t a = dot;
    while (a > 0 && ((s[a - 1] >= 'a' && s[a - 1] <= 'z') || (s[a - 1] >= 'A' && s[a - 1] <= 'Z'))) a--;
    size_t n = dot - a;
    if (n == 0 || (a > 0 && s[a - 1] >= 0x80) || (a > 0 && ((s[a - 1] >= '0' && s[a - 1] <= '9') || s[a - 1] == '_'))) return 0;
    if (n == 1) return 1;
    for (size_t k = 0; k < sizeof(sentence_abbreviations) / sizeof(sentence_abbreviations[0]); k++) {
        const char* w = sentence_abbreviations[k];
        if (strlen(w) != n) continue;
        size_t j = 0;
        while (j < n && (s[a + j] | 0x20) == w[j]) j++;
        if (j == n) return 1;
    }
    return 0;
}

// Rules 1-3 for the terminator run starting at s[i]: returns where the sentence ends (after the
// run and its closers) or 0 if it does not end here; *resume is where scanning goes on.
static size_t sentence_end_after_terminators(const unsigned char* s, size_t n, size_t i, size_t* resume) {
    size_t j = i;
    int len, terminators = 0;
    while (j < n && sentence_is_terminator(sentence_char(s, n, j, &len))) { j += len; terminators++; }
    while (j < n && sentence_is_closer(sentence_char(s, n, j, &len))) j += len;
    *resume = j;
    if (j < n && !sentence_is_space(sentence_char(s, n, j, &len))) return 0;
    size_t k = j;
    while (k < n && sentence_is_space(sentence_char(s, n, k, &len))) k += len;
    if (k < n && s[k] >= 'a' && s[k] <= 'z') return 0;
    if (terminators == 1 && s[i] == '.' && k < n && sentence_abbreviation_before(s, i)) return 0;
    return j;
}

// Rule 4: does a blank line start at the newline s[i]?
static int sentence_blank_line(const unsigned char* s, size_t n, size_t i) {
    size_t k = i + 1;
    while (k < n && (s[k] == ' ' || s[k] == '\t' || s[k] == '\r')) k++;
    return k < n && s[k] == '\n';
}

// Finds the sentences of text[0..len): writes the first `max` as (starts, lens) and returns how
// many there are (call again with bigger arrays when that is more than max).
static size_t split_sentences(const char* text, size_t len, size_t* starts, size_t* lens, size_t max) {
    const unsigned char* s = (const unsigned char*)text;
    size_t count = 0, start = 0, i = 0;
    int clen;
    for (;;) {
        while (start < len && sentence_is_space(sentence_char(s, len, start, &clen))) start += clen;
        if (start >= len) return count;
        size_t end = len, next = len;  // the sentence is [start, end); scanning resumes at next
        for (i = i > start ? i : start; i < len;) {
            uint32_t cp = sentence_char(s, len, i, &clen);
            if (cp == '\n' && sentence_blank_line(s, len, i)) { end = i; next = i; break; }
            if (!sentence_is_terminator(cp)) { i += clen; continue; }
            size_t resume, cut = sentence_end_after_terminators(s, len, i, &resume);
            if (cut) { end = cut; next = cut; break; }
            i = resume;
        }
        while (end > start) {  // drop trailing whitespace
            size_t b = end - 1;
            while (b > start && (s[b] & 0xC0) == 0x80) b--;
            if (!sentence_is_space(sentence_char(s, len, b, &clen))) break;
            end = b;
        }
        if (count < max) { starts[count] = start; lens[count] = end - start; }
        count++;
        start = i = next;
    }
}

#endif  // MEGATRON_TOKENIZER_H
