/* Fused TIES for float32 tensors on the CPU: the two passes of `evolve.merge_methods`'s TIES
 * (`magnitude_cut`'s bracket count, `task_vector_merge`'s chunked combine) as single loops, so
 * each coordinate is read once per pass instead of once per torch / numpy operation.
 *
 * Built and loaded by `evolve/native.py`. Compiled with -ffp-contract=off and without
 * -ffast-math: every product and sum is rounded on its own, in the order the torch path rounds
 * it, so the results are that path's bit for bit (`tests/test_native.py`). The loops work on
 * blocks small enough that all of a block's temporaries stay in the L1 cache; the compiler
 * vectorises each of them.
 */
#include <math.h>
#include <stdint.h>

#define BLOCK 1024 /* coordinates per block: (inputs + 4) arrays of 4 KB */
#define GROUP 16   /* coordinates tested at once when picking a block's bracketed values */

/* One pass over |x - base|: counts the values above `upper` (into *above) and copies the values
 * in [lower, upper] to `inside`, in index order. Returns how many were inside, or -1 when that
 * is more than `capacity` (the caller then takes the exact fallback). `inside` has room for
 * capacity + 1 values (the branch-free copy writes one past the last value it keeps). */
int64_t evofuse_magnitude_bracket(const float *x, const float *base, int64_t count, float lower, float upper,
                                  float *inside, int64_t capacity, int64_t *above)
{
    float magnitude[BLOCK];
    int64_t total_above = 0, total_inside = 0;
    for (int64_t start = 0; start < count; start += BLOCK) {
        const int64_t size = count - start < BLOCK ? count - start : BLOCK;
        const float *xb = x + start, *bb = base + start;
        int64_t block_above = 0, block_inside = 0;
        for (int64_t j = 0; j < size; j++) {
            const float m = fabsf(xb[j] - bb[j]);
            magnitude[j] = m;
            block_above += m > upper;
            block_inside += (m >= lower) & (m <= upper);
        }
        total_above += block_above;
        if (block_inside == 0)
            continue;
        if (total_inside + block_inside > capacity)
            return -1;
        /* the chosen are ~1% of a block: test 16 at a time (vectorised), walk only groups with one */
        int64_t picked = 0;
        for (int64_t group = 0; group < size; group += GROUP) {
            const int64_t end = group + GROUP < size ? group + GROUP : size;
            int any = 0;
            for (int64_t j = group; j < end; j++)
                any |= (magnitude[j] >= lower) & (magnitude[j] <= upper);
            if (!any)
                continue;
            for (int64_t j = group; j < end; j++) { /* branch-free: write, then move past the chosen */
                inside[total_inside + picked] = magnitude[j];
                picked += (magnitude[j] >= lower) & (magnitude[j] <= upper);
            }
        }
        total_inside += picked;
    }
    *above = total_above;
    return total_inside;
}

/* TIES over `k` inputs, written to `out`:
 *   d_i  = w_i * trim_i(x_i - base)       trim_i: keep |tau| > threshold_i, plus the first
 *                                          ties_left[i] entries equal to it (index order);
 *                                          no trim where trimmed[i] is 0
 *   s    = +1 if d_0 + d_1 + ... >= +0 else -1   (copysign: the elected sign)
 *   a_i  = max(s d_i, 0)                  |d_i| where d_i has the elected sign, else 0
 *   out  = base + scale * (sum_i s a_i) / (sum_i w_i [a_i > 0], 0 -> 1)   (no division unless
 *                                          normalize)
 * Products with s = +-1 are exact. `scratch` holds k * BLOCK floats. `ties_left` is updated. */
void evofuse_ties_merge(const float *base, const float *const *inputs, int32_t k, int64_t count,
                        const float *thresholds, const uint8_t *trimmed, int64_t *ties_left,
                        const float *weights, int32_t normalize, float scale, float *scratch, float *out)
{
    float vote[BLOCK], elected[BLOCK], mixed[BLOCK], divisor[BLOCK];
    for (int64_t start = 0; start < count; start += BLOCK) {
        const int64_t size = count - start < BLOCK ? count - start : BLOCK;
        const float *bb = base + start;
        for (int32_t i = 0; i < k; i++) {
            const float *xb = inputs[i] + start;
            float *d = scratch + (int64_t)i * BLOCK;
            const float weight = weights[i];
            if (trimmed[i]) {
                const float threshold = thresholds[i];
                for (int64_t j = 0; j < size; j++) {
                    const float tau = xb[j] - bb[j];
                    d[j] = tau * (fabsf(tau) > threshold ? 1.0f : 0.0f);
                }
                for (int64_t j = 0; j < size && ties_left[i] > 0; j++) {
                    const float tau = xb[j] - bb[j];
                    if (fabsf(tau) == threshold) {
                        d[j] = tau;
                        ties_left[i]--;
                    }
                }
            } else {
                for (int64_t j = 0; j < size; j++)
                    d[j] = xb[j] - bb[j];
            }
            for (int64_t j = 0; j < size; j++)
                d[j] = d[j] * weight;
        }
        for (int64_t j = 0; j < size; j++)
            vote[j] = scratch[j];
        for (int32_t i = 1; i < k; i++) {
            const float *d = scratch + (int64_t)i * BLOCK;
            for (int64_t j = 0; j < size; j++)
                vote[j] = vote[j] + d[j];
        }
        for (int64_t j = 0; j < size; j++) {
            elected[j] = copysignf(1.0f, vote[j]);
            mixed[j] = 0.0f;
            divisor[j] = 0.0f;
        }
        for (int32_t i = 0; i < k; i++) {
            const float *d = scratch + (int64_t)i * BLOCK;
            const float weight = weights[i];
            for (int64_t j = 0; j < size; j++) {
                float agreeing = d[j] * elected[j];
                agreeing = agreeing < 0.0f ? 0.0f : agreeing;
                divisor[j] = divisor[j] + (agreeing > 0.0f ? weight : 0.0f);
                mixed[j] = mixed[j] + agreeing * elected[j];
            }
        }
        float *ob = out + start;
        if (normalize) {
            for (int64_t j = 0; j < size; j++)
                mixed[j] = mixed[j] / (divisor[j] == 0.0f ? 1.0f : divisor[j]);
        }
        if (scale != 1.0f) {
            for (int64_t j = 0; j < size; j++)
                mixed[j] = mixed[j] * scale;
        }
        for (int64_t j = 0; j < size; j++)
            ob[j] = mixed[j] + bb[j];
    }
}
