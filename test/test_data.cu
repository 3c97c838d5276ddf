/*
test_data: Megatron's data pipeline (section `data` of megatron.h), CPU only.

- the .bin/.idx writer against the worked example of Megatron's format, byte for byte,
  and a writer -> reader round trip (uint16 and int32 tokens, several sequences per document)
- every broken input the reader must refuse with one clear line (checked in a child process)
- --split, numpy's legacy shuffle, the GPT sample index and blending against
  test/fixtures/data_gpt.txt, made by test/make_data_fixtures.py (Megatron's code
  re-implemented on numpy), including multi-epoch splits with and without a separate
  last epoch, empty documents, and blends of one, two and three datasets
- the same on real text: a Gutenberg book as bytes (needs $MEGATRON_DATA; skipped without)

Run from the repository root.
*/
#include <sys/wait.h>

#include "../megatron.h"
#include "test.h"

#define FIXTURE "test/fixtures/data_gpt.txt"

static char tmp_dir[] = "/tmp/test_data_XXXXXX";

static char* tmp_path(const char* name) { return idx_path_join(tmp_dir, name); }

// ---- expected deaths --------------------------------------------------------------------

// Run fn(arg) in a child process; it must exit with want_status (1: die, 2: a flag's error) and
// the first line of its stderr must contain `want`. Never a signal, never a silent success.
static void expect_die(const char* name, void (*fn)(void*), void* arg, const char* want, int want_status = 1) {
    int fds[2];
    if (pipe(fds) != 0) die("pipe: %s", strerror(errno));
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) die("fork: %s", strerror(errno));
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], 2);
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 1);
        fn(arg);
        _exit(0);
    }
    close(fds[1]);
    char buf[4096];
    size_t len = 0;
    ssize_t got;
    while ((got = read(fds[0], buf + len, sizeof(buf) - 1 - len)) > 0) len += (size_t)got;
    close(fds[0]);
    buf[len] = '\0';
    char* newline = strchr(buf, '\n');
    if (newline) *newline = '\0';
    int status;
    waitpid(pid, &status, 0);
    int died = WIFEXITED(status) && WEXITSTATUS(status) == want_status;
    check(died && strstr(buf, want) != NULL, name, "%s, stderr \"%s\", expected \"%s\" and exit %d",
          WIFSIGNALED(status) ? "killed by a signal" : WIFEXITED(status) ? "exited" : "did not die", buf, want, want_status);
}

// ---- fixtures: "name count v1 v2 ..." per line ------------------------------------------

typedef struct {
    char name[256];
    int count;
    char** values;
} FixtureArray;

static FixtureArray* fixtures;
static int num_fixtures;

static void fixtures_load(void) {
    FILE* f = fopen(FIXTURE, "r");
    if (!f) die("cannot open %s (run from the repository root): %s", FIXTURE, strerror(errno));
    char word[256];
    int capacity = 256;
    fixtures = (FixtureArray*)xmalloc(capacity * sizeof(FixtureArray));
    while (fscanf(f, "%255s", word) == 1) {
        if (word[0] == '#') {
            int c;
            while ((c = fgetc(f)) != EOF && c != '\n') {}
            continue;
        }
        if (num_fixtures == capacity) {
            capacity *= 2;
            fixtures = (FixtureArray*)realloc(fixtures, capacity * sizeof(FixtureArray));
        }
        FixtureArray* a = &fixtures[num_fixtures++];
        snprintf(a->name, sizeof(a->name), "%s", word);
        if (fscanf(f, "%d", &a->count) != 1) die("%s: no count after %s", FIXTURE, word);
        a->values = (char**)xmalloc(a->count * sizeof(char*));
        for (int i = 0; i < a->count; i++) {
            if (fscanf(f, "%255s", word) != 1) die("%s: %s is short", FIXTURE, a->name);
            a->values[i] = strdup(word);
        }
    }
    fclose(f);
}

