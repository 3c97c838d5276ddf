/*
preprocess_data: Megatron-LM's tools/preprocess_data.py (2022, commit 2755bcb) in C.

Turns a corpus into Megatron's mmap indexed dataset, {prefix}_{key}_{level}.bin/.idx
(level = "sentence" with --split-sentences, else "document"), byte-identical to what
Megatron writes for the same input and tokenizer:
  - each document is split into sentences (the whole text is one "sentence" unless
    --split-sentences), each sentence is tokenized, empty token lists are dropped;
  - --append-eod appends the end-of-document id to the document's last sentence;
  - every remaining sentence is one sequence of the dataset, and a document with no
    sequence left is skipped entirely (no entry in doc_idx), as Megatron 2022 did;
  - tokens are uint16 when the unpadded vocabulary has fewer than 65500 ids, else int32.

Input formats (--input-format; by default jsonl when the file name ends in .json, .jsonl
or .ndjson, text otherwise, with a note on stderr when a "text" file starts with '{'):
  jsonl  Megatron's loose JSON: one object per line; each --json-keys key must hold a
         string. Lines end at \n, \r\n or \r (Python's universal newlines). Lines that
         are empty or hold only spaces and tabs are skipped (Megatron would crash).
  text   plain text cut into documents at blank lines. Line ends \r\n and \r are read
         as \n (Python's open() does the same). A blank line is a line that is empty or
         holds only spaces and tabs; one or more of them end a document. A document is
         its lines, each with its "\n" (the file's last line keeps none if the file has
         none): tiny Shakespeare's "First Citizen:\nBefore we proceed ...speak.\n" is
         one document. Blank lines themselves belong to no document. The output is
         named after the single key (default "text"): data/x_text_document.bin.
Both formats: a UTF-8 byte-order mark at the start of the file is ignored, and each
invalid UTF-8 sequence becomes U+FFFD exactly as Python's bytes.decode('utf-8',
errors='replace') does (one U+FFFD per maximal invalid subpart); Megatron itself would
stop with a UnicodeDecodeError. Lone UTF-16 surrogates from JSON \u escapes become
U+FFFD too (Megatron's tokenizer would crash on them). The count is in the summary.

Errors: a JSON line that is not an object holding a string under every --json-keys key
stops the run with "error: FILE:LINE: reason" (exit 1); --skip-bad-lines skips such lines
instead, names the first five and counts them all. Command-line mistakes exit with 2.
Progress goes to stderr every --log-interval documents (at most once a second): documents/s,
MB/s, percent of the input and ETA; then one summary line.

Threads: --workers threads parse and tokenize batches of whole lines (or whole text
documents); one writer (the main thread) writes them in input order, so the output
does not depend on --workers. Outputs are written under temporary names and renamed
into place at the end: an interrupted run never leaves a file under the final names.

Build: g++ -O3 -std=c++17 -pthread -fopenmp -o prepro/preprocess_data prepro/preprocess_data.cpp
*/
#include "../megatron.h"
#include "tokenizer.h"
#include <pthread.h>
#include <signal.h>

#define MAX_KEYS 16
#define MAX_REPORTED 5  // bad lines reported one by one with --skip-bad-lines

enum { FORMAT_AUTO, FORMAT_JSONL, FORMAT_TEXT };

// ----------------------------------------------------------------------------
// command line (Megatron's flag names; ours: --input-format, --skip-bad-lines)

typedef struct {
    const char* input;
    const char* output_prefix;
    const char* json_keys[MAX_KEYS];
    int num_keys;
    const char* tokenizer_name;
    int tokenizer_type;
    const char* vocab_file;
    const char* merge_file;
    int append_eod, split_sentences, keep_newlines, skip_bad_lines;
    int workers;
    int log_interval;
    int input_format;
} PreproArgs;

static void print_usage(FILE* f) {
    fprintf(f,
        "usage: preprocess_data --input FILE --output-prefix PREFIX --tokenizer-type TYPE\n"
        "                       --vocab-file FILE [--merge-file FILE] [options]\n"
        "Writes Megatron-LM's mmap dataset {PREFIX}_{KEY}_{document|sentence}.bin/.idx.\n"
        "  --input FILE            corpus: JSON lines, or plain text (see --input-format)\n"
        "  --output-prefix PREFIX  path of the outputs without _{key}_{level}.bin/.idx\n"
        "  --json-keys KEY [KEY..] JSON keys to tokenize, one output pair each (default: text)\n"
        "  --tokenizer-type TYPE   GPT2BPETokenizer, BertWordPieceLowerCase or BertWordPieceCase\n"
        "  --vocab-file FILE       encoder.json (GPT-2) or vocab.txt (BERT)\n"
        "  --merge-file FILE       vocab.bpe (GPT-2)\n"
        "  --append-eod            append the end-of-document token to each document\n"
        "  --split-sentences       one sequence per sentence (BERT, T5); level 'sentence'\n"
        "  --keep-newlines         with --split-sentences: keep the whitespace and newlines\n"
        "                          between sentences at the end of each sentence\n"
        "  --workers N             tokenizing threads (default 1)\n"
        "  --dataset-impl mmap     the only format written (Megatron's default)\n"
        "  --log-interval N        progress line every N documents, at most one a second\n"
        "                          (default 1000; 0: summary only)\n"
        "  --input-format F        jsonl: one JSON object per line; text: documents\n"
        "                          separated by blank lines (default: jsonl for names ending\n"
        "                          in .json/.jsonl/.ndjson, text otherwise)\n"
        "  --skip-bad-lines        skip (and count) JSON lines that cannot be used instead\n"
        "                          of stopping at the first one\n"
        "  -h, --help              this text\n");
}

