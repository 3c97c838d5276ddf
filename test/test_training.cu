/*
test_training.cu: the training-support pieces against Megatron-LM's formulas: the
learning-rate schedule (counted in samples), batch ramp-up, the fp16 loss scaler and
the model-FLOPs count.
*/
#include "../megatron.h"
#include "test.h"

static Args base_args(void) {
    Args a;
    args_defaults(&a);
    a.lr = 1e-3;
    a.min_lr = 1e-4;
    a.global_batch_size = 4;
    a.lr_warmup_iters = 10;   // 40 samples
    a.lr_decay_iters = 110;   // 440 samples
    return a;
}

static int near(double a, double b) { return fabs(a - b) <= 1e-12 + 1e-9 * fabs(b); }

static void test_lr_schedule(void) {
    Args a = base_args();
    a.lr_decay_style = "linear";
    LRSchedule s = lr_schedule_from_args(&a, 1000);
    check(s.warmup_samples == 40 && s.decay_samples == 440, "iteration flags become samples", "%lld %lld",
          (long long)s.warmup_samples, (long long)s.decay_samples);
    check(lr_at(&s, 0) == 0.0, "warmup starts at lr 0 (Megatron's first update)", "%g", lr_at(&s, 0));
    check(near(lr_at(&s, 20), 5e-4) && near(lr_at(&s, 40), 1e-3), "linear warmup", "%g %g", lr_at(&s, 20), lr_at(&s, 40));
    check(near(lr_at(&s, 240), 1e-4 + 0.5 * 9e-4), "linear decay midpoint", "%g", lr_at(&s, 240));
    check(near(lr_at(&s, 440), 1e-4) && near(lr_at(&s, 900), 1e-4), "min lr at and after the decay end", "%g", lr_at(&s, 900));
    a.lr_decay_style = "cosine";
    s = lr_schedule_from_args(&a, 1000);
    check(near(lr_at(&s, 240), 0.5 * (1e-3 + 1e-4)), "cosine decay midpoint", "%g", lr_at(&s, 240));
    check(near(lr_at(&s, 40 + 100), 1e-4 + 0.5 * (cos(M_PI * 0.25) + 1) * 9e-4), "cosine at a quarter", "%g", lr_at(&s, 140));
    a.lr_decay_style = "constant";
    s = lr_schedule_from_args(&a, 1000);
    check(near(lr_at(&s, 41), 1e-3) && near(lr_at(&s, 5000), 1e-3), "constant after warmup", "%g", lr_at(&s, 5000));
    a.lr_decay_style = "inverse-square-root";
    s = lr_schedule_from_args(&a, 1000);
    check(near(lr_at(&s, 160), 5e-4) && near(lr_at(&s, 1000000), 1e-4), "inverse square root (floored at min lr)", "%g", lr_at(&s, 160));
    a.lr_warmup_iters = 0;
    a.lr_warmup_fraction = 0.1;
    a.lr_decay_style = "linear";
    s = lr_schedule_from_args(&a, 1000);
    check(s.warmup_samples == 44, "--lr-warmup-fraction of the decay", "%lld", (long long)s.warmup_samples);
    a.lr_warmup_fraction = 0;
    a.lr_decay_iters = 0;
    s = lr_schedule_from_args(&a, 1000);
    check(s.decay_samples == 1000 && s.warmup_samples == 0 && near(lr_at(&s, 0), 1e-3), "decay over all samples by default", "%lld",
          (long long)s.decay_samples);
}

static void test_rampup(void) {
    Args a = base_args();
    a.global_batch_size = 16;
    static char* values[] = {(char*)"4", (char*)"4", (char*)"999"};
    a.rampup_batch_size.n = 3;
    a.rampup_batch_size.values = values;
    // 3 increments over 999 samples: one every 333
    int want[][2] = {{0, 4}, {332, 4}, {333, 8}, {666, 12}, {998, 12}, {999, 16}, {5000, 16}};
    int ok = 1;
    for (int i = 0; i < 7; i++) ok &= global_batch_at(&a, want[i][0]) == want[i][1];
    check(ok, "--rampup-batch-size 4 4 999 grows 4, 8, 12, 16", "at 333: %d", global_batch_at(&a, 333));
}

static void test_loss_scaler(void) {
    Args a = base_args();
    a.loss_scale_window = 3;
    LossScaler s = loss_scaler_from_args(&a, 1);
    check(s.dynamic && s.scale == 4294967296.0, "fp16 starts at 2^32", "%g", s.scale);
    loss_scaler_update(&s, 1);
    check(s.scale == 4294967296.0, "first overflow is absorbed by hysteresis 2", "%g", s.scale);
    loss_scaler_update(&s, 1);
    check(s.scale == 2147483648.0, "second overflow halves the scale", "%g", s.scale);
    loss_scaler_update(&s, 1);
    check(s.scale == 1073741824.0, "later overflows halve it again (hysteresis used up)", "%g", s.scale);
    for (int i = 0; i < 3; i++) loss_scaler_update(&s, 0);
    check(s.scale == 2147483648.0, "a window of clean steps doubles it", "%g", s.scale);
    loss_scaler_update(&s, 1);
    check(s.scale == 2147483648.0, "growth resets the hysteresis", "%g", s.scale);
    a.min_loss_scale = 1.0;
    LossScaler t = loss_scaler_from_args(&a, 1);
    for (int i = 0; i < 100; i++) loss_scaler_update(&t, 1);
    check(t.scale == 1.0, "never below --min-loss-scale", "%g", t.scale);
    a.loss_scale = 128;
    LossScaler c = loss_scaler_from_args(&a, 1);
    loss_scaler_update(&c, 1);
    check(!c.dynamic && c.scale == 128, "--loss-scale is constant", "%g", c.scale);
    LossScaler none = loss_scaler_from_args(&a, 0);
    check(none.scale == 1.0 && !none.dynamic, "no scaling outside fp16", "%g", none.scale);
}

static void test_flops(void) {
    // GPT-2 124M: 72*12*768^2 + 12*12*1024*768 + 6*50304*768
    double want = 72.0 * 12 * 768 * 768 + 12.0 * 12 * 1024 * 768 + 6.0 * 50304 * 768;
    check(gpt_flops_per_token(12, 768, 1024, 50304) == want, "model FLOPs per token (Megatron-2 §5.1)", "%g", want);
    double per_iter = 72.0 * 8 * 1024 * 12 * 768 * 768 * (1 + 1024.0 / (6 * 768) + 50304.0 / (12 * 768 * 12));
    check(fabs(gpt_flops_per_token(12, 768, 1024, 50304) * 8 * 1024 - per_iter) < 1e-6 * per_iter,
          "equals Megatron's per-iteration formula / tokens", "%g", per_iter);
    check(peak_tflops_for("NVIDIA H200") == 989.0 && peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0 &&
          peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0 && peak_tflops_for("CPU") == 0.0, "peak table", "");
}

int main(void) {
    test_lr_schedule();
    test_rampup();
    test_loss_scaler();
    test_flops();
    return test_summary();
}
