/*
test_server.cu: the REST server's request parsing and answer writing (section server).

Checks that a request reads into GenerateRequest with Megatron's defaults, that every malformed
body and every out-of-range field is refused with its message (the server answers those with HTTP
400), and that the answer's JSON escapes what it must. `test_server --serve PORT` runs the server
with a stand-in model instead (fake_generate below) for test/test_server.sh, which checks the
HTTP side with curl.
*/
#include "../megatron.h"
#include "test.h"

// --- the stand-in model: a prompt's tokens are its UTF-8 characters; each new token is a lowercase
// letter drawn from MT19937 (random_seed's, or one generator that continues across requests); the
// log-probability of a token is -(its first byte % 7 + 1) / 4.

typedef struct {
    MT19937 rng;
    int busy, idle_calls;
} FakeModel;

static char* fake_strndup(const char* s, size_t n) {
    char* out = (char*)xmalloc(n + 1);
    memcpy(out, s, n);
    out[n] = 0;
    return out;
}

static void fake_one(const GenerateRequest* req, const char* prompt, MT19937* rng, GeneratedText* g) {
    const char* bos = req->add_BOS ? "<|endoftext|>" : "";
    size_t prompt_len = strlen(prompt), n_new = (size_t)req->tokens_to_generate;
    g->text = (char*)xmalloc(strlen(bos) + prompt_len + n_new + 1);
    sprintf(g->text, "%s%s", bos, prompt);
    g->segments = (char**)xcalloc(prompt_len + n_new + 1, sizeof(char*));
    if (req->add_BOS) g->segments[g->n_tokens++] = fake_strndup(bos, strlen(bos));
    for (size_t i = 0; i < prompt_len;) {
        size_t len = 1;
        while (i + len < prompt_len && ((unsigned char)prompt[i + len] & 0xC0) == 0x80) len++;  // continuation bytes
        g->segments[g->n_tokens++] = fake_strndup(prompt + i, len);
        i += len;
    }
    size_t at = strlen(g->text);
    for (size_t k = 0; k < n_new; k++) {
        char letter = (char)('a' + mt_u32(rng) % 26);
        g->text[at++] = letter;
        g->segments[g->n_tokens++] = fake_strndup(&letter, 1);
    }
    g->text[at] = 0;
    if (!req->logprobs) return;
    g->logprobs = (float*)xmalloc((g->n_tokens ? g->n_tokens : 1) * sizeof(float));
    for (int k = 1; k < g->n_tokens; k++) g->logprobs[k - 1] = -(float)((unsigned char)g->segments[k][0] % 7 + 1) / 4;
}

static int fake_generate(void* ctx, const GenerateRequest* req, GenerateResponse* out, char* err, size_t err_cap) {
    FakeModel* m = (FakeModel*)ctx;
    if (m->busy++) die("the server ran two generations at once");
    MT19937 seeded, *rng = &m->rng;
    if (req->random_seed >= 0) {
        mt_seed(&seeded, (uint32_t)req->random_seed);
        rng = &seeded;
    }
    for (int i = 0; i < req->n_prompts; i++)
        if (strlen(req->prompts[i]) + req->tokens_to_generate > 1024) {
            snprintf(err, err_cap, "Length of prompt + tokens_to_generate longer than allowed");
            m->busy--;
            return 1;
        }
    for (int i = 0; i < req->n_prompts; i++) fake_one(req, req->prompts[i], rng, &out->items[i]);
    usleep(20000);  // long enough for concurrent clients to queue up behind this one
    m->busy--;
    return 0;
}

// The first idle call says so in the log (test_server.sh looks for it).
static void fake_idle(void* ctx) {
    if (((FakeModel*)ctx)->idle_calls++ == 0) printf("stand-in model: idle\n");
    fflush(stdout);
}

// --- parsing

static int parse(const char* body, GenerateRequest* r, char* err) {
    return generate_request_parse(body, strlen(body), r, err, 512);
}

