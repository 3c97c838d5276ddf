/*
test_safetensors.cu: safetensors reading and writing, atomic files (section checkpoint).

Run from the repository root (it reads test/fixtures/st_python.safetensors, written by
Python's safetensors package with test/safetensors_fixture.py). Checks:
  - our writer's files read back exactly, for every dtype, with metadata and odd names;
  - the Python-written fixture reads back the same sample values;
  - every kind of broken file or wrong request dies with one clear line naming the file
    (each failing call runs in a fork()ed child; we check its exit status and stderr);
  - an interrupted write (file size limit) leaves neither the file nor its temporary.
`test_safetensors --write-sample PATH` writes the sample for `safetensors_fixture.py check`.
*/
#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include "../megatron.h"
#include "test.h"

#define FIXTURE "test/fixtures/st_python.safetensors"
static const char* NOTE = "quote \" backslash \\ newline \n tab \t unicode \xc3\xa9 \xe2\x88\x91 \xf0\x9f\x98\x80";

// The sample tensors. safetensors_fixture.py fills the same names with the same values.
typedef struct {
    float f32[15];
    uint16_t bf16[8], f16[4];
    int32_t i32[6];
    int64_t i64[2];
    uint8_t u8[3];
    float scalar;
    double f64[2];
} Sample;

static void sample_fill(Sample* s) {
    memset(s, 0, sizeof(*s));  // padding too: tests compare whole structs
    for (int i = 0; i < 15; i++) s->f32[i] = (float)((i - 7) / 3.0);
    for (int i = 0; i < 8; i++) s->bf16[i] = float_to_bf16((i - 3) * 0.375f);
    for (int i = 0; i < 4; i++) s->f16[i] = float_to_f16((i - 2) * 0.625f);
    for (int i = 0; i < 6; i++) s->i32[i] = i * 1000 - 2500;
    s->i64[0] = -((int64_t)1 << 40);
    s->i64[1] = ((int64_t)1 << 40) + 5;
    s->u8[0] = 0, s->u8[1] = 128, s->u8[2] = 255;
    s->scalar = 42.5f;
    s->f64[0] = 0.1, s->f64[1] = -1e300;
}

static void sample_write(const char* path) {
    Sample s;
    sample_fill(&s);
    int64_t sh_f32[] = {3, 5}, sh_bf16[] = {2, 4}, sh_f16[] = {4}, sh_i32[] = {2, 3}, sh_i64[] = {2}, sh_u8[] = {3},
            sh_empty[] = {0, 4}, sh_f64[] = {2};
    SafeTensorsWriter w;
    st_writer_begin(&w, path);
    st_writer_meta(&w, "format", "pt");
    st_writer_meta(&w, "note", NOTE);
    st_writer_add(&w, "f32", "F32", 2, sh_f32, s.f32);
    st_writer_add(&w, "bf16", "BF16", 2, sh_bf16, s.bf16);
    st_writer_add(&w, "f16", "F16", 1, sh_f16, s.f16);
    st_writer_add(&w, "i32", "I32", 2, sh_i32, s.i32);
    st_writer_add(&w, "i64", "I64", 1, sh_i64, s.i64);
    st_writer_add(&w, "u8", "U8", 1, sh_u8, s.u8);
    st_writer_add(&w, "scalar", "F32", 0, NULL, &s.scalar);
    st_writer_add(&w, "empty", "F32", 2, sh_empty, NULL);
    st_writer_add(&w, "nested.name/with \"quotes\"", "F64", 1, sh_f64, s.f64);
    memset(&s, 0xff, sizeof(s));  // the writer copied the data: clobbering ours must not matter
    st_writer_finish(&w);
}

static int has_shape(const STTensor* t, const char* dtype, int ndim, const int64_t* shape) {
    if (!t || strcmp(t->dtype, dtype) != 0 || t->ndim != ndim) return 0;
    for (int d = 0; d < ndim; d++)
        if (t->shape[d] != shape[d]) return 0;
    return 1;
}

