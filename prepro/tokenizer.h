/*
tokenizer.h: Megatron's tokenizers (megatron/tokenizer/), in C.
STUB: the API below is final; the bodies are being written (helper "tok").
*/
#ifndef MEGATRON_TOKENIZER_H
#define MEGATRON_TOKENIZER_H

#include "../megatron.h"

enum { TOK_GPT2BPE, TOK_BERT_LOWER, TOK_BERT_CASE };
typedef struct Tokenizer Tokenizer;
typedef struct { int32_t* ids; size_t len, cap; } TokenList;  // growable; zero-initialise, free(ids) when done

// vocab_file: encoder.json (GPT-2) or vocab.txt (BERT); merge_file: vocab.bpe (GPT-2), NULL for BERT.
// Dies with a one-line error on a missing or malformed file.
static Tokenizer* tokenizer_load(int type, const char* vocab_file, const char* merge_file);
static void tokenizer_free(Tokenizer* tok);
// "GPT2BPETokenizer", "BertWordPieceLowerCase", "BertWordPieceCase"; -1 if unknown.
static int tokenizer_type_from_name(const char* name);
static int tokenizer_vocab_size(const Tokenizer* tok);  // unpadded: GPT-2 50257; BERT len(vocab)+2 (+extra ids)
static int tokenizer_eod(const Tokenizer* tok);          // GPT-2 <|endoftext|> 50256; BERT: -1 (Megatron has none)
// The id of a token string ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[BOS]", "[EOS]", "<extra_id_0>", ...), -1 if absent.
static int tokenizer_token_id(const Tokenizer* tok, const char* token);
// Megatron's --vocab-extra-ids: appends <extra_id_0..n-1> to a BERT vocabulary (T5's sentinels).
static void tokenizer_add_extra_ids(Tokenizer* tok, int n);
// Appends the ids of text[0..len) to out. Thread-safe: threads may share one Tokenizer.
static void tokenizer_encode(const Tokenizer* tok, const char* text, size_t len, TokenList* out);
// malloc'd, NUL-terminated UTF-8 text of ids[0..n); invalid UTF-8 and unknown ids become U+FFFD.
static char* tokenizer_decode(const Tokenizer* tok, const int32_t* ids, size_t n);
// Rule-based sentence splitter (--split-sentences): writes up to max spans, returns how many it found.
static size_t split_sentences(const char* text, size_t len, size_t* starts, size_t* lens, size_t max);

static void token_list_push(TokenList* out, int32_t id) {
    if (out->len == out->cap) {
        out->cap = out->cap ? 2 * out->cap : 256;
        out->ids = (int32_t*)realloc(out->ids, out->cap * sizeof(int32_t));
        if (!out->ids) die("out of host memory growing a token list to %zu ids", out->cap);
    }
    out->ids[out->len++] = id;
}

// ---- stub bodies (replaced soon) ----
struct Tokenizer { int type; };
static Tokenizer* tokenizer_load(int type, const char* vocab_file, const char* merge_file) {
    (void)vocab_file; (void)merge_file;
    Tokenizer* tok = (Tokenizer*)xcalloc(1, sizeof(Tokenizer));
    tok->type = type;
    return tok;
}
static void tokenizer_free(Tokenizer* tok) { free(tok); }
static int tokenizer_type_from_name(const char* name) {
    if (strcmp(name, "GPT2BPETokenizer") == 0) return TOK_GPT2BPE;
    if (strcmp(name, "BertWordPieceLowerCase") == 0) return TOK_BERT_LOWER;
    if (strcmp(name, "BertWordPieceCase") == 0) return TOK_BERT_CASE;
    return -1;
}
static int tokenizer_vocab_size(const Tokenizer* tok) { return tok->type == TOK_GPT2BPE ? 50257 : 30524; }
static int tokenizer_eod(const Tokenizer* tok) { return tok->type == TOK_GPT2BPE ? 50256 : -1; }
static int tokenizer_token_id(const Tokenizer* tok, const char* token) { (void)tok; (void)token; return -1; }
static void tokenizer_add_extra_ids(Tokenizer* tok, int n) { (void)tok; (void)n; }
static void tokenizer_encode(const Tokenizer* tok, const char* text, size_t len, TokenList* out) {
    (void)tok;
    for (size_t i = 0; i < len; i++) token_list_push(out, (unsigned char)text[i]);
}
static char* tokenizer_decode(const Tokenizer* tok, const int32_t* ids, size_t n) {
    (void)tok;
    char* s = (char*)xmalloc(n + 1);
    for (size_t i = 0; i < n; i++) s[i] = (char)ids[i];
    s[n] = 0;
    return s;
}
static size_t split_sentences(const char* text, size_t len, size_t* starts, size_t* lens, size_t max) {
    if (len == 0) return 0;
    if (max > 0) { starts[0] = 0; lens[0] = len; }
    (void)text;
    return 1;
}

#endif  // MEGATRON_TOKENIZER_H