static int parse_int_flag(const char* flag, const char* text, int min, int max) {
    char* rest;
    errno = 0;
    long v = strtol(text, &rest, 10);
    if (errno || rest == text || *rest || v < min || v > max)
        arg_error("%s: expected an integer from %d to %d, got '%s'", flag, min, max, text);
    return (int)v;
}

static int name_ends_with(const char* s, const char* suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static void parse_args(PreproArgs* a, int argc, char** argv) {
    memset(a, 0, sizeof(*a));
    a->workers = 1;
    a->log_interval = 1000;
    a->input_format = FORMAT_AUTO;
    const char* format = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) { print_usage(stdout); exit(0); }
        if (strncmp(argv[i], "--", 2) != 0) arg_error("unexpected argument '%s'", argv[i]);
        // --flag value or --flag=value
        char flag[64];
        const char* eq = strchr(argv[i], '=');
        const char* inline_value = eq ? eq + 1 : NULL;
        size_t flag_len = eq ? (size_t)(eq - argv[i]) : strlen(argv[i]);
        if (flag_len >= sizeof(flag)) arg_error("unknown flag %.60s...", argv[i]);
        memcpy(flag, argv[i], flag_len);
        flag[flag_len] = 0;
        int is_switch = !strcmp(flag, "--append-eod") || !strcmp(flag, "--split-sentences") ||
                        !strcmp(flag, "--keep-newlines") || !strcmp(flag, "--skip-bad-lines");
        if (is_switch) {
            if (inline_value) arg_error("%s takes no value", flag);
            if (!strcmp(flag, "--append-eod")) a->append_eod = 1;
            else if (!strcmp(flag, "--split-sentences")) a->split_sentences = 1;
            else if (!strcmp(flag, "--keep-newlines")) a->keep_newlines = 1;
            else a->skip_bad_lines = 1;
            continue;
        }
        if (!strcmp(flag, "--json-keys")) {  // nargs='+': every following word up to the next flag
            a->num_keys = 0;
            if (inline_value) a->json_keys[a->num_keys++] = inline_value;
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) {
                if (a->num_keys == MAX_KEYS) arg_error("--json-keys: at most %d keys", MAX_KEYS);
                a->json_keys[a->num_keys++] = argv[++i];
            }
            if (a->num_keys == 0) arg_error("--json-keys needs at least one key");
            continue;
        }
        static const char* value_flags[] = {"--input", "--output-prefix", "--tokenizer-type", "--vocab-file", "--merge-file",
                                            "--workers", "--log-interval", "--input-format", "--dataset-impl"};
        int known = 0;
        for (size_t f = 0; f < sizeof(value_flags) / sizeof(value_flags[0]); f++) known |= !strcmp(flag, value_flags[f]);
        if (!known) arg_error("unknown flag %s", flag);
        const char* value = inline_value;
        if (!value) {
            if (i + 1 >= argc) arg_error("%s needs a value", flag);
            value = argv[++i];
        }
        if (!strcmp(flag, "--input")) a->input = value;
        else if (!strcmp(flag, "--output-prefix")) a->output_prefix = value;
        else if (!strcmp(flag, "--tokenizer-type")) a->tokenizer_name = value;
        else if (!strcmp(flag, "--vocab-file")) a->vocab_file = value;
        else if (!strcmp(flag, "--merge-file")) a->merge_file = value;
        else if (!strcmp(flag, "--workers")) a->workers = parse_int_flag(flag, value, 1, 1024);
        else if (!strcmp(flag, "--log-interval")) a->log_interval = parse_int_flag(flag, value, 0, INT32_MAX);
        else if (!strcmp(flag, "--input-format")) format = value;
        else if (!strcmp(flag, "--dataset-impl")) {
            if (!strcmp(value, "lazy") || !strcmp(value, "cached"))
                arg_error("--dataset-impl %s: only mmap is written (Megatron's default; its readers take it too)", value);
            if (strcmp(value, "mmap") != 0) arg_error("--dataset-impl: expected mmap, got '%s'", value);
        }
    }
    if (!a->input) arg_error("--input is required");
    if (!a->output_prefix) arg_error("--output-prefix is required");
    if (!a->tokenizer_name) arg_error("--tokenizer-type is required");
    a->tokenizer_type = tokenizer_type_from_name(a->tokenizer_name);
    if (a->tokenizer_type < 0)
        arg_error("--tokenizer-type %s: expected GPT2BPETokenizer, BertWordPieceLowerCase or BertWordPieceCase", a->tokenizer_name);
    if (!a->vocab_file) arg_error("--vocab-file is required by %s", a->tokenizer_name);
    if (a->tokenizer_type == TOK_GPT2BPE && !a->merge_file) arg_error("--merge-file is required by GPT2BPETokenizer");
    if (a->num_keys == 0) a->json_keys[a->num_keys++] = "text";
    if (format) {
        if (!strcmp(format, "jsonl")) a->input_format = FORMAT_JSONL;
        else if (!strcmp(format, "text")) a->input_format = FORMAT_TEXT;
        else arg_error("--input-format: expected jsonl or text, got '%s'", format);
    } else {
        int json_name = name_ends_with(a->input, ".json") || name_ends_with(a->input, ".jsonl") || name_ends_with(a->input, ".ndjson");
        a->input_format = json_name ? FORMAT_JSONL : FORMAT_TEXT;
    }
    if (a->input_format == FORMAT_TEXT && a->num_keys > 1)
        arg_error("--json-keys: plain text input has one field; give one key (it names the output)");
}

// ----------------------------------------------------------------------------
// growable arrays