static const FixtureArray* fx(const char* fmt, ...) {
    char name[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    for (int i = 0; i < num_fixtures; i++)
        if (strcmp(fixtures[i].name, name) == 0) return &fixtures[i];
    die("%s has no array %s (rerun test/make_data_fixtures.py)", FIXTURE, name);
    return NULL;
}

static int64_t fx_int(const FixtureArray* a, int i) { return strtoll(a->values[i], NULL, 10); }
static uint64_t fx_u64(const FixtureArray* a, int i) { return strtoull(a->values[i], NULL, 10); }

// got[0..n) equals the fixture array exactly
template <typename T>
static void check_array(const char* name, const T* got, size_t n, const FixtureArray* want) {
    size_t bad = n;
    if (n == (size_t)want->count)
        for (size_t i = 0; i < n && bad == n; i++)
            if ((int64_t)got[i] != fx_int(want, (int)i)) bad = i;
    if (n != (size_t)want->count) check(0, name, "length %zu, expected %d", n, want->count);
    else check(bad == n, name, "first difference at %zu: %lld, expected %s", bad, bad < n ? (long long)got[bad] : 0LL,
               bad < n ? want->values[bad] : "");
}

// ---- the writer ---------------------------------------------------------------------------

static uint8_t* read_file(const char* path, size_t* n) {
    FILE* f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t* data = (uint8_t*)xmalloc(*n);
    if (*n && fread(data, 1, *n, f) != *n) die("cannot read %s", path);
    fclose(f);
    return data;
}

static void write_file(const char* path, const void* data, size_t n) {
    FILE* f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n || fclose(f) != 0) die("cannot write %s", path);
}

static int file_exists(const char* path) { return access(path, F_OK) == 0; }

// megatron-lm-notes.md §1.2: doc0 = [10,11,12,50256], doc1 = [13,50256], GPT-2 vocabulary.
static const uint8_t worked_idx[82] = {
    0x4d, 0x4d, 0x49, 0x44, 0x49, 0x44, 0x58, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x08, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00};
static const uint8_t worked_bin[12] = {0x0a, 0x00, 0x0b, 0x00, 0x0c, 0x00, 0x50, 0xc4, 0x0d, 0x00, 0x50, 0xc4};

static void write_worked_example(const char* prefix) {
    IndexedDatasetBuilder b;
    idx_builder_open(&b, prefix, idx_dtype_code_for_vocab(50257));
    int32_t doc0[4] = {10, 11, 12, 50256}, doc1[2] = {13, 50256};
    idx_builder_add_item(&b, doc0, 4);
    idx_builder_end_document(&b);
    idx_builder_add_item(&b, doc1, 2);
    idx_builder_end_document(&b);
    idx_builder_finish(&b);
}

static void test_worked_example(void) {
    char* prefix = tmp_path("/worked");
    write_worked_example(prefix);
    char* idx = idx_path_join(prefix, ".idx");
    char* bin = idx_path_join(prefix, ".bin");
    size_t n_idx, n_bin;
    uint8_t* got_idx = read_file(idx, &n_idx);
    uint8_t* got_bin = read_file(bin, &n_bin);
    check(n_idx == 82 && memcmp(got_idx, worked_idx, 82) == 0, "writer: the 82-byte .idx of the worked example", "%zu bytes, or different", n_idx);
    check(n_bin == 12 && memcmp(got_bin, worked_bin, 12) == 0, "writer: its 12-byte .bin", "%zu bytes, or different", n_bin);
    char tmp_name[512];
    snprintf(tmp_name, sizeof(tmp_name), "%s.tmp-%d", idx, (int)getpid());
    check(!file_exists(tmp_name), "writer: no temporary left after finish", "%s exists", tmp_name);
    check(idx_dtype_code_for_vocab(65499) == 8 && idx_dtype_code_for_vocab(65500) == 4 && idx_dtype_code_for_vocab(30524) == 8,
          "dtype for vocabulary: uint16 below 65500, else int32", "");
    free(got_idx); free(got_bin); free(idx); free(bin); free(prefix);
}