// Opens a sample file (ours or Python's) and checks every tensor and the metadata.
static void sample_check(const char* path, const char* who) {
    Sample want, got;
    sample_fill(&want);
    memset(&got, 0, sizeof(got));
    SafeTensors st;
    safetensors_open(&st, path);
    char name[128];
    int64_t sh_f32[] = {3, 5}, sh_bf16[] = {2, 4}, sh_f16[] = {4}, sh_i32[] = {2, 3}, sh_2[] = {2}, sh_u8[] = {3}, sh_empty[] = {0, 4};
    snprintf(name, sizeof(name), "%s: 9 tensors, 2 metadata entries", who);
    check(st.n == 9 && st.n_meta == 2, name, "n=%d n_meta=%d", st.n, st.n_meta);
    snprintf(name, sizeof(name), "%s: dtypes and shapes", who);
    int64_t none[1] = {0};
    check(has_shape(safetensors_find(&st, "f32"), "F32", 2, sh_f32) && has_shape(safetensors_find(&st, "bf16"), "BF16", 2, sh_bf16) &&
          has_shape(safetensors_find(&st, "f16"), "F16", 1, sh_f16) && has_shape(safetensors_find(&st, "i32"), "I32", 2, sh_i32) &&
          has_shape(safetensors_find(&st, "i64"), "I64", 1, sh_2) && has_shape(safetensors_find(&st, "u8"), "U8", 1, sh_u8) &&
          has_shape(safetensors_find(&st, "scalar"), "F32", 0, none) && has_shape(safetensors_find(&st, "empty"), "F32", 2, sh_empty) &&
          has_shape(safetensors_find(&st, "nested.name/with \"quotes\""), "F64", 1, sh_2),
          name, "a tensor is missing or has the wrong dtype/shape");
    safetensors_read_raw(&st, "f32", got.f32, sizeof(got.f32));
    safetensors_read_raw(&st, "bf16", got.bf16, sizeof(got.bf16));
    safetensors_read_raw(&st, "f16", got.f16, sizeof(got.f16));
    safetensors_read_raw(&st, "i32", got.i32, sizeof(got.i32));
    safetensors_read_raw(&st, "i64", got.i64, sizeof(got.i64));
    safetensors_read_raw(&st, "u8", got.u8, sizeof(got.u8));
    safetensors_read_raw(&st, "scalar", &got.scalar, sizeof(got.scalar));
    safetensors_read_raw(&st, "empty", NULL, 0);
    safetensors_read_raw(&st, "nested.name/with \"quotes\"", got.f64, sizeof(got.f64));
    snprintf(name, sizeof(name), "%s: raw bytes of every tensor", who);
    check(memcmp(&got, &want, sizeof(Sample)) == 0, name, "bytes differ");

    float f[15], want_f[15];
    snprintf(name, sizeof(name), "%s: read_floats F32", who);
    safetensors_read_floats(&st, "f32", f, 15);
    check(memcmp(f, want.f32, sizeof(f)) == 0, name, "values differ");
    snprintf(name, sizeof(name), "%s: read_floats BF16", who);
    safetensors_read_floats(&st, "bf16", f, 8);
    for (int i = 0; i < 8; i++) want_f[i] = (i - 3) * 0.375f;
    check(memcmp(f, want_f, 8 * sizeof(float)) == 0, name, "values differ");
    snprintf(name, sizeof(name), "%s: read_floats F16", who);
    safetensors_read_floats(&st, "f16", f, 4);
    for (int i = 0; i < 4; i++) want_f[i] = (i - 2) * 0.625f;
    check(memcmp(f, want_f, 4 * sizeof(float)) == 0, name, "values differ");

    snprintf(name, sizeof(name), "%s: metadata", who);
    const char* format = safetensors_meta(&st, "format");
    const char* note = safetensors_meta(&st, "note");
    check(format && strcmp(format, "pt") == 0 && note && strcmp(note, NOTE) == 0 && !safetensors_meta(&st, "absent") &&
          !safetensors_find(&st, "absent"), name, "format=%s note=%s", format ? format : "(none)", note ? note : "(none)");
    snprintf(name, sizeof(name), "%s: data region starts 8-byte aligned", who);
    check((st.data - (const uint8_t*)st.map) % 8 == 0, name, "data at byte %td", st.data - (const uint8_t*)st.map);
    safetensors_close(&st);
}

// --- helpers for files and children

static int count_temporaries(const char* dir) {
    DIR* d = opendir(dir);
    int count = 0;
    for (struct dirent* e; d && (e = readdir(d)) != NULL;) count += strstr(e->d_name, ".tmp-") != NULL;
    if (d) closedir(d);
    return count;
}

// A file with the given 8-byte header length, header text and `data_bytes` zero bytes of data.
static void write_raw(const char* path, uint64_t header_len, const char* header, size_t data_bytes) {
    FILE* f = fopen(path, "wb");
    uint8_t len_le[8];
    for (int i = 0; i < 8; i++) len_le[i] = (uint8_t)(header_len >> (8 * i));
    fwrite(len_le, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    for (size_t i = 0; i < data_bytes; i++) fputc(0, f);
    fclose(f);
}

// Runs fn(arg) in a child and expects exit status 1 with exactly one stderr line that starts
// with "error: " and contains want_a and want_b.
static void expect_death(const char* name, void (*fn)(const char*), const char* arg, const char* want_a, const char* want_b) {
    int pipe_fd[2];
    if (pipe(pipe_fd) != 0) die("pipe: %s", strerror(errno));
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pipe_fd[1], 2);
        close(pipe_fd[0]);
        fn(arg);
        _exit(0);
    }
    close(pipe_fd[1]);
    char err[4096];
    size_t len = 0;
    for (ssize_t r; (r = read(pipe_fd[0], err + len, sizeof(err) - 1 - len)) > 0;) len += r;
    err[len] = 0;
    close(pipe_fd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    char* newline = strchr(err, '\n');
    int one_line = newline && newline[1] == 0;
    if (newline) *newline = 0;
    int ok = WIFEXITED(status) && WEXITSTATUS(status) == 1 && one_line && strncmp(err, "error: ", 7) == 0 && strstr(err, want_a) &&
             strstr(err, want_b);
    check(ok, name, "status %d, stderr%s: %s", WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status),
          one_line ? "" : " (not one line)", err);
    if (ok) printf("     %s\n", err);
}