typedef struct { char* data; size_t len, cap; } ByteBuf;
typedef struct { int32_t* data; size_t len, cap; } IntBuf;

static void* buf_grow(void* data, size_t* cap, size_t need, size_t item) {
    if (need <= *cap) return data;
    size_t cap_new = *cap ? *cap : 64;
    while (cap_new < need) cap_new *= 2;
    data = realloc(data, cap_new * item);
    if (!data) die("out of host memory growing a buffer to %zu bytes", cap_new * item);
    *cap = cap_new;
    return data;
}

static void buf_append(ByteBuf* b, const void* src, size_t n) {
    b->data = (char*)buf_grow(b->data, &b->cap, b->len + n, 1);
    memcpy(b->data + b->len, src, n);
    b->len += n;
}

static void buf_push_int(IntBuf* v, int32_t x) {
    v->data = (int32_t*)buf_grow(v->data, &v->cap, v->len + 1, sizeof(int32_t));
    v->data[v->len++] = x;
}

// ----------------------------------------------------------------------------
// UTF-8, read as Python's decoder reads it with errors='replace' (tokenizer.h's
// utf8_sequence finds the maximal invalid subparts, each becomes one U+FFFD)

static void utf8_put(ByteBuf* out, uint32_t cp) {
    unsigned char bytes[4];
    buf_append(out, bytes, utf8_encode(cp, bytes));
}

// Copy s[0..n) to out, replacing invalid UTF-8; returns how many replacements.
static int64_t utf8_copy_replacing(ByteBuf* out, const char* s, size_t n) {
    int64_t replaced = 0;
    size_t i = 0;
    while (i < n) {
        size_t run = i;
        while (run < n && (unsigned char)s[run] < 0x80) run++;  // ASCII fast path
        buf_append(out, s + i, run - i);
        i = run;
        if (i == n) break;
        int bad = 0, k = utf8_sequence((const unsigned char*)s + i, n - i, &bad);
        if (k) { buf_append(out, s + i, k); i += k; }
        else { utf8_put(out, 0xFFFD); i += bad; replaced++; }
    }
    return replaced;
}

// ----------------------------------------------------------------------------
// JSON lines: Python's json.loads, enough of it to pull string fields out of an object.
// Values of other keys are checked and skipped. Like Python, a key given twice takes
// its last value, NaN/Infinity/-Infinity are accepted, raw control characters inside
// strings are not.

typedef struct {
    const char* p;      // the next byte of the line
    const char* end;
    const char* error;  // first problem found, NULL while fine
    const char* error_at;
    int64_t replaced;   // invalid UTF-8 / lone surrogates turned into U+FFFD
} JsonLine;

static void jsonl_fail(JsonLine* j, const char* message) {
    if (!j->error) { j->error = message; j->error_at = j->p; }
}

static void jsonl_ws(JsonLine* j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static int jsonl_hex4(JsonLine* j, uint32_t* out) {
    if (j->end - j->p < 4) { jsonl_fail(j, "invalid \\uXXXX escape"); return 0; }
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        char c = j->p[k];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) { jsonl_fail(j, "invalid \\uXXXX escape"); return 0; }
        v = v * 16 + d;
    }
    j->p += 4;
    *out = v;
    return 1;
}

// A string at j->p (at its opening quote), decoded into out (NULL: only checked).
static void jsonl_string(JsonLine* j, ByteBuf* out) {
    j->p++;
    for (;;) {
        const char* run = j->p;
        while (j->p < j->end && *j->p != '"' && *j->p != '\\' && (unsigned char)*j->p >= 0x20) j->p++;
        if (out) j->replaced += utf8_copy_replacing(out, run, j->p - run);
        else for (const char* s = run; s < j->p;) {  // still count what would be replaced
            int bad = 0, k = utf8_sequence((const unsigned char*)s, j->p - s, &bad);
            j->replaced += k == 0;
            s += k ? k : bad;
        }
        if (j->p == j->end) { jsonl_fail(j, "unterminated string"); return; }
        char c = *j->p;
        if (c == '"') { j->p++; return; }
        if (c != '\\') { jsonl_fail(j, "invalid control character in string"); return; }
        if (++j->p == j->end) { jsonl_fail(j, "unterminated string"); return; }
        c = *j->p++;
        const char* simple = strchr("\"\\/bfnrt", c);
        if (simple && c) {
            static const char decoded[] = "\"\\/\b\f\n\r\t";
            if (out) buf_append(out, &decoded[simple - "\"\\/bfnrt"], 1);
            continue;
        }
        if (c != 'u') { j->p--; jsonl_fail(j, "invalid \\escape"); return; }
        uint32_t cp;
        if (!jsonl_hex4(j, &cp)) return;
        if (cp >= 0xD800 && cp <= 0xDBFF && j->end - j->p >= 6 && j->p[0] == '\\' && j->p[1] == 'u') {
            const char* back = j->p;
            uint32_t low;
            j->p += 2;
            if (!jsonl_hex4(j, &low)) return;
            if (low >= 0xDC00 && low <= 0xDFFF) cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            else j->p = back;  // a lone high surrogate; the next escape is read on its own
        }
        if (cp >= 0xD800 && cp <= 0xDFFF) { cp = 0xFFFD; j->replaced++; }
        if (out) utf8_put(out, cp);
    }
}

static int jsonl_literal(JsonLine* j, const char* word) {
    size_t n = strlen(word);
    if ((size_t)(j->end - j->p) >= n && memcmp(j->p, word, n) == 0) { j->p += n; return 1; }
    return 0;
}