// Documents of 1-3 sequences with random tokens; written, then read back.
static void test_round_trip(int dtype_code) {
    char name[64];
    snprintf(name, sizeof(name), "/roundtrip%d", dtype_code);
    char* prefix = tmp_path(name);
    MT19937 rng;
    mt_seed(&rng, 17 + dtype_code);
    int max_token = dtype_code == IDX_DTYPE_UINT16 ? 65535 : INT32_MAX;
    enum { DOCS = 50, MAX_LEN = 300 };
    int32_t* tokens = (int32_t*)xmalloc(DOCS * 3 * MAX_LEN * sizeof(int32_t));
    int32_t sizes[DOCS * 3];
    int64_t doc_idx[DOCS + 1];
    size_t num_seqs = 0, pos = 0;
    IndexedDatasetBuilder b;
    idx_builder_open(&b, prefix, dtype_code);
    doc_idx[0] = 0;
    for (int d = 0; d < DOCS; d++) {
        int seqs = 1 + (int)(mt_u32(&rng) % 3);
        for (int s = 0; s < seqs; s++) {
            int len = 1 + (int)(mt_u32(&rng) % MAX_LEN);
            for (int i = 0; i < len; i++) tokens[pos + i] = (int32_t)(mt_u32(&rng) % ((uint32_t)max_token + 1));
            idx_builder_add_item(&b, tokens + pos, (size_t)len);
            sizes[num_seqs++] = len;
            pos += (size_t)len;
        }
        idx_builder_end_document(&b);
        doc_idx[d + 1] = (int64_t)num_seqs;
    }
    idx_builder_finish(&b);

    IndexedDataset ds;
    indexed_dataset_open(&ds, prefix);
    char label[128];
    snprintf(label, sizeof(label), "round trip (dtype %d): counts", dtype_code);
    check(ds.num_seqs == num_seqs && ds.num_docs == DOCS && ds.dtype_code == dtype_code, label, "%zu sequences, %zu documents",
          ds.num_seqs, ds.num_docs);
    int same = 1;
    for (size_t i = 0; i < num_seqs; i++) same &= ds.sizes[i] == sizes[i];
    for (int d = 0; d <= DOCS; d++) same &= ds.doc_idx[d] == doc_idx[d];
    snprintf(label, sizeof(label), "round trip (dtype %d): sizes and doc_idx", dtype_code);
    check(same, label, "differ");
    int32_t* got = (int32_t*)xmalloc(pos * sizeof(int32_t));
    size_t at = 0;
    for (size_t i = 0; i < num_seqs; i++) {
        indexed_dataset_read(&ds, i, 0, (size_t)sizes[i], got + at);
        at += (size_t)sizes[i];
    }
    snprintf(label, sizeof(label), "round trip (dtype %d): every token", dtype_code);
    check(memcmp(got, tokens, pos * sizeof(int32_t)) == 0, label, "differ");
    int32_t part[5];
    indexed_dataset_read(&ds, 3, 1, 5 < sizes[3] - 1 ? 5 : (size_t)sizes[3] - 1, part);
    size_t start3 = (size_t)sizes[0] + sizes[1] + sizes[2];
    snprintf(label, sizeof(label), "round trip (dtype %d): a read at an offset", dtype_code);
    check(part[0] == tokens[start3 + 1], label, "got %d, expected %d", part[0], tokens[start3 + 1]);
    indexed_dataset_close(&ds);
    free(got); free(tokens); free(prefix);
}

static void test_abort(void) {
    char* prefix = tmp_path("/aborted");
    IndexedDatasetBuilder b;
    idx_builder_open(&b, prefix, IDX_DTYPE_INT32);
    int32_t t[3] = {1, 2, 3};
    idx_builder_add_item(&b, t, 3);
    char* bin_tmp = strdup(b.bin_tmp);
    int tmp_seen = file_exists(bin_tmp);
    idx_builder_abort(&b);
    char* bin = idx_path_join(prefix, ".bin");
    char* idx = idx_path_join(prefix, ".idx");
    check(tmp_seen && !file_exists(bin_tmp) && !file_exists(bin) && !file_exists(idx), "writer: abort removes the temporaries, writes nothing", "");
    free(bin_tmp); free(bin); free(idx); free(prefix);
}

// ---- broken inputs ------------------------------------------------------------------------

static void open_prefix(void* prefix) {
    IndexedDataset ds;
    indexed_dataset_open(&ds, (const char*)prefix);
}

static void open_unwritable(void* arg) {
    (void)arg;
    IndexedDatasetBuilder b;
    idx_builder_open(&b, "/nonexistent-dir/x/data", IDX_DTYPE_UINT16);
}

static void add_too_big_token(void* prefix) {
    IndexedDatasetBuilder b;
    idx_builder_open(&b, (const char*)prefix, IDX_DTYPE_UINT16);
    int32_t t[2] = {5, 70000};
    idx_builder_add_item(&b, t, 2);
}

// The worked example under `name`, with the .idx replaced by idx[0..n_idx) and the .bin by bin[0..n_bin).
static char* broken_pair(const char* name, const uint8_t* idx, size_t n_idx, const uint8_t* bin, size_t n_bin) {
    char* prefix = tmp_path(name);
    char* idx_path = idx_path_join(prefix, ".idx");
    char* bin_path = idx_path_join(prefix, ".bin");
    write_file(idx_path, idx, n_idx);
    write_file(bin_path, bin, n_bin);
    free(idx_path); free(bin_path);
    return prefix;
}

static void expect_open_dies(const char* name, const char* file, const uint8_t* idx, size_t n_idx, const uint8_t* bin,
                             size_t n_bin, const char* want) {
    char* prefix = broken_pair(file, idx, n_idx, bin, n_bin);
    expect_die(name, open_prefix, prefix, want);
    free(prefix);
}

