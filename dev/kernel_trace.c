// GPU time of every kernel, copy and memset of a running program, read through CUPTI's activity
// API (what torch.profiler reads for PyTorch), so both sides of dev/profile_gpt.sh are timed in their
// own training loops. The CUDA driver loads it into any program:
//   CUDA_INJECTION64_PATH=build/libkernel_trace.so KERNEL_TRACE_OUT=ours.json ./train_gpt ...
// A step begins at a launch of a kernel whose name holds KERNEL_TRACE_MARK (default
// "embedding_forward") that follows one whose name does not; the first KERNEL_TRACE_SKIP steps
// (default 2) warm up, the last one may be cut short, the rest are counted. KERNEL_TRACE_OUT gets
// {name: [us per step, launches per step]} (the format of dev/bench_gpt_pytorch.py --profile);
// its "[idle]" entry is the time per step the GPU ran nothing. stderr gets the step's period beside
// the GPU's busy time, and which activities the idle gaps fall between.
// Build: gcc -O2 -shared -fPIC dev/kernel_trace.c -I$CUDA/include -L$CUDA/lib64 -lcupti -lstdc++
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char* __cxa_demangle(const char* mangled, char* out, size_t* length, int* status);  // libstdc++

typedef struct {
    uint64_t start, end;
    int name;  // index into names
} Activity;

static Activity* acts;
static size_t n_acts, cap_acts;
static char** names;
static int n_names;
static size_t cap_names;

static void* grow(void* p, size_t* cap, size_t need, size_t elem) {
    if (need <= *cap) return p;
    *cap = need * 2;
    p = realloc(p, *cap * elem);
    if (!p) { fprintf(stderr, "kernel_trace: out of memory\n"); exit(1); }
    return p;
}

// Names are few (a few hundred): a linear search keeps this short.
static int intern(const char* mangled) {
    int status = -1;
    char* plain = __cxa_demangle(mangled, NULL, NULL, &status);
    const char* name = status == 0 ? plain : mangled;
    int i = 0;
    while (i < n_names && strcmp(names[i], name)) i++;
    if (i == n_names) {
        names = grow(names, &cap_names, n_names + 1, sizeof(char*));
        names[n_names++] = strdup(name);
    }
    free(plain);
    return i;
}

static void record(uint64_t start, uint64_t end, const char* name) {
    acts = grow(acts, &cap_acts, n_acts + 1, sizeof(Activity));
    acts[n_acts++] = (Activity){start, end, intern(name)};
}

static void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
    *size = 8 << 20;
    *buffer = aligned_alloc(8, *size);
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t size, size_t valid) {
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity* r = NULL;
    while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
        if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
            CUpti_ActivityKernel10* k = (CUpti_ActivityKernel10*)r;
            record(k->start, k->end, k->name);
        } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            CUpti_ActivityMemcpy6* m = (CUpti_ActivityMemcpy6*)r;
            record(m->start, m->end, m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD ? "[memcpy HtoD]"
                                     : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH ? "[memcpy DtoH]" : "[memcpy]");
        } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
            CUpti_ActivityMemset4* m = (CUpti_ActivityMemset4*)r;
            record(m->start, m->end, "[memset]");
        }
    }
    free(buffer);
}

static int by_start(const void* a, const void* b) {
    uint64_t x = ((const Activity*)a)->start, y = ((const Activity*)b)->start;
    return (x > y) - (x < y);
}

// A gap between two activities, summed over the counted steps by the pair of names around it.
typedef struct {
    int before, after;
    double us;
    int count;
} Gap;

static int by_us(const void* a, const void* b) {
    double x = ((const Gap*)a)->us, y = ((const Gap*)b)->us;
    return (x < y) - (x > y);
}