// Python's NUMBER_RE: -?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?
static void jsonl_number(JsonLine* j) {
    if (j->p < j->end && *j->p == '-') j->p++;
    if (j->p < j->end && *j->p == '0') j->p++;
    else if (j->p < j->end && *j->p >= '1' && *j->p <= '9') while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    else { jsonl_fail(j, "expecting a value"); return; }
    const char* mark = j->p;
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (j->p == j->end || *j->p < '0' || *j->p > '9') { j->p = mark; return; }  // "1." is 1 then junk
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    }
    mark = j->p;
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
        if (j->p == j->end || *j->p < '0' || *j->p > '9') { j->p = mark; return; }
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    }
}

#define JSONL_MAX_DEPTH 512

// Where each requested key's value was found in one line.
typedef struct {
    int found;           // 0: absent, 1: a string, -1: another type
    const char* type;    // the other type's name
    size_t offset, len;  // the decoded string inside the worker's buffer
} JsonlField;

// What the top-level object's members are matched against (NULL for nested values).
typedef struct {
    const char* const* keys;
    int num_keys;
    JsonlField* fields;
    ByteBuf* text;  // decoded strings of the requested keys
    ByteBuf* key;   // the member name being matched
} JsonlCapture;

static const char* jsonl_skip_value(JsonLine* j, int depth);

static int jsonl_key_index(const JsonlCapture* c) {
    for (int k = 0; k < c->num_keys; k++)
        if (strlen(c->keys[k]) == c->key->len && memcmp(c->keys[k], c->key->data, c->key->len) == 0) return k;
    return -1;
}

// An object at j->p (at its '{'). With a capture, members named by the requested keys are
// recorded; a key given twice keeps its last value, as in Python's dict.
static void jsonl_object(JsonLine* j, int depth, JsonlCapture* c) {
    j->p++;
    jsonl_ws(j);
    if (j->p < j->end && *j->p == '}') { j->p++; return; }
    for (;;) {
        jsonl_ws(j);
        if (j->p == j->end || *j->p != '"') { jsonl_fail(j, "expecting a property name in double quotes"); return; }
        if (c) c->key->len = 0;
        jsonl_string(j, c ? c->key : NULL);
        if (j->error) return;
        int k = c ? jsonl_key_index(c) : -1;
        jsonl_ws(j);
        if (j->p == j->end || *j->p != ':') { jsonl_fail(j, "expecting ':' delimiter"); return; }
        j->p++;
        jsonl_ws(j);
        if (k >= 0 && j->p < j->end && *j->p == '"') {
            c->fields[k].found = 1;
            c->fields[k].offset = c->text->len;
            jsonl_string(j, c->text);
            c->fields[k].len = c->text->len - c->fields[k].offset;
        } else {
            const char* type = jsonl_skip_value(j, depth + 1);
            if (k >= 0) { c->fields[k].found = -1; c->fields[k].type = type; }
        }
        if (j->error) return;
        jsonl_ws(j);
        if (j->p < j->end && *j->p == ',') { j->p++; continue; }
        if (j->p < j->end && *j->p == '}') { j->p++; return; }
        jsonl_fail(j, "expecting ',' or '}'");
        return;
    }
}

// Skip one value of any type; returns its type name for error messages.
static const char* jsonl_skip_value(JsonLine* j, int depth) {
    jsonl_ws(j);
    if (j->p == j->end) { jsonl_fail(j, "expecting a value"); return "nothing"; }
    if (depth > JSONL_MAX_DEPTH) { jsonl_fail(j, "nested too deeply"); return "nothing"; }
    char c = *j->p;
    if (c == '"') { jsonl_string(j, NULL); return "a string"; }
    if (c == '{') { jsonl_object(j, depth, NULL); return "an object"; }
    if (c == '[') {
        j->p++;
        jsonl_ws(j);
        if (j->p < j->end && *j->p == ']') { j->p++; return "an array"; }
        for (;;) {
            jsonl_skip_value(j, depth + 1);
            if (j->error) break;
            jsonl_ws(j);
            if (j->p < j->end && *j->p == ',') { j->p++; continue; }
            if (j->p < j->end && *j->p == ']') { j->p++; break; }
            jsonl_fail(j, "expecting ',' or ']'");
            break;
        }
        return "an array";
    }
    if (jsonl_literal(j, "null")) return "null";
    if (jsonl_literal(j, "true") || jsonl_literal(j, "false")) return "a boolean";
    if (jsonl_literal(j, "NaN") || jsonl_literal(j, "Infinity") || jsonl_literal(j, "-Infinity")) return "a number";
    jsonl_number(j);
    return "a number";
}

// Parse one line holding an object; fill fields[k] for keys[k]. On error returns a
// message (with the column) written into `message`.
static const char* jsonl_parse_line(const char* line, size_t n, const char* const* keys, int num_keys,
                                    JsonlField* fields, ByteBuf* text, ByteBuf* key, int64_t* replaced,
                                    char* message, size_t message_cap) {
    JsonLine j = {line, line + n, NULL, NULL, 0};
    JsonlCapture capture = {keys, num_keys, fields, text, key};
    memset(fields, 0, num_keys * sizeof(JsonlField));
    jsonl_ws(&j);
    if (j.p == j.end || *j.p != '{') jsonl_fail(&j, "expecting a JSON object '{'");
    else jsonl_object(&j, 1, &capture);
    jsonl_ws(&j);
    if (!j.error && j.p != j.end) jsonl_fail(&j, "extra data after the object");
    *replaced += j.replaced;
    if (j.error) {
        snprintf(message, message_cap, "%s at column %d", j.error, (int)(j.error_at - line) + 1);
        return message;
    }
    for (int k = 0; k < num_keys; k++) {
        if (fields[k].found == 0) { snprintf(message, message_cap, "missing key '%s'", keys[k]); return message; }
        if (fields[k].found < 0) {
            snprintf(message, message_cap, "key '%s' holds %s, not a string", keys[k], fields[k].type);
            return message;
        }
    }
    return NULL;
}

