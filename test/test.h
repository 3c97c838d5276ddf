/*
test.h: the few helpers every test program shares.

A test program calls check(...) / check_close(...) for each assertion (random inputs from
fill_normal, gradients to compare from central_differences) and ends with
`return test_summary();`, which prints "N passed, N failed" (test/run_tests.sh adds
these lines up) and exits non-zero if anything failed.
*/
#ifndef MEGATRON_TEST_H
#define MEGATRON_TEST_H

#include "../megatron.h"
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static int tests_passed = 0, tests_failed = 0;

#ifdef __CUDACC__
// Whether a GPU is there for the tests' GPU parts (they print "skip ..." otherwise).
static int gpu_available(void) {
    int count = 0;
    int found = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
    cudaGetLastError();
    return found;
}

// Median ms of 20 runs (after 3 warm-up runs) of f on d's stream: the --bench timings.
template <typename F>
static double median_ms(const Device* d, F f) {
    cudaEvent_t t0, t1;
    cudaCheck(cudaEventCreate(&t0));
    cudaCheck(cudaEventCreate(&t1));
    float ms[20];
    for (int it = -3; it < 20; it++) {
        cudaCheck(cudaEventRecord(t0, d->stream));
        f();
        cudaCheck(cudaEventRecord(t1, d->stream));
        cudaCheck(cudaEventSynchronize(t1));
        if (it >= 0) cudaCheck(cudaEventElapsedTime(&ms[it], t0, t1));
    }
    cudaCheck(cudaEventDestroy(t0));
    cudaCheck(cudaEventDestroy(t1));
    qsort(ms, 20, sizeof(float), compare_floats);
    return 0.5 * (ms[9] + ms[10]);
}
#endif

// One assertion: prints "ok" or "FAIL" with the name and, on failure, the detail.
static int check(int ok, const char* name, const char* detail_fmt, ...) {
    if (ok) {
        tests_passed++;
        printf("ok   %s\n", name);
    } else {
        tests_failed++;
        printf("FAIL %s: ", name);
        va_list ap;
        va_start(ap, detail_fmt);
        vprintf(detail_fmt, ap);
        va_end(ap);
        printf("\n");
    }
    fflush(stdout);
    return ok;
}

// ||got - want|| / ||want|| over n values (METHOD.md's measure); NaN never passes.
template <typename A, typename B>
static double rel_error(const A* got, const B* want, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double g = (double)got[i], w = (double)want[i];
        if (g != g || w != w) return INFINITY;
        num += (g - w) * (g - w);
        den += w * w;
    }
    if (den == 0) return num == 0 ? 0 : INFINITY;
    return sqrt(num / den);
}

template <typename A, typename B>
static int check_close(const char* name, const A* got, const B* want, size_t n, double tol) {
    double err = rel_error(got, want, n);
    char label[512];
    snprintf(label, sizeof(label), "%s (relative error %.2e)", name, err);
    return check(err <= tol, label, "above the tolerance %.1e (n=%zu)", tol, n);
}

// n draws of N(0, scale^2) from mt.
template <typename real>
static void fill_normal(real* x, size_t n, MT19937* mt, double scale) {
    for (size_t i = 0; i < n; i++) x[i] = (real)(scale * mt_normal(mt));
}

// d loss() / d x[i] for each of the n elements, by central differences of step h (x is
// restored). Returns a malloc'd array.
template <typename F>
static double* central_differences(double* x, size_t n, double h, F loss) {
    double* grad = (double*)xmalloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++) {
        double saved = x[i];
        x[i] = saved + h;
        double up = loss();
        x[i] = saved - h;
        double down = loss();
        x[i] = saved;
        grad[i] = (up - down) / (2 * h);
    }
    return grad;
}

static int test_summary(void) {
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}

#endif