static void test_broken_inputs(void) {
    uint8_t idx[82 + 8];
    expect_open_dies("reader: .idx cut in the magic", "/cut5", worked_idx, 5, worked_bin, 12, "truncated");
    expect_open_dies("reader: .idx cut in the header", "/cut20", worked_idx, 20, worked_bin, 12, "truncated");
    expect_open_dies("reader: .idx cut in the arrays", "/cut60", worked_idx, 60, worked_bin, 12, "truncated");
    expect_open_dies("reader: .idx one byte short", "/cut81", worked_idx, 81, worked_bin, 12, "truncated");
    expect_open_dies("reader: empty .idx", "/empty", worked_idx, 0, worked_bin, 12, "is empty");
    expect_open_dies("reader: .bin truncated", "/shortbin", worked_idx, 82, worked_bin, 11, "truncated");
    uint8_t long_bin[14] = {0};
    memcpy(long_bin, worked_bin, 12);
    expect_open_dies("reader: .bin longer than the index says", "/longbin", worked_idx, 82, long_bin, 14, "describes 12");
    memcpy(idx, worked_idx, 82);
    idx[3] = 'X';
    expect_open_dies("reader: wrong magic", "/magic", idx, 82, worked_bin, 12, "bad magic");
    memcpy(idx, worked_idx, 82);
    idx[9] = 2;
    expect_open_dies("reader: version 2", "/version", idx, 82, worked_bin, 12, "version 2");
    memcpy(idx, worked_idx, 82);
    idx[17] = 6;
    expect_open_dies("reader: float dtype code", "/dtype", idx, 82, worked_bin, 12, "dtype code 6");
    memcpy(idx, worked_idx, 82);
    memset(idx + 82, 0, 8);
    expect_open_dies("reader: bytes after the arrays", "/extra", idx, 90, worked_bin, 12, "after its arrays");
    memcpy(idx, worked_idx, 82);
    idx[18] = 200;  // N = 200 sequences in 82 bytes
    expect_open_dies("reader: N larger than the file", "/bigN", idx, 82, worked_bin, 12, "truncated");
    memcpy(idx, worked_idx, 82);
    idx[25] = 0x80;  // N near 2^63: no overflow in the size check
    expect_open_dies("reader: huge N", "/hugeN", idx, 82, worked_bin, 12, "truncated");
    memcpy(idx, worked_idx, 82);
    idx[50] = 9;  // pointers[1] = 9, not 8
    expect_open_dies("reader: pointer inconsistent with sizes", "/pointer", idx, 82, worked_bin, 12, "corrupt index");
    memcpy(idx, worked_idx, 82);
    idx[66] = 3;  // doc_idx = {0, 3, 2}
    expect_open_dies("reader: doc_idx not monotone", "/docidx", idx, 82, worked_bin, 12, "doc_idx decreases");
    memcpy(idx, worked_idx, 82);
    idx[74] = 1;  // doc_idx ends at 1, not N = 2
    expect_open_dies("reader: doc_idx not ending at N", "/docend", idx, 82, worked_bin, 12, "doc_idx runs from 0 to 1");
    const char text[] = "{\"text\": \"this is a loose JSON file, not an index, but long enough to pass 34 bytes\"}\n";
    expect_open_dies("reader: a foreign file", "/foreign", (const uint8_t*)text, sizeof(text) - 1, worked_bin, 12, "foreign file");
    uint8_t legacy[48] = {'T', 'N', 'T', 'I', 'D', 'X', 0, 0, 1};
    expect_open_dies("reader: a legacy TNTIDX index", "/legacy", legacy, 48, worked_bin, 12, "legacy");
    char* missing = tmp_path("/missing");
    expect_die("reader: missing files", open_prefix, missing, "cannot open");
    free(missing);
    expect_die("writer: unwritable directory", open_unwritable, NULL, "cannot create /nonexistent-dir/x/data.bin.tmp-");
    char* prefix = tmp_path("/toobig");
    expect_die("writer: token id beyond uint16", add_too_big_token, prefix, "does not fit uint16");
    free(prefix);
}

// ---- --split ------------------------------------------------------------------------------

static void split_dies(void* arg) {
    size_t idx[4];
    split_boundaries((const char*)arg, 3, idx);
}