// ----------------------------------------------------------------------------
// lines and text documents

// The line at p: returns its end (the terminator), *next = the start of the next line.
// Terminators are \n, \r\n and \r, as in Python's universal newlines.
static const char* line_end(const char* p, const char* end, const char** next) {
    const char* nl = (const char*)memchr(p, '\n', end - p);
    const char* stop = nl ? nl : end;
    const char* cr = (const char*)memchr(p, '\r', stop - p);
    if (cr) { *next = cr + 1 < end && cr[1] == '\n' ? cr + 2 : cr + 1; return cr; }
    *next = nl ? nl + 1 : end;
    return stop;
}

static int is_blank_line(const char* p, const char* e) {
    while (p < e && (*p == ' ' || *p == '\t')) p++;
    return p == e;
}

// ----------------------------------------------------------------------------
// batches: a worker parses and tokenizes one, the writer writes them in order

typedef struct {
    TokenList tokens;  // every sequence of the batch, back to back
    IntBuf seq_lens;   // tokens per sequence
    IntBuf doc_seqs;   // sequences per written document (documents left empty are not here)
    int64_t empty_docs;
} KeyOutput;

enum { SLOT_FREE, SLOT_BUSY, SLOT_READY };

typedef struct {
    int state;
    int64_t index;
    const char* begin;  // whole lines (jsonl) or whole documents (text)
    const char* end;
    int64_t docs;       // input documents read (bad lines excluded)
    int64_t lines;      // lines read, to number the lines of later batches
    int64_t bad_lines;  // skipped by --skip-bad-lines
    int num_errors;     // the first MAX_REPORTED of them: line within the batch (from 1), message
    int64_t error_lines[MAX_REPORTED];
    char errors[MAX_REPORTED][256];
    int64_t replaced;
    KeyOutput out[MAX_KEYS];
} WorkBatch;

// A worker's scratch space.
typedef struct {
    ByteBuf text;  // decoded field strings
    ByteBuf key;   // the current JSON key
    JsonlField fields[MAX_KEYS];
    size_t* starts;  // sentence spans
    size_t* lens;
    size_t spans_cap;
} WorkerScratch;

typedef struct {
    const PreproArgs* args;
    const Tokenizer* tok;
    const char* data;   // the whole input
    size_t size;
    size_t batch_bytes; // batches are cut after this many bytes, at the next boundary
    pthread_mutex_t lock;
    pthread_cond_t slot_freed, slot_ready;
    WorkBatch* slots;
    int num_slots;
    size_t cursor;      // input bytes already handed out
    int64_t batches_cut;
} PreproPipeline;

// Megatron's Encoder.encode for one field: sentences, tokens, empties dropped, EOD.
static void encode_document(PreproPipeline* pl, WorkerScratch* s, const char* text, size_t len, KeyOutput* out) {
    const PreproArgs* a = pl->args;
    size_t num_spans = 1;
    if (a->split_sentences) {
        num_spans = split_sentences(text, len, s->starts, s->lens, s->spans_cap);
        if (num_spans > s->spans_cap) {
            size_t cap = s->spans_cap;
            s->starts = (size_t*)buf_grow(s->starts, &cap, num_spans, sizeof(size_t));
            s->lens = (size_t*)buf_grow(s->lens, &s->spans_cap, num_spans, sizeof(size_t));
            num_spans = split_sentences(text, len, s->starts, s->lens, s->spans_cap);
        }
        // --keep-newlines (Megatron's CustomLanguageVars): what lies between two sentences
        // stays at the end of the first one instead of being dropped.
        if (a->keep_newlines)
            for (size_t i = 0; i + 1 < num_spans; i++) s->lens[i] = s->starts[i + 1] - s->starts[i];
    } else {
        s->starts[0] = 0;
        s->lens[0] = len;
    }
    size_t num_seqs = 0;
    for (size_t i = 0; i < num_spans; i++) {
        size_t before = out->tokens.len;
        tokenizer_encode(pl->tok, text + s->starts[i], s->lens[i], &out->tokens);
        size_t n = out->tokens.len - before;
        if (n == 0) continue;
        if (n > INT32_MAX - 1) die("a sentence of %zu tokens does not fit Megatron's int32 sizes", n);
        buf_push_int(&out->seq_lens, (int32_t)n);
        num_seqs++;
    }
    if (num_seqs == 0) { out->empty_docs++; return; }
    if (a->append_eod) {
        token_list_push(&out->tokens, tokenizer_eod(pl->tok));
        out->seq_lens.data[out->seq_lens.len - 1]++;
    }
    buf_push_int(&out->doc_seqs, (int32_t)num_seqs);
}

static void batch_add_bad_line(WorkBatch* b, int64_t line, const char* message) {
    if (b->num_errors < MAX_REPORTED) {
        b->error_lines[b->num_errors] = line;
        snprintf(b->errors[b->num_errors++], sizeof(b->errors[0]), "%s", message);
    }
    b->bad_lines++;
}