static void test_valid_requests(void) {
    GenerateRequest r;
    char err[512] = "";
    int status = parse("{\"prompts\": [\"Hello world\"]}", &r, err);
    check(status == 0 && r.n_prompts == 1 && !strcmp(r.prompts[0], "Hello world"), "prompts only", "status %d: %s", status, err);
    check(r.tokens_to_generate == 64 && r.temperature == 1.0 && r.top_k == 0 && r.top_p == 0 && !r.logprobs && r.random_seed == -1 &&
              !r.add_BOS && !r.no_log,
          "Megatron's defaults", "tokens %d temperature %g top_k %d top_p %g logprobs %d seed %lld", r.tokens_to_generate, r.temperature,
          r.top_k, r.top_p, r.logprobs, (long long)r.random_seed);
    generate_request_free(&r);

    const char* full =
        " {\"prompts\": [\"a\", \"\", \"q\\\"\\\\\\/\\n\\t\\u00e9\\ud83d\\ude00\xe2\x88\x91\"], \"tokens_to_generate\": 0, \"logprobs\": true,\n"
        "  \"temperature\": 0.5e1, \"top_k\": 1000, \"top_p\": 0, \"random_seed\": 4294967295, \"add_BOS\": true, \"no_log\": true,\n"
        "  \"stop_on_eol\": false, \"top_p_decay\": 0.0, \"stop_token\": 50256, \"unknown_key\": {\"nested\": [1, -2.5E-3, null, \"x\"]}} \r\n";
    status = parse(full, &r, err);
    check(status == 0 && r.n_prompts == 3, "every field", "status %d: %s", status, err);
    if (status == 0) {
        check(!strcmp(r.prompts[1], "") && !strcmp(r.prompts[2], "q\"\\/\n\t\xc3\xa9\xf0\x9f\x98\x80\xe2\x88\x91"), "escapes and UTF-8 in prompts",
              "got '%s'", r.prompts[2]);
        check(r.tokens_to_generate == 0 && r.logprobs && r.temperature == 5.0 && r.top_k == 1000 && r.top_p == 0 &&
                  r.random_seed == 4294967295LL && r.add_BOS && r.no_log,
              "every value", "tokens %d temperature %g top_k %d seed %lld", r.tokens_to_generate, r.temperature, r.top_k,
              (long long)r.random_seed);
    }
    generate_request_free(&r);

    status = parse("{\"prompts\": [\"x\"], \"top_p\": 1, \"temperature\": 100, \"tokens_to_generate\": 2147483647}", &r, err);
    check(status == 0 && r.top_p == 1.0 && r.temperature == 100.0 && r.tokens_to_generate == INT32_MAX, "range ends", "status %d: %s", status, err);
    generate_request_free(&r);
}