static void test_split(void) {
    int all = 1, cases = 0;
    for (int c = 0;; c++) {
        char name[64];
        snprintf(name, sizeof(name), "split%d.string", c);
        int found = 0;
        for (int i = 0; i < num_fixtures; i++) found |= strcmp(fixtures[i].name, name) == 0;
        if (!found) break;
        const char* s = fx("split%d.string", c)->values[0];
        size_t size = (size_t)fx_int(fx("split%d.size", c), 0), idx[4];
        const FixtureArray* want = fx("split%d.idx", c);
        split_boundaries(s, size, idx);
        for (int k = 0; k < 4; k++) all &= (int64_t)idx[k] == fx_int(want, k);
        if (!all) {
            printf("  --split %s, %zu: got %zu %zu %zu %zu\n", s, size, idx[0], idx[1], idx[2], idx[3]);
            break;
        }
        cases++;
    }
    check(all && cases >= 10, "split boundaries as get_train_valid_test_split_", "%d cases agreed", cases);
    size_t idx[4];
    split_boundaries(" 969, 30, 1", 1000, idx);
    check(idx[1] == 969 && idx[2] == 999 && idx[3] == 1000, "split: spaces around numbers", "");
    expect_die("split: not a number", split_dies, (void*)"abc", "--split 'abc'", 2);
    expect_die("split: empty field", split_dies, (void*)"1,,2", "--split '1,,2'", 2);
    expect_die("split: negative part", split_dies, (void*)"-1,2,3", "--split '-1,2,3'", 2);
    expect_die("split: all zero", split_dies, (void*)"0,0,0", "add up to 0", 2);
    expect_die("split: Megatron's rounding gives train a negative range", split_dies, (void*)"0,1,1", "negative range");
}

// ---- numpy's legacy RandomState -----------------------------------------------------------

static void test_numpy_rng(void) {
    MT19937 rng;
    mt_seed(&rng, 1234);
    const FixtureArray* raw = fx("mt_raw_seed1234");
    int same = 1;
    for (int i = 0; i < raw->count; i++) same &= mt_u32(&rng) == (uint32_t)fx_u64(raw, i);
    check(same, "MT19937 = numpy RandomState(1234) raw draws", "");
    mt_seed(&rng, 5);
    uint64_t max = fx_u64(fx("interval64_max"), 0);
    const FixtureArray* want = fx("interval64_seed5");
    same = 1;
    for (int i = 0; i < want->count; i++) same &= numpy_random_interval(&rng, max) == fx_u64(want, i);
    check(same, "bounded draws above 2^32 = numpy randint (64-bit masked path)", "");
    uint32_t x[20];
    for (int i = 0; i < 20; i++) x[i] = (uint32_t)i;
    mt_seed(&rng, 99);
    numpy_shuffle(&rng, x, 20);
    check_array("shuffle = numpy RandomState(99).shuffle", x, 20, fx("shuffle20_seed99"));
}

// ---- GPT samples and blending ---------------------------------------------------------------

static int32_t synthetic_token(size_t seq, size_t j) { return (int32_t)((seq * 7919 + j * 31) % 50000); }

// A dataset of fixture sizes (one sequence per document), tokens synthetic_token.
static char* write_synthetic(const char* name) {
    char fname[16];
    snprintf(fname, sizeof(fname), "/%s", name);
    char* prefix = tmp_path(fname);
    const FixtureArray* sizes = fx("%s.sizes", name);
    IndexedDatasetBuilder b;
    idx_builder_open(&b, prefix, IDX_DTYPE_UINT16);
    int32_t tokens[256];
    for (int i = 0; i < sizes->count; i++) {
        size_t n = (size_t)fx_int(sizes, i);
        for (size_t j = 0; j < n; j++) tokens[j] = synthetic_token((size_t)i, j);
        idx_builder_add_item(&b, tokens, n);
        idx_builder_end_document(&b);
    }
    idx_builder_finish(&b);
    return prefix;
}

// --data-path values of a fixture case ("0.3,A,0.7,B"), dataset names replaced by their prefixes.
static int case_paths(const char* name, char** paths) {
    char* list = strdup(fx("%s.data_path", name)->values[0]);
    int n = 0;
    for (char* field = strtok(list, ","); field; field = strtok(NULL, ",")) {
        if (strcmp(field, "A") == 0 || strcmp(field, "B") == 0) {
            char fname[4] = {'/', field[0], 0, 0};
            paths[n++] = tmp_path(fname);
        } else {
            paths[n++] = strdup(field);
        }
    }
    free(list);
    return n;
}

static void check_samples(const char* label, const GPTSampleSet* set, const char* sub) {
    const FixtureArray* ids = fx("%s.sample_ids", sub);
    size_t T1 = (size_t)set->seq_length + 1;
    int32_t* got = (int32_t*)xmalloc(ids->count * T1 * sizeof(int32_t));
    for (int i = 0; i < ids->count; i++) gpt_sample_get(set, (size_t)fx_int(ids, i), got + i * T1);
    check_array(label, got, ids->count * T1, fx("%s.samples", sub));
    free(got);
}