static void process_jsonl(PreproPipeline* pl, WorkerScratch* s, WorkBatch* b) {
    const PreproArgs* a = pl->args;
    char message[256];
    const char* next;
    for (const char* p = b->begin; p < b->end; p = next) {
        const char* e = line_end(p, b->end, &next);
        b->lines++;
        if (is_blank_line(p, e)) continue;
        s->text.len = 0;
        const char* error = jsonl_parse_line(p, e - p, a->json_keys, a->num_keys, s->fields, &s->text, &s->key,
                                            &b->replaced, message, sizeof(message));
        if (error) {
            batch_add_bad_line(b, b->lines, error);
            if (!a->skip_bad_lines) return;  // the writer stops at this line
            continue;
        }
        for (int k = 0; k < a->num_keys; k++)
            encode_document(pl, s, s->text.data + s->fields[k].offset, s->fields[k].len, &b->out[k]);
        b->docs++;
    }
}

static void process_text(PreproPipeline* pl, WorkerScratch* s, WorkBatch* b) {
    const char* next;
    s->text.len = 0;
    for (const char* p = b->begin; p < b->end; p = next) {
        const char* e = line_end(p, b->end, &next);
        b->lines++;
        int blank = is_blank_line(p, e);
        if (!blank) {
            b->replaced += utf8_copy_replacing(&s->text, p, e - p);
            if (next > e) buf_append(&s->text, "\n", 1);
        }
        if ((blank || next == b->end) && s->text.len) {
            encode_document(pl, s, s->text.data, s->text.len, &b->out[0]);
            b->docs++;
            s->text.len = 0;
        }
    }
}

// The end of the batch that starts at `from`: after `batch_bytes`, at the next line
// end (jsonl) or after the next blank line (text), so no document straddles two batches.
static size_t cut_batch(const PreproPipeline* pl, size_t from) {
    const char* end = pl->data + pl->size;
    if (pl->size - from <= pl->batch_bytes) return pl->size;
    const char* p = pl->data + from + pl->batch_bytes;
    const char* nl = (const char*)memchr(p, '\n', end - p);
    if (!nl) return pl->size;
    p = nl + 1;  // a line start whatever the terminators
    if (pl->args->input_format == FORMAT_JSONL) return p - pl->data;
    const char* next;
    for (; p < end; p = next) {
        const char* e = line_end(p, end, &next);
        if (is_blank_line(p, e)) return next - pl->data;
    }
    return pl->size;
}

static void batch_reset(WorkBatch* b, int num_keys) {
    b->docs = b->lines = b->bad_lines = b->replaced = 0;
    b->num_errors = 0;
    for (int k = 0; k < num_keys; k++) {
        b->out[k].tokens.len = b->out[k].seq_lens.len = b->out[k].doc_seqs.len = 0;
        b->out[k].empty_docs = 0;
    }
}

static void* worker_main(void* arg) {
    PreproPipeline* pl = (PreproPipeline*)arg;
    WorkerScratch s;
    memset(&s, 0, sizeof(s));
    s.spans_cap = 64;
    s.starts = (size_t*)xmalloc(s.spans_cap * sizeof(size_t));
    s.lens = (size_t*)xmalloc(s.spans_cap * sizeof(size_t));
    for (;;) {
        pthread_mutex_lock(&pl->lock);
        WorkBatch* b = NULL;
        while (pl->cursor < pl->size && (b = &pl->slots[pl->batches_cut % pl->num_slots])->state != SLOT_FREE)
            pthread_cond_wait(&pl->slot_freed, &pl->lock);
        if (pl->cursor >= pl->size) { pthread_mutex_unlock(&pl->lock); break; }
        size_t to = cut_batch(pl, pl->cursor);
        b->state = SLOT_BUSY;
        b->index = pl->batches_cut++;
        b->begin = pl->data + pl->cursor;
        b->end = pl->data + to;
        pl->cursor = to;
        if (pl->cursor >= pl->size) pthread_cond_broadcast(&pl->slot_ready);  // the writer learns the count
        pthread_mutex_unlock(&pl->lock);

        batch_reset(b, pl->args->num_keys);
        if (pl->args->input_format == FORMAT_JSONL) process_jsonl(pl, &s, b);
        else process_text(pl, &s, b);

        pthread_mutex_lock(&pl->lock);
        b->state = SLOT_READY;
        pthread_cond_broadcast(&pl->slot_ready);
        pthread_mutex_unlock(&pl->lock);
    }
    free(s.text.data); free(s.key.data); free(s.starts); free(s.lens);
    return NULL;
}

// ----------------------------------------------------------------------------
// outputs: removed on any failure, so the final names only ever hold finished files

static IndexedDatasetBuilder g_builders[MAX_KEYS];
static int g_num_builders;

static void remove_unfinished_outputs(void) {
    for (int k = 0; k < g_num_builders; k++)
        if (g_builders[k].bin_tmp) idx_builder_abort(&g_builders[k]);
}

// Ctrl-C / kill: unlink the temporaries (unlink is async-signal-safe) and leave.
static void on_signal(int sig) {
    for (int k = 0; k < g_num_builders; k++) {
        if (g_builders[k].bin_tmp) unlink(g_builders[k].bin_tmp);
        if (g_builders[k].idx_tmp) unlink(g_builders[k].idx_tmp);
    }
    _exit(128 + sig);
}

// ----------------------------------------------------------------------------
// input

typedef struct {
    const char* data;  // the bytes after any UTF-8 byte-order mark
    size_t size;
    void* map;         // what to munmap / free
    size_t map_size;
    int mapped;
} InputFile;