static void child_open(const char* path) {
    SafeTensors st;
    safetensors_open(&st, path);
}

static void child_floats_wrong_count(const char* path) {
    SafeTensors st;
    float buf[16];
    safetensors_open(&st, path);
    safetensors_read_floats(&st, "f32", buf, 16);
}

static void child_floats_absent(const char* path) {
    SafeTensors st;
    float buf[16];
    safetensors_open(&st, path);
    safetensors_read_floats(&st, "wte", buf, 16);
}

static void child_floats_of_ints(const char* path) {
    SafeTensors st;
    float buf[6];
    safetensors_open(&st, path);
    safetensors_read_floats(&st, "i32", buf, 6);
}

static void child_raw_wrong_size(const char* path) {
    SafeTensors st;
    int64_t buf[4];
    safetensors_open(&st, path);
    safetensors_read_raw(&st, "i64", buf, sizeof(buf));
}

static void child_write(const char* path) { sample_write(path); }

// Writes the sample under a 100-byte file size limit: write() fails with EFBIG.
static void child_write_limited(const char* path) {
    struct rlimit limit = {100, 100};
    signal(SIGXFSZ, SIG_IGN);
    setrlimit(RLIMIT_FSIZE, &limit);
    sample_write(path);
}

static void child_make_dirs(const char* path) { make_dirs(path); }

// --- the tests

static void test_round_trip(const char* dir) {
    char path[1024];
    snprintf(path, sizeof(path), "%s/sample.safetensors", dir);
    sample_write(path);
    sample_check(path, "our writer");
    check(count_temporaries(dir) == 0, "writer leaves no temporary", "%d temporaries", count_temporaries(dir));

    // overwriting replaces the file
    float ones[4] = {1, 1, 1, 1}, got[4];
    int64_t shape[] = {4};
    SafeTensorsWriter w;
    st_writer_begin(&w, path);
    st_writer_add(&w, "f32", "F32", 1, shape, ones);
    st_writer_finish(&w);
    SafeTensors st;
    safetensors_open(&st, path);
    safetensors_read_floats(&st, "f32", got, 4);
    check(st.n == 1 && st.n_meta == 0 && memcmp(got, ones, sizeof(ones)) == 0, "overwrite replaces the file", "n=%d", st.n);
    safetensors_close(&st);

    // a file with no tensors at all
    st_writer_begin(&w, path);
    st_writer_finish(&w);
    safetensors_open(&st, path);
    check(st.n == 0 && st.n_meta == 0 && st.data_size == 0, "empty file round trip", "n=%d", st.n);
    safetensors_close(&st);
}

static void test_fixture(void) {
    if (access(FIXTURE, R_OK) != 0) {
        check(0, "python fixture", "cannot read %s (run from the repository root)", FIXTURE);
        return;
    }
    sample_check(FIXTURE, "python fixture");
}

static void test_atomic_helpers(const char* dir) {
    char sub[1024], path[1100], got[16] = {0};
    snprintf(sub, sizeof(sub), "%s/a/b//c/", dir);
    make_dirs(sub);
    make_dirs(sub);  // existing directories are fine
    snprintf(path, sizeof(path), "%s/a/b/c/note.txt", dir);
    write_file_atomic(path, "first", 5);
    write_file_atomic(path, "hello", 5);
    FILE* f = fopen(path, "rb");
    size_t n = f ? fread(got, 1, sizeof(got), f) : 0;
    if (f) fclose(f);
    snprintf(sub, sizeof(sub), "%s/a/b/c", dir);
    check(n == 5 && memcmp(got, "hello", 5) == 0 && count_temporaries(sub) == 0, "make_dirs + write_file_atomic", "read %zu bytes", n);
}