static void check_gpt_dataset(const char* sub, const GPTDataset* g, const char* label_prefix) {
    char label[512];
    snprintf(label, sizeof(label), "%s: %d epochs, separate last epoch %d, %zu samples", label_prefix, g->num_epochs,
             g->separate_last_epoch, g->num_samples);
    check(g->num_epochs == fx_int(fx("%s.num_epochs", sub), 0) && g->separate_last_epoch == fx_int(fx("%s.separate", sub), 0) &&
              (int64_t)g->num_samples == fx_int(fx("%s.len", sub), 0),
          label, "expected %s epochs, separate %s, %s samples", fx("%s.num_epochs", sub)->values[0], fx("%s.separate", sub)->values[0],
          fx("%s.len", sub)->values[0]);
    snprintf(label, sizeof(label), "%s: doc_idx", label_prefix);
    check_array(label, g->doc_idx, g->doc_idx_len, fx("%s.doc_idx", sub));
    snprintf(label, sizeof(label), "%s: sample_idx", label_prefix);
    check_array(label, g->sample_idx, 2 * (g->num_samples + 1), fx("%s.sample_idx", sub));
    snprintf(label, sizeof(label), "%s: shuffle_idx", label_prefix);
    check_array(label, g->shuffle_idx, g->num_samples, fx("%s.shuffle_idx", sub));
}

static void build_case(const char* name, GPTSampleSet sets[3]) {
    char* paths[16];
    int n = case_paths(name, paths);
    const FixtureArray* nums = fx("%s.num_samples", name);
    size_t num_samples[3] = {(size_t)fx_int(nums, 0), (size_t)fx_int(nums, 1), (size_t)fx_int(nums, 2)};
    gpt_build_datasets(sets, n, paths, fx("%s.split", name)->values[0], num_samples, (int)fx_int(fx("%s.seq_length", name), 0),
                       (uint32_t)fx_int(fx("%s.seed", name), 0));
    for (int i = 0; i < n; i++) free(paths[i]);
}

static const char* split_names[3] = {"train", "valid", "test"};

static void test_gpt_case(const char* name) {
    GPTSampleSet sets[3];
    build_case(name, sets);
    for (int k = 0; k < 3; k++) {
        char sub[64], label[256];
        snprintf(sub, sizeof(sub), "%s.%d", name, k);
        snprintf(label, sizeof(label), "%s %s", name, split_names[k]);
        check_gpt_dataset(sub, &sets[k].datasets[0], label);
        snprintf(label, sizeof(label), "%s %s: sample tokens", name, split_names[k]);
        check_samples(label, &sets[k], sub);
        gpt_sampleset_free(&sets[k]);
    }
}

static void test_blend_case(const char* name) {
    GPTSampleSet sets[3];
    build_case(name, sets);
    for (int k = 0; k < 3; k++) {
        char sub[64], label[256];
        snprintf(sub, sizeof(sub), "%s.%d", name, k);
        const GPTSampleSet* set = &sets[k];
        const FixtureArray* lens = fx("%s.component_lens", sub);
        int same = set->blended && set->num_datasets == lens->count && (int64_t)set->num_samples == fx_int(fx("%s.len", sub), 0);
        for (int i = 0; same && i < lens->count; i++) same &= (int64_t)set->datasets[i].num_samples == fx_int(lens, i);
        snprintf(label, sizeof(label), "%s %s: %zu samples from %d datasets", name, split_names[k], set->num_samples, set->num_datasets);
        check(same, label, "expected %s", fx("%s.len", sub)->values[0]);
        snprintf(label, sizeof(label), "%s %s: dataset_index", name, split_names[k]);
        check_array(label, set->dataset_index, set->num_samples, fx("%s.dataset_index", sub));
        snprintf(label, sizeof(label), "%s %s: dataset_sample_index", name, split_names[k]);
        check_array(label, set->dataset_sample_index, set->num_samples, fx("%s.dataset_sample_index", sub));
        snprintf(label, sizeof(label), "%s %s: sample tokens", name, split_names[k]);
        check_samples(label, set, sub);
        gpt_sampleset_free(&sets[k]);
    }
}

typedef struct {
    int n_paths;
    char** paths;
    const char* split;
    size_t num_samples[3];
    int set;     // after building, fetch sample `get` of sets[set]
    size_t get;
} BuildArgs;

static void build_dies(void* arg) {
    BuildArgs* a = (BuildArgs*)arg;
    GPTSampleSet sets[3];
    gpt_build_datasets(sets, a->n_paths, a->paths, a->split, a->num_samples, 8, 5);
    int32_t tokens[9];
    gpt_sample_get(&sets[a->set], a->get, tokens);
}