static void input_open(InputFile* in, const char* path) {
    memset(in, 0, sizeof(*in));
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("--input %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("--input %s: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) die("--input %s: is a directory", path);
    if (S_ISREG(st.st_mode)) {
        in->map_size = (size_t)st.st_size;
        if (in->map_size) {
            in->map = mmap(NULL, in->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
            if (in->map == MAP_FAILED) die("--input %s: cannot map it: %s", path, strerror(errno));
            madvise(in->map, in->map_size, MADV_SEQUENTIAL);
            in->mapped = 1;
        }
    } else {  // a pipe: read it all
        ByteBuf all = {NULL, 0, 0};
        char chunk[1 << 16];
        ssize_t got;
        while ((got = read(fd, chunk, sizeof(chunk))) != 0) {
            if (got < 0) { if (errno == EINTR) continue; die("--input %s: %s", path, strerror(errno)); }
            buf_append(&all, chunk, (size_t)got);
        }
        in->map = all.data;
        in->map_size = all.len;
    }
    close(fd);
    in->data = (const char*)in->map;
    in->size = in->map_size;
    if (in->size >= 3 && memcmp(in->data, "\xEF\xBB\xBF", 3) == 0) { in->data += 3; in->size -= 3; }
}

static void input_close(InputFile* in) {
    if (in->mapped) munmap(in->map, in->map_size);
    else free(in->map);
}

// ----------------------------------------------------------------------------
// the writer: batches in input order into the builders, progress, errors

typedef struct {
    int64_t docs, lines, bad_lines, replaced, tokens, empty_docs[MAX_KEYS];
    double start, last_log;
    int64_t last_log_docs;
} PreproTotals;

static void format_duration(char* out, size_t cap, double seconds) {
    long s = (long)(seconds + 0.5);
    if (s >= 3600) snprintf(out, cap, "%ldh%02ldm", s / 3600, s / 60 % 60);
    else if (s >= 60) snprintf(out, cap, "%ldm%02lds", s / 60, s % 60);
    else snprintf(out, cap, "%lds", s);
}

static void log_progress(const PreproTotals* t, size_t done, size_t total) {
    double elapsed = now_seconds() - t->start;
    double mbs = done / 1048576.0 / (elapsed > 0 ? elapsed : 1e-9);
    fprintf(stderr, "Processed %lld documents (%.1f docs/s, %.2f MB/s)", (long long)t->docs,
            t->docs / (elapsed > 0 ? elapsed : 1e-9), mbs);
    if (total) {
        char eta[32];
        format_duration(eta, sizeof(eta), done ? elapsed * (double)(total - done) / done : 0);
        fprintf(stderr, ", %.1f%% of %.1f MB, ETA %s", 100.0 * done / total, total / 1048576.0, eta);
    }
    fprintf(stderr, ".\n");
}

static void write_batch(const PreproArgs* a, WorkBatch* b, PreproTotals* t) {
    for (int k = 0; k < a->num_keys; k++) {
        const KeyOutput* out = &b->out[k];
        const int32_t* tokens = out->tokens.ids;
        size_t seq = 0;
        for (size_t d = 0; d < out->doc_seqs.len; d++) {
            for (int32_t i = 0; i < out->doc_seqs.data[d]; i++, seq++) {
                idx_builder_add_item(&g_builders[k], tokens, (size_t)out->seq_lens.data[seq]);
                tokens += out->seq_lens.data[seq];
            }
            idx_builder_end_document(&g_builders[k]);
        }
        t->tokens += (int64_t)out->tokens.len;
        t->empty_docs[k] += out->empty_docs;
    }
}

static void run_pipeline(const PreproArgs* a, const Tokenizer* tok, const InputFile* in, PreproTotals* t) {
    PreproPipeline pl;
    memset(&pl, 0, sizeof(pl));
    pl.args = a;
    pl.tok = tok;
    pl.data = in->data;
    pl.size = in->size;
    // ~8 batches per worker on small inputs (so all threads get work), 1 MiB on large ones
    size_t per_worker = in->size / (8 * (size_t)a->workers);
    pl.batch_bytes = per_worker < (64 << 10) ? (64 << 10) : per_worker > (1 << 20) ? (1 << 20) : per_worker;
    pl.num_slots = 2 * a->workers + 2;
    pl.slots = (WorkBatch*)xcalloc(pl.num_slots, sizeof(WorkBatch));
    pthread_mutex_init(&pl.lock, NULL);
    pthread_cond_init(&pl.slot_freed, NULL);
    pthread_cond_init(&pl.slot_ready, NULL);
    pthread_t* threads = (pthread_t*)xmalloc(a->workers * sizeof(pthread_t));
    for (int w = 0; w < a->workers; w++)
        if (pthread_create(&threads[w], NULL, worker_main, &pl) != 0) die("cannot start worker thread %d", w);

    int warned = 0;
    for (int64_t index = 0;; index++) {
        WorkBatch* b = &pl.slots[index % pl.num_slots];
        pthread_mutex_lock(&pl.lock);
        while (!(b->state == SLOT_READY && b->index == index) && !(pl.cursor >= pl.size && index >= pl.batches_cut))
            pthread_cond_wait(&pl.slot_ready, &pl.lock);
        int finished = !(b->state == SLOT_READY && b->index == index);
        pthread_mutex_unlock(&pl.lock);
        if (finished) break;

        for (int e = 0; e < b->num_errors; e++) {
            int64_t line = t->lines + b->error_lines[e];
            if (!a->skip_bad_lines) die("%s:%lld: %s", a->input, (long long)line, b->errors[e]);
            if (warned++ < MAX_REPORTED) fprintf(stderr, "warning: %s:%lld: %s (line skipped)\n", a->input, (long long)line, b->errors[e]);
        }
        write_batch(a, b, t);
        t->docs += b->docs;
        t->lines += b->lines;
        t->bad_lines += b->bad_lines;
        t->replaced += b->replaced;
        size_t done = (size_t)(b->end - in->data);

        pthread_mutex_lock(&pl.lock);
        b->state = SLOT_FREE;
        pthread_cond_broadcast(&pl.slot_freed);
        pthread_mutex_unlock(&pl.lock);

        double now = now_seconds();
        if (a->log_interval > 0 && t->docs / a->log_interval > t->last_log_docs / a->log_interval && now - t->last_log >= 1.0) {
            log_progress(t, done, in->size);
            t->last_log = now;
            t->last_log_docs = t->docs;
        }
    }
    for (int w = 0; w < a->workers; w++) pthread_join(threads[w], NULL);
    for (int s = 0; s < pl.num_slots; s++)
        for (int k = 0; k < a->num_keys; k++) {
            free(pl.slots[s].out[k].tokens.ids);
            free(pl.slots[s].out[k].seq_lens.data);
            free(pl.slots[s].out[k].doc_seqs.data);
        }
    free(pl.slots);
    free(threads);
}

// ----------------------------------------------------------------------------

// The folder of --output-prefix must exist and be writable: say so before any work.
static void check_output_dir(const char* prefix) {
    const char* slash = strrchr(prefix, '/');
    char dir[4096];
    if (!slash) snprintf(dir, sizeof(dir), ".");
    else snprintf(dir, sizeof(dir), "%.*s", slash == prefix ? 1 : (int)(slash - prefix), prefix);
    struct stat st;
    if (stat(dir, &st) != 0) die("--output-prefix %s: folder %s: %s", prefix, dir, strerror(errno));
    if (!S_ISDIR(st.st_mode)) die("--output-prefix %s: %s is not a folder", prefix, dir);
    if (access(dir, W_OK) != 0) die("--output-prefix %s: folder %s is not writable: %s", prefix, dir, strerror(errno));
}

static void check_readable(const char* flag, const char* path) {
    FILE* f = fopen(path, "rb");
    if (!f) die("%s %s: %s", flag, path, strerror(errno));
    fclose(f);
}

int main(int argc, char** argv) {
    PreproArgs a;
    parse_args(&a, argc, argv);
    check_readable("--vocab-file", a.vocab_file);
    if (a.tokenizer_type == TOK_GPT2BPE) check_readable("--merge-file", a.merge_file);
    check_output_dir(a.output_prefix);
    InputFile in;
    input_open(&in, a.input);
    if (a.input_format == FORMAT_TEXT && !name_ends_with(a.input, ".txt")) {
        size_t i = 0;
        while (i < in.size && (in.data[i] == ' ' || in.data[i] == '\n' || in.data[i] == '\r' || in.data[i] == '\t')) i++;
        if (i < in.size && in.data[i] == '{')
            fprintf(stderr, "note: reading %s as plain text (pass --input-format jsonl if it holds JSON lines)\n", a.input);
    }
    double start = now_seconds();
    Tokenizer* tok = tokenizer_load(a.tokenizer_type, a.vocab_file, a.tokenizer_type == TOK_GPT2BPE ? a.merge_file : NULL);
    if (a.append_eod && tokenizer_eod(tok) < 0)
        die("--append-eod: %s has no end-of-document token (Megatron raises NotImplementedError)", a.tokenizer_name);
    if (a.tokenizer_type != TOK_GPT2BPE && !a.split_sentences)
        fprintf(stderr, "note: BERT data is usually built with --split-sentences (Megatron asks the same)\n");

    const char* level = a.split_sentences ? "sentence" : "document";
    int dtype_code = idx_dtype_code_for_vocab(tokenizer_vocab_size(tok));
    atexit(remove_unfinished_outputs);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGHUP, on_signal);
    for (int k = 0; k < a.num_keys; k++) {
        char prefix[4096];
        if (snprintf(prefix, sizeof(prefix), "%s_%s_%s", a.output_prefix, a.json_keys[k], level) >= (int)sizeof(prefix))
            die("--output-prefix: path too long");
        idx_builder_open(&g_builders[k], prefix, dtype_code);
        g_num_builders = k + 1;
    }

    PreproTotals t;
    memset(&t, 0, sizeof(t));
    t.start = t.last_log = now_seconds();
    run_pipeline(&a, tok, &in, &t);
    for (int k = 0; k < a.num_keys; k++) {
        IndexedDatasetBuilder* b = &g_builders[k];
        char line[4200];
        snprintf(line, sizeof(line), "wrote %s and .idx: %zu documents, %zu sequences", b->bin_path, b->doc_idx_len - 1, b->num_seqs);
        idx_builder_finish(b);
        fprintf(stderr, "%s", line);
        if (t.empty_docs[k]) fprintf(stderr, " (%lld empty documents left out)", (long long)t.empty_docs[k]);
        fprintf(stderr, "\n");
    }
    double elapsed = now_seconds() - t.start;
    fprintf(stderr, "done: %lld documents, %lld tokens, %.1f MB in %.2f s (%.2f MB/s, %d worker%s, %.2f s startup)\n",
            (long long)t.docs, (long long)t.tokens, in.size / 1048576.0, elapsed,
            in.size / 1048576.0 / (elapsed > 0 ? elapsed : 1e-9), a.workers, a.workers > 1 ? "s" : "", t.start - start);
    if (t.bad_lines) fprintf(stderr, "skipped %lld bad line%s (--skip-bad-lines)\n", (long long)t.bad_lines, t.bad_lines > 1 ? "s" : "");
    if (t.replaced) fprintf(stderr, "replaced %lld invalid UTF-8 sequence%s by U+FFFD\n", (long long)t.replaced, t.replaced > 1 ? "s" : "");
    tokenizer_free(tok);
    input_close(&in);
    return 0;
}