static void test_errors(const char* dir) {
    char path[1024], sample[1024];
    snprintf(sample, sizeof(sample), "%s/good.safetensors", dir);
    sample_write(sample);

    snprintf(path, sizeof(path), "%s/missing.safetensors", dir);
    expect_death("missing file", child_open, path, path, "No such file");
    expect_death("directory instead of a file", child_open, dir, dir, "is a directory");

    snprintf(path, sizeof(path), "%s/short.safetensors", dir);
    FILE* f = fopen(path, "wb");
    fputs("abc", f);
    fclose(f);
    expect_death("file shorter than 8 bytes", child_open, path, path, "not a safetensors file");

    snprintf(path, sizeof(path), "%s/long_header.safetensors", dir);
    write_raw(path, 1000, "{}", 0);
    expect_death("header length past the end", child_open, path, path, "runs past the end of the file");

    // truncated data: a copy of the good file without its last 8 bytes
    snprintf(path, sizeof(path), "%s/truncated.safetensors", dir);
    struct stat sb;
    stat(sample, &sb);
    uint8_t* bytes = (uint8_t*)xmalloc(sb.st_size);
    f = fopen(sample, "rb");
    size_t n = fread(bytes, 1, sb.st_size, f);
    fclose(f);
    write_file_atomic(path, bytes, n - 8);
    free(bytes);
    expect_death("truncated data", child_open, path, path, "out of range");

    // broken headers: each is written with its true length and enough zero data
    struct { const char* name; const char* header; size_t data; const char* want; } cases[] = {
        {"JSON: missing closing brace", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4, "malformed safetensors header JSON"},
        {"JSON: not an object", "[1,2]", 0, "expected '{'"},
        {"JSON: missing colon", "{\"a\" {}}", 0, "expected ':'"},
        {"JSON: unterminated string", "{\"a", 0, "unterminated string"},
        {"JSON: fractional shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, "expected an integer"},
        {"JSON: negative offset", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, "non-negative integer"},
        {"JSON: text after the object", "{} x", 0, "text after"},
        {"JSON: bad escape", "{\"\\q\":{}}", 0, "bad escape"},
        {"unknown dtype", "{\"a\":{\"dtype\":\"F33\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "unknown dtype 'F33'"},
        {"unknown field", "{\"a\":{\"dtype\":\"F32\",\"stride\":[1],\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "unknown header field 'stride'"},
        {"missing shape", "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "lacks \"shape\""},
        {"one offset", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4]}}", 4, "two entries"},
        {"too many dims", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, "more than 8 entries"},
        {"offsets past the data", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, "out of range"},
        {"offsets reversed", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4, "out of range"},
        {"offsets vs dtype*shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,12]}}", 24, "span 12 bytes but F32 [2, 3] needs 24"},
        {"offsets vs BF16 shape", "{\"a\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, "needs 8"},
        {"overlapping tensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "'a' and 'b' overlap"},
        {"duplicate name", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "appears twice"},
        {"metadata value not a string", "{\"__metadata__\":{\"step\":5}}", 0, "metadata value of 'step' is not a string"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(path, sizeof(path), "%s/bad%zu.safetensors", dir, i);
        write_raw(path, strlen(cases[i].header), cases[i].header, cases[i].data);
        expect_death(cases[i].name, child_open, path, path, cases[i].want);
    }

    expect_death("read_floats: wrong element count", child_floats_wrong_count, sample, "'f32'", "shape [3, 5] (15 elements), expected 16");
    expect_death("read_floats: absent tensor", child_floats_absent, sample, "'wte' not found", sample);
    expect_death("read_floats: integer tensor", child_floats_of_ints, sample, "'i32'", "dtype I32");
    expect_death("read_raw: wrong size", child_raw_wrong_size, sample, "'i64'", "(16 bytes), expected 32 bytes");

    expect_death("writer: missing directory", child_write, "/nonexistent-dir/x.safetensors", "/nonexistent-dir/x.safetensors", "No such file");
    snprintf(path, sizeof(path), "%s/limited/big.safetensors", dir);
    make_dirs(strcat(strcpy(sample, dir), "/limited"));
    expect_death("writer: write fails (file size limit)", child_write_limited, path, path, "File too large");
    check(access(path, F_OK) != 0 && count_temporaries(sample) == 0, "failed write leaves no file and no temporary", "%d temporaries",
          count_temporaries(sample));

    snprintf(path, sizeof(path), "%s/a_file", dir);
    write_file_atomic(path, "x", 1);
    strcat(path, "/sub");
    expect_death("make_dirs through a file", child_make_dirs, path, "a_file", "cannot create directory");
}

int main(int argc, char** argv) {
    if (argc == 3 && strcmp(argv[1], "--write-sample") == 0) {
        sample_write(argv[2]);
        return 0;
    }
    char dir[] = "/tmp/test_safetensors-XXXXXX";
    if (!mkdtemp(dir)) die("mkdtemp: %s", strerror(errno));
    test_round_trip(dir);
    test_fixture();
    test_atomic_helpers(dir);
    test_errors(dir);
    remove_tree(dir);
    return test_summary();
}