static void test_gpt_edges(void) {
    char* a = tmp_path("/A");
    char* b = tmp_path("/B");
    GPTSampleSet sets[3];
    size_t only_train[3] = {10, 0, 0};
    gpt_build_datasets(sets, 1, &a, "80,15,5", only_train, 16, 1234);
    check(sets[1].num_samples == 0 && sets[1].num_datasets == 0 && sets[2].num_samples == 0 && sets[0].num_samples >= 10,
          "a request of 0 samples gives an empty set", "valid %zu, test %zu", sets[1].num_samples, sets[2].num_samples);
    for (int k = 0; k < 3; k++) gpt_sampleset_free(&sets[k]);

    BuildArgs args = {1, &a, "1,0,0", {10, 5, 0}, 0, 0};
    expect_die("a split without documents but a request dies", build_dies, &args, "gives the valid split no documents");
    args = (BuildArgs){1, &a, "1,0,0", {10, 0, 0}, 0, 1000};
    expect_die("a sample past the end dies", build_dies, &args, "GPT sample 1000 requested from a set of");
    char* odd[3] = {(char*)"0.5", a, b};
    args = (BuildArgs){3, odd, "1,0,0", {10, 0, 0}, 0, 0};
    expect_die("--data-path with an odd count dies", build_dies, &args, "--data-path: expected one prefix or pairs", 2);
    char* no_weights[2] = {a, b};
    args = (BuildArgs){2, no_weights, "1,0,0", {10, 0, 0}, 0, 0};
    expect_die("--data-path of two prefixes without weights dies", build_dies, &args, "is not a weight", 2);
    // blend3's valid split: B gets about a third of 65 samples but has only 5
    char* blend[6] = {(char*)"0", a, (char*)"1", b, (char*)"2", a};
    size_t blend_request[3] = {100, 10, 10};
    GPTSampleSet probe[3];
    gpt_build_datasets(probe, 6, blend, "80,15,5", blend_request, 8, 5);
    const GPTSampleSet* valid = &probe[1];
    size_t overrun = valid->num_samples;
    for (size_t i = 0; i < valid->num_samples && overrun == valid->num_samples; i++)
        if ((size_t)valid->dataset_sample_index[i] >= valid->datasets[valid->dataset_index[i]].num_samples) overrun = i;
    check(overrun >= blend_request[1] && overrun < valid->num_samples, "a blend serves every requested sample; past them it may run dry",
          "first overrun at %zu of %zu", overrun, valid->num_samples);
    int32_t tokens[9];
    for (size_t i = 0; i < blend_request[1]; i++) gpt_sample_get(valid, i, tokens);
    for (int k = 0; k < 3; k++) gpt_sampleset_free(&probe[k]);
    args = (BuildArgs){6, blend, "80,15,5", {100, 10, 10}, 1, overrun};
    expect_die("a blended sample past its dataset's end dies", build_dies, &args, "ran past its 0.5% headroom");
    free(a); free(b);
}

// ---- real text ----------------------------------------------------------------------------

static uint64_t fnv(uint64_t h, int64_t v) { return (h ^ (uint64_t)v) * 1099511628211ull; }
static const uint64_t FNV_START = 14695981039346656037ull;