// Each body is refused with a message that starts as given.
static void test_refused_requests(void) {
    const char* cases[][2] = {
        {"", "malformed JSON at byte 0: expected '{'"},
        {"[\"Hello\"]", "malformed JSON at byte 0: expected '{'"},
        {"{\"prompts\": [\"a\"]", "malformed JSON at byte 17: expected ','"},
        {"{\"prompts\": [\"a\",]}", "malformed JSON"},
        {"{\"prompts\": [\"a\"]} {}", "malformed JSON at byte 19: text after the closing '}'"},
        {"{\"prompts\": [\"a\"], \"top_k\": 01}", "malformed JSON"},
        {"{\"prompts\": [\"a\"], \"top_k\": 1-2}", "malformed JSON"},
        {"{\"prompts\": [\"a\"], \"top_p\": .5}", "malformed JSON"},
        {"{\"prompts\": [\"a\"], \"top_p\": 1.}", "malformed JSON at byte 30: expected digits after '.'"},
        {"{\"prompts\": [\"a\"], \"top_p\": 1e}", "malformed JSON at byte 30: expected digits in the exponent"},
        {"{\"prompts\": [\"a\"], \"logprobs\": tru}", "malformed JSON"},
        {"{\"prompts\": [\"a\\x\"]}", "malformed JSON at byte 17: bad escape in string"},
        {"{\"prompts\": [\"a\nb\"]}", "malformed JSON at byte 16: control character in string"},
        {"{\"prompts\": [\"\\ud83d\"]}", "malformed JSON at byte 20: lone surrogate in string"},
        {"{\"prompts\": [\"abc", "malformed JSON at byte 17: unterminated string"},
        {"{\"prompts\": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}",
         "malformed JSON at byte 77: nested too deeply"},
        {"{}", "prompts argument required"},
        {"{\"prompt\": [\"a\"]}", "prompts argument required"},
        {"{\"prompts\": [\"a\"], \"prompts\": [\"b\"]}", "duplicate key \"prompts\""},
        {"{\"prompts\": [\"a\"], \"max_len\": 5}", "max_len is no longer used"},
        {"{\"prompts\": \"a\"}", "prompts is not a list of strings"},
        {"{\"prompts\": [\"a\", 1]}", "prompts is not a list of strings"},
        {"{\"prompts\": null}", "prompts is not a list of strings"},
        {"{\"prompts\": []}", "prompts is empty"},
        {"{\"prompts\": [\"a\"], \"tokens_to_generate\": -1}", "tokens_to_generate must be an integer greater than or equal to 0"},
        {"{\"prompts\": [\"a\"], \"tokens_to_generate\": 1.5}", "tokens_to_generate must be an integer"},
        {"{\"prompts\": [\"a\"], \"tokens_to_generate\": 2147483648}", "tokens_to_generate must be an integer"},
        {"{\"prompts\": [\"a\"], \"tokens_to_generate\": \"8\"}", "tokens_to_generate must be an integer"},
        {"{\"prompts\": [\"a\"], \"logprobs\": 1}", "logprobs must be a boolean value"},
        {"{\"prompts\": [\"a\"], \"tokens_to_generate\": 0}", "tokens_to_generate=0 implies logprobs should be True"},
        {"{\"prompts\": [\"a\"], \"temperature\": 0}", "temperature must be a positive number less than or equal to 100.0"},
        {"{\"prompts\": [\"a\"], \"temperature\": -1}", "temperature must be a positive number"},
        {"{\"prompts\": [\"a\"], \"temperature\": 100.5}", "temperature must be a positive number"},
        {"{\"prompts\": [\"a\"], \"temperature\": 1e999}", "temperature must be a positive number"},
        {"{\"prompts\": [\"a\"], \"temperature\": \"hot\"}", "temperature must be a positive number"},
        {"{\"prompts\": [\"a\"], \"top_k\": -1}", "top_k must be an integer equal to or greater than 0 and less than or equal to 1000"},
        {"{\"prompts\": [\"a\"], \"top_k\": 1001}", "top_k must be an integer"},
        {"{\"prompts\": [\"a\"], \"top_k\": 2.0}", "top_k must be an integer"},
        {"{\"prompts\": [\"a\"], \"top_p\": -0.1}", "top_p must be a number from 0 to 1.0"},
        {"{\"prompts\": [\"a\"], \"top_p\": 1.01}", "top_p must be a number from 0 to 1.0"},
        {"{\"prompts\": [\"a\"], \"top_p\": 0.9, \"top_k\": 5}", "cannot set both top-k and top-p samplings."},
        {"{\"prompts\": [\"\"]}", "Empty prompts require add_BOS=true"},
        {"{\"prompts\": [\"a\"], \"add_BOS\": \"yes\"}", "add_BOS must be a boolean value"},
        {"{\"prompts\": [\"a\"], \"stop_on_eol\": true}", "stop_on_eol is not supported by this server"},
        {"{\"prompts\": [\"a\"], \"stop_on_double_eol\": true}", "stop_on_double_eol is not supported by this server"},
        {"{\"prompts\": [\"a\"], \"prevent_newline_after_colon\": true}", "prevent_newline_after_colon is not supported by this server"},
        {"{\"prompts\": [\"a\"], \"top_p\": 0.5, \"top_p_decay\": 0.9}", "top_p_decay is not supported by this server"},
        {"{\"prompts\": [\"a\"], \"top_p\": 0.5, \"top_p_bound\": 0.1}", "top_p_bound is not supported by this server"},
        {"{\"prompts\": [\"a\"], \"random_seed\": -1}", "random_seed must be an integer from 0 to 4294967295"},
        {"{\"prompts\": [\"a\"], \"random_seed\": 4294967296}", "random_seed must be an integer from 0 to 4294967295"},
        {"{\"prompts\": [\"a\"], \"no_log\": null}", "no_log must be a boolean value"},
        {"{\"prompts\": [\"a\"], \"beam_width\": 2}", "beam search (beam_width) is not supported by this server"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        GenerateRequest r;
        char err[512] = "", name[160];
        int status = parse(cases[i][0], &r, err);
        snprintf(name, sizeof(name), "refused: %.60s", cases[i][0]);
        for (char* c = name; *c; c++) if (*c == '\n') *c = ' ';
        check(status == -1 && !strncmp(err, cases[i][1], strlen(cases[i][1])) && r.n_prompts == 0 && !r.prompts, name,
              "status %d, message '%s', expected '%s...'", status, err, cases[i][1]);
    }

    char many[4096] = "{\"prompts\": [";  // one over Megatron's limit
    for (int i = 0; i <= SERVER_MAX_PROMPTS; i++) strcat(many, i ? ", \"p\"" : "\"p\"");
    strcat(many, "]}");
    GenerateRequest r;
    char err[512] = "";
    int status = parse(many, &r, err);
    check(status == -1 && !strcmp(err, "Maximum number of prompts is 128"), "refused: 129 prompts", "status %d, '%s'", status, err);
}

// --- the answer

static void test_response_json(void) {
    char* segs0[] = {(char*)"He", (char*)"llo", (char*)" \"q\" \\ \n\t\x01", (char*)"\xc3\xa9\xf0\x9f\x98\x80"};
    char* segs1[] = {(char*)"x"};
    float lps0[] = {-1.5f, -2.0f, -INFINITY};
    GeneratedText items[2] = {{(char*)"Hello \"q\" \\ \n\t\x01\xc3\xa9\xf0\x9f\x98\x80", 4, segs0, lps0}, {(char*)"x", 1, segs1, NULL}};
    GenerateResponse r = {2, items};
    size_t len;
    char* json = generate_response_json(&r, 0, &len);
    const char* want = "{\"text\": [\"Hello \\\"q\\\" \\\\ \\u000a\\u0009\\u0001\xc3\xa9\xf0\x9f\x98\x80\", \"x\"], "
                       "\"segments\": [[\"He\", \"llo\", \" \\\"q\\\" \\\\ \\u000a\\u0009\\u0001\", \"\xc3\xa9\xf0\x9f\x98\x80\"], [\"x\"]], "
                       "\"logprobs\": null}";
    check(!strcmp(json, want) && len == strlen(want), "answer without logprobs: escaped, UTF-8 as is", "got %s", json);
    free(json);
    json = generate_response_json(&r, 1, &len);
    const char* tail = "\"logprobs\": [[-1.5, -2.0, null], []]}";
    check(len > strlen(tail) && !strcmp(json + len - strlen(tail), tail), "answer with logprobs (n_tokens - 1 each; -2.0 a float; -inf as null)", "got %s", json);
    free(json);
}

// The stand-in model itself, as the shell test relies on it: same seed, same answer.
static void test_fake_model(void) {
    GenerateRequest req;
    char err[512];
    parse("{\"prompts\": [\"ab\\u00e9\", \"c\"], \"tokens_to_generate\": 3, \"logprobs\": true, \"random_seed\": 7}", &req, err);
    FakeModel m;
    memset(&m, 0, sizeof(m));
    mt_seed(&m.rng, 1234);
    GenerateResponse a = {2, (GeneratedText*)xcalloc(2, sizeof(GeneratedText))}, b = {2, (GeneratedText*)xcalloc(2, sizeof(GeneratedText))};
    fake_generate(&m, &req, &a, err, sizeof(err));
    fake_generate(&m, &req, &b, err, sizeof(err));
    check(a.items[0].n_tokens == 6 && strlen(a.items[0].text) == 7 && !strcmp(a.items[0].segments[2], "\xc3\xa9") && !strcmp(a.items[0].text, b.items[0].text) &&
              !strcmp(a.items[1].text, b.items[1].text),
          "stand-in model: tokens and seeded answers", "'%s' '%s'", a.items[0].text, b.items[0].text);
    generate_response_free(&a);
    generate_response_free(&b);
    generate_request_free(&req);
}

int main(int argc, char** argv) {
    if (argc == 3 && !strcmp(argv[1], "--serve")) {
        ServerArgs args;
        ArgSpec specs[2];
        server_args_table(&args, specs);
        args.port = atoi(argv[2]);
        server_args_validate(&args);
        FakeModel m;
        memset(&m, 0, sizeof(m));
        mt_seed(&m.rng, 1234);
        server_run(&args, fake_generate, fake_idle, 0.05, &m);
    }
    test_valid_requests();
    test_refused_requests();
    test_response_json();
    test_fake_model();
    return test_summary();
}