static void report(void) {
    cuptiActivityFlushAll(1);
    qsort(acts, n_acts, sizeof(Activity), by_start);
    const char* mark = getenv("KERNEL_TRACE_MARK") ? getenv("KERNEL_TRACE_MARK") : "embedding_forward";
    int skip = getenv("KERNEL_TRACE_SKIP") ? atoi(getenv("KERNEL_TRACE_SKIP")) : 2;
    size_t* step_begin = malloc((n_acts + 1) * sizeof(size_t));
    int n_steps = 0;
    for (size_t i = 0; i < n_acts; i++)
        if (strstr(names[acts[i].name], mark) && (i == 0 || !strstr(names[acts[i - 1].name], mark))) step_begin[n_steps++] = i;
    int counted = n_steps - skip - 1;  // steps with a next step's start to end them
    if (counted < 1) {
        fprintf(stderr, "kernel_trace: %d steps marked by '%s' in %zu activities: too few to count (skip %d)\n", n_steps, mark, n_acts, skip);
        return;
    }
    size_t first = step_begin[skip], last = step_begin[n_steps - 1];  // activities [first, last)
    double* us = calloc(n_names, sizeof(double));
    double* calls = calloc(n_names, sizeof(double));
    size_t cap_gaps = 0;
    int n_gaps = 0;
    Gap* gaps = NULL;
    double busy = 0, idle = 0;
    long n_gaps_total = 0;
    uint64_t covered = acts[first].start;  // end of the union of activities so far
    for (size_t i = first; i < last; i++) {
        const Activity* a = &acts[i];
        us[a->name] += (a->end - a->start) / 1e3;
        calls[a->name] += 1;
        if (a->start > covered && i > first) {
            double g = (a->start - covered) / 1e3;
            idle += g;
            n_gaps_total++;
            int j = 0;
            while (j < n_gaps && !(gaps[j].before == acts[i - 1].name && gaps[j].after == a->name)) j++;
            if (j == n_gaps) {
                gaps = grow(gaps, &cap_gaps, n_gaps + 1, sizeof(Gap));
                gaps[n_gaps++] = (Gap){acts[i - 1].name, a->name, 0, 0};
            }
            gaps[j].us += g;
            gaps[j].count++;
        }
        uint64_t from = a->start > covered ? a->start : covered;
        if (a->end > from) busy += (a->end - from) / 1e3;
        if (a->end > covered) covered = a->end;
    }
    if (acts[last].start > covered) idle += (acts[last].start - covered) / 1e3, n_gaps_total++;
    double period = (acts[last].start - acts[first].start) / 1e3 / counted;
    fprintf(stderr, "kernel_trace: %d steps counted (%d skipped): step %.3f ms, GPU busy %.3f ms (%.1f%%), idle %.3f ms\n", counted, skip,
            period / 1e3, busy / counted / 1e3, 100 * busy / (busy + idle), idle / counted / 1e3);
    qsort(gaps, n_gaps, sizeof(Gap), by_us);
    fprintf(stderr, "kernel_trace: idle us per step by the activities around the gap (gaps per step):\n");
    for (int j = 0; j < n_gaps && j < 12; j++)
        fprintf(stderr, "%10.1f %6.1f  %.60s -> %.60s\n", gaps[j].us / counted, (double)gaps[j].count / counted, names[gaps[j].before],
                names[gaps[j].after]);
    const char* out_path = getenv("KERNEL_TRACE_OUT");
    FILE* out = out_path ? fopen(out_path, "w") : NULL;
    if (out_path && !out) fprintf(stderr, "kernel_trace: cannot write %s\n", out_path);
    if (out) {
        fprintf(out, "{");
        int comma = 0;
        for (int i = 0; i < n_names; i++) {
            if (calls[i] == 0) continue;
            fprintf(out, "%s\n\"", comma++ ? "," : "");
            for (const char* c = names[i]; *c; c++) fprintf(out, *c == '"' || *c == '\\' ? "\\%c" : "%c", *c);
            fprintf(out, "\": [%.3f, %.3f]", us[i] / counted, calls[i] / counted);
        }
        fprintf(out, ",\n\"[idle]\": [%.3f, %.3f]", idle / counted, (double)n_gaps_total / counted);
        fprintf(out, "\n}\n");
        fclose(out);
    }
}

// Called by the CUDA driver when it loads this library (CUDA_INJECTION64_PATH).
int InitializeInjection(void) {
    CUptiResult r = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
    if (r == CUPTI_SUCCESS) r = cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    if (r == CUPTI_SUCCESS) r = cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
    if (r == CUPTI_SUCCESS) r = cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
    if (r != CUPTI_SUCCESS) {
        const char* s;
        cuptiGetResultString(r, &s);
        fprintf(stderr, "kernel_trace: CUPTI activity tracing unavailable: %s\n", s);
        return 1;
    }
    atexit(report);
    return 1;
}