// One Gutenberg book, a document per paragraph (split at "\n\n"), bytes as tokens, 256 as EOD.
static void test_gutenberg(void) {
    const char* data_dir = getenv("MEGATRON_DATA") ? getenv("MEGATRON_DATA") : "../shared/data";
    char book[1024];
    snprintf(book, sizeof(book), "%s/corpus/gutenberg/austen-emma.txt", data_dir);
    if (!file_exists(book)) {
        printf("skip gutenberg: %s not found (set MEGATRON_DATA)\n", book);
        return;
    }
    size_t n;
    uint8_t* text = read_file(book, &n);
    char* prefix = tmp_path("/emma");
    IndexedDatasetBuilder b;
    idx_builder_open(&b, prefix, idx_dtype_code_for_vocab(257));
    int32_t* tokens = (int32_t*)xmalloc((n + 1) * sizeof(int32_t));
    size_t docs = 0, total = 0;
    for (size_t start = 0; start <= n;) {
        size_t end = start;
        while (end < n && !(text[end] == '\n' && end + 1 < n && text[end + 1] == '\n')) end++;
        if (end > start) {
            for (size_t i = start; i < end; i++) tokens[i - start] = text[i];
            tokens[end - start] = 256;
            idx_builder_add_item(&b, tokens, end - start + 1);
            idx_builder_end_document(&b);
            docs++;
            total += end - start + 1;
        }
        start = end + 2;
    }
    idx_builder_finish(&b);
    check((int64_t)docs == fx_int(fx("gutenberg.num_docs"), 0) && (int64_t)total == fx_int(fx("gutenberg.num_tokens"), 0),
          "gutenberg: paragraphs and tokens as Python splits them", "%zu documents, %zu tokens", docs, total);

    IndexedDataset ds;
    indexed_dataset_open(&ds, prefix);
    int same = ds.num_seqs == docs;
    size_t at = 0;
    for (size_t s = 0; same && s < ds.num_seqs; s++) {  // every paragraph reads back as the book's bytes
        indexed_dataset_read(&ds, s, 0, (size_t)ds.sizes[s], tokens);
        while (at < n && text[at] == '\n' && at + 1 < n && text[at + 1] == '\n') at += 2;
        for (int i = 0; same && i < ds.sizes[s] - 1; i++) same &= tokens[i] == text[at + i];
        same &= tokens[ds.sizes[s] - 1] == 256;
        at += (size_t)ds.sizes[s] - 1;
    }
    check(same, "gutenberg: the .bin reads back as the book", "differs");
    indexed_dataset_close(&ds);

    GPTSampleSet sets[3];
    const FixtureArray* nums = fx("gutenberg.num_samples");
    size_t num_samples[3] = {(size_t)fx_int(nums, 0), (size_t)fx_int(nums, 1), (size_t)fx_int(nums, 2)};
    double t0 = now_seconds();
    gpt_build_datasets(sets, 1, &prefix, fx("gutenberg.split")->values[0], num_samples, (int)fx_int(fx("gutenberg.seq_length"), 0), 1234);
    printf("     (gutenberg: sample index of %zu + %zu + %zu samples built in %.3f s)\n", sets[0].num_samples, sets[1].num_samples,
           sets[2].num_samples, now_seconds() - t0);
    for (int k = 0; k < 3; k++) {
        char sub[64], label[256];
        snprintf(sub, sizeof(sub), "gutenberg.%d", k);
        const GPTDataset* g = &sets[k].datasets[0];
        uint64_t h_doc = FNV_START, h_sample = FNV_START, h_shuffle = FNV_START;
        for (size_t i = 0; i < g->doc_idx_len; i++) h_doc = fnv(h_doc, g->doc_idx[i]);
        for (size_t i = 0; i < 2 * (g->num_samples + 1); i++) h_sample = fnv(h_sample, g->sample_idx[i]);
        for (size_t i = 0; i < g->num_samples; i++) h_shuffle = fnv(h_shuffle, g->shuffle_idx[i]);
        snprintf(label, sizeof(label), "gutenberg %s: %zu samples, %d epochs, separate %d; index arrays = Megatron's", split_names[k],
                 g->num_samples, g->num_epochs, g->separate_last_epoch);
        check((int64_t)g->num_samples == fx_int(fx("%s.len", sub), 0) && g->num_epochs == fx_int(fx("%s.num_epochs", sub), 0) &&
                  g->separate_last_epoch == fx_int(fx("%s.separate", sub), 0) && h_doc == fx_u64(fx("%s.doc_idx_fnv", sub), 0) &&
                  h_sample == fx_u64(fx("%s.sample_idx_fnv", sub), 0) && h_shuffle == fx_u64(fx("%s.shuffle_idx_fnv", sub), 0),
              label, "differ");
        snprintf(label, sizeof(label), "gutenberg %s: sample tokens", split_names[k]);
        check_samples(label, &sets[k], sub);
        gpt_sampleset_free(&sets[k]);
    }
    free(tokens); free(text); free(prefix);
}

int main(void) {
    if (!mkdtemp(tmp_dir)) die("mkdtemp: %s", strerror(errno));
    fixtures_load();
    test_worked_example();
    test_round_trip(IDX_DTYPE_UINT16);
    test_round_trip(IDX_DTYPE_INT32);
    test_abort();
    test_broken_inputs();
    test_split();
    test_numpy_rng();
    char* a = write_synthetic("A");
    char* b = write_synthetic("B");
    test_gpt_case("gptA");
    test_gpt_case("gptB");
    test_blend_case("blend2");
    test_blend_case("blend3");
    test_blend_case("blend1");
    test_blend_case("blend4");
    test_gpt_edges();
    test_gutenberg();
    free(a); free(b);
    char command[128];
    snprintf(command, sizeof(command), "rm -rf %s", tmp_dir);
    if (system(command) != 0) printf("note: could not remove %s\n", tmp_dir);
    return test_summary();
}
