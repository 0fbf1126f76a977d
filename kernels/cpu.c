/* Fused CPU kernels for the memory- and exp-bound work around the GEMMs of a bf16 training step.
 *
 * Every kernel exists twice: in plain C, written for the compiler's auto-vectoriser (simple inner loops over
 * restrict pointers, no libm calls inside them), and in AVX-512 BF16 intrinsics, compiled instead when the build
 * targets such a CPU (-march=native on one: Sapphire Rapids and later, Zen 4 and later). The intrinsics round to
 * bf16 in hardware, compute exp through scalef and handle row tails with masks instead of scalar epilogues: about
 * 7% of a SmolLM2 bf16 training step on 2 cores. Both are threaded with OpenMP over rows. kernels/cpu.py builds the
 * file on first use with the system C compiler and calls it through ctypes; the PyTorch formulas these replace are
 * in minilora/ops.py and minilora/losses.py, and tests/test_cpu_kernels.py checks every kernel against them (and
 * builds the plain C version too).
 *
 * Numerics: bf16 in and out, every intermediate in fp32, one rounding per output (the PyTorch path rounds after
 * each op, so results may differ from it by one bf16 ulp). Rounding is to nearest even.
 *
 * The causal attention and the LoRA rank-side products at the end are the exception: they exist only for CPUs with
 * AMX tiles (Sapphire Rapids and later); elsewhere the callers use the GEMM attention with the softmax kernels above
 * and PyTorch's matmuls for the LoRA products.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_AVX512BF16 1
#else
#define HAVE_AVX512BF16 0
#endif

typedef uint16_t bf16;

/* 1 when the AVX-512 BF16 versions were compiled in (reported by the benchmarks). */
int simd_avx512bf16(void) { return HAVE_AVX512BF16; }

static inline float b2f(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2b(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

/* exp(x), about 2 ulp in fp32, vectorisable: 2^n * p(r) with r = x - n ln2 (Cody-Waite), n = round(x / ln2).
 * Inputs below -87.3 give 0 (as expf underflows), above 88 are clamped (callers never pass them). */
static inline float fexp(float x) {
    float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = xc - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return x < -87.3f ? 0.0f : p * s;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + fexp(-x)); }

/* ------------------------------------------------------------------ AVX-512 BF16 helpers (16 lanes; masks for
 * row tails, so no scalar epilogues) */
#if HAVE_AVX512BF16
static inline __m512 v_load(const bf16 *p, __mmask16 m) { /* bf16 -> fp32 is a 16-bit shift */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline void v_store(bf16 *p, __m512 x, __mmask16 m) { /* round to nearest even */
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(x));
}

static inline __m512 v_round(__m512 x) { /* to bf16 and back: the value a bf16 store would keep */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

/* Software prefetch distance of the row kernels (elements, 1 KB): their operands stream in from memory (L3 or
 * DRAM) in a training step, where the prefetch makes a difference of about 10%; the hardware does not look far
 * enough ahead on this kind of short-row, several-stream access. */
#define PF_AHEAD 512
static inline void v_prefetch(const bf16 *p) { _mm_prefetch((const char *)p, _MM_HINT_T0); }

static inline __mmask16 v_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

/* fexp's polynomial; scalef applies 2^n (and underflows to 0 below the clamp). */
static inline __m512 v_exp(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* 2^x: a degree-5 fit on the fraction (relative error 3e-7), scalef applies 2^n and gives 0 far below -126. For
 * the attention's probabilities, whose arguments are <= 0 (up to rounding), so no clamping; NaN for -inf. */
static inline __m512 v_exp2(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.340043265e-03f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.676037356e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550327152e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402210683e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471825e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000000119e+00f));
    return _mm512_scalef_ps(p, n);
}

/* 1 / (1 + 2^(-a log2 e)): the exponent clamped to 126 (2^126 is finite, so the quotient stays a tiny positive
 * number for very negative a), the quotient by a reciprocal estimate and one Newton step (about 2^-23 relative)
 * instead of a division, whose 512-bit form is the slowest instruction here. */
static inline __m512 v_sigmoid(__m512 a) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 d = _mm512_add_ps(one, v_exp2(_mm512_min_ps(_mm512_mul_ps(a, _mm512_set1_ps(-(float)M_LOG2E)),
                                                             _mm512_set1_ps(126.0f))));
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

#endif


/* Each kernel below is one exported function holding the loop over rows (threaded with OpenMP) and a per-row
 * function in two versions: AVX-512 BF16 intrinsics (#if HAVE_AVX512BF16) and plain C (#else). */

/* ------------------------------------------------------------------ RMSNorm
 * out = bf16(bf16(x * rstd) * w) per row (Hugging Face's order: normalise in fp32, round, then the weight);
 * rstd = 1 / sqrt(mean(x^2) + eps) in fp32, kept for backward. With a != NULL the residual add comes first:
 * h = bf16(x + a) is written out and normalised (from its rounded value). */
#if HAVE_AVX512BF16
static inline float rms_norm_row(const bf16 *restrict xr, const bf16 *restrict ar, const bf16 *restrict w,
                                 bf16 *restrict hr, bf16 *restrict o, int64_t D, float eps) {
    __m512 vs = _mm512_setzero_ps();
    for (int64_t j = 0; j < D; j += 16) {
        __mmask16 m = v_mask(D - j);
        if ((j & 31) == 0) {
            v_prefetch(xr + j + PF_AHEAD);
            if (ar)
                v_prefetch(ar + j + PF_AHEAD);
        }
        __m512 v = v_load(xr + j, m);
        if (ar) {
            v = v_round(_mm512_add_ps(v, v_load(ar + j, m)));
            v_store(hr + j, v, m);
        }
        vs = _mm512_fmadd_ps(v, v, vs);
    }
    const float r = 1.0f / sqrtf(_mm512_reduce_add_ps(vs) / (float)D + eps);
    const bf16 *restrict src = ar ? hr : xr;
    const __m512 vr = _mm512_set1_ps(r);
    for (int64_t j = 0; j < D; j += 16) {
        __mmask16 m = v_mask(D - j);
        v_store(o + j, _mm512_mul_ps(v_round(_mm512_mul_ps(v_load(src + j, m), vr)), v_load(w + j, m)), m);
    }
    return r;
}

/* dx = rstd * g * w - (rstd^3 / D) * sum(g * w * x) * x (+ gres, when not NULL) */
static inline void rms_norm_bwd_row(const bf16 *restrict gr, const bf16 *restrict xr, const bf16 *restrict w,
                                    float r, const bf16 *restrict rr, bf16 *restrict o, int64_t D) {
    __m512 vd = _mm512_setzero_ps();
    for (int64_t j = 0; j < D; j += 16) {
        __mmask16 m = v_mask(D - j);
        if ((j & 31) == 0) {
            v_prefetch(gr + j + PF_AHEAD);
            v_prefetch(xr + j + PF_AHEAD);
            if (rr)
                v_prefetch(rr + j + PF_AHEAD);
        }
        vd = _mm512_fmadd_ps(_mm512_mul_ps(v_load(gr + j, m), v_load(w + j, m)), v_load(xr + j, m), vd);
    }
    const __m512 vr = _mm512_set1_ps(r), beta = _mm512_set1_ps(-r * r * r * _mm512_reduce_add_ps(vd) / (float)D);
    for (int64_t j = 0; j < D; j += 16) {
        __mmask16 m = v_mask(D - j);
        __m512 v = _mm512_fmadd_ps(beta, v_load(xr + j, m),
                                   _mm512_mul_ps(_mm512_mul_ps(vr, v_load(gr + j, m)), v_load(w + j, m)));
        if (rr) v = _mm512_add_ps(v, v_load(rr + j, m));
        v_store(o + j, v, m);
    }
}
#else
static inline float rms_norm_row(const bf16 *restrict xr, const bf16 *restrict ar, const bf16 *restrict w,
                                 bf16 *restrict hr, bf16 *restrict o, int64_t D, float eps) {
    float ss = 0.0f;
    if (ar) {
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < D; j++) {
            bf16 v = f2b(b2f(xr[j]) + b2f(ar[j]));
            hr[j] = v;
            ss += b2f(v) * b2f(v);
        }
    } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < D; j++) ss += b2f(xr[j]) * b2f(xr[j]);
    }
    const float r = 1.0f / sqrtf(ss / (float)D + eps);
    const bf16 *restrict src = ar ? hr : xr;
#pragma omp simd
    for (int64_t j = 0; j < D; j++) o[j] = f2b(b2f(f2b(b2f(src[j]) * r)) * b2f(w[j]));
    return r;
}

static inline void rms_norm_bwd_row(const bf16 *restrict gr, const bf16 *restrict xr, const bf16 *restrict w,
                                    float r, const bf16 *restrict rr, bf16 *restrict o, int64_t D) {
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < D; j++) dot += b2f(gr[j]) * b2f(w[j]) * b2f(xr[j]);
    const float beta = -r * r * r * dot / (float)D;
    if (rr) {
#pragma omp simd
        for (int64_t j = 0; j < D; j++) o[j] = f2b(r * b2f(gr[j]) * b2f(w[j]) + beta * b2f(xr[j]) + b2f(rr[j]));
    } else {
#pragma omp simd
        for (int64_t j = 0; j < D; j++) o[j] = f2b(r * b2f(gr[j]) * b2f(w[j]) + beta * b2f(xr[j]));
    }
}
#endif

/* a, h: the residual add's other input and its output, or both NULL (plain RMSNorm of x). */
void rms_norm_fwd(const bf16 *restrict x, const bf16 *restrict a, const bf16 *restrict w, bf16 *restrict h,
                  bf16 *restrict out, float *restrict rstd, int64_t n, int64_t D, float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++)
        rstd[i] = rms_norm_row(x + i * D, a ? a + i * D : NULL, w, h ? h + i * D : NULL, out + i * D, D, eps);
}

/* gres: the gradient that reaches x along the residual stream, added in the same pass (one rounding), or NULL. */
void rms_norm_bwd(const bf16 *restrict g, const bf16 *restrict x, const bf16 *restrict w,
                  const float *restrict rstd, const bf16 *restrict gres, bf16 *restrict dx, int64_t n, int64_t D,
                  int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++)
        rms_norm_bwd_row(g + i * D, x + i * D, w, rstd[i], gres ? gres + i * D : NULL, dx + i * D, D);
}

/* ------------------------------------------------------------------ SwiGLU: out = silu(gate) * up
 * Over rows of F values; gate and up rows start ld elements apart (ld = F for separate tensors, 2F when gate and
 * up are the two halves of one packed [rows, 2F] projection output). out and g are contiguous [rows, F]; dgate and
 * dup rows are ld_out apart (2F: the halves of one packed gradient).
 * Backward: dup = g * silu(gate); dgate = g * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate). */
#if HAVE_AVX512BF16
static inline void swiglu_row(const bf16 *restrict gr, const bf16 *restrict ur, bf16 *restrict o, int64_t F) {
    for (int64_t j = 0; j < F; j += 16) {
        __mmask16 m = v_mask(F - j);
        if ((j & 31) == 0) {
            v_prefetch(gr + j + PF_AHEAD);
            v_prefetch(ur + j + PF_AHEAD);
        }
        __m512 a = v_load(gr + j, m);
        v_store(o + j, _mm512_mul_ps(_mm512_mul_ps(a, v_sigmoid(a)), v_load(ur + j, m)), m);
    }
}

static inline void swiglu_bwd_row(const bf16 *restrict gr, const bf16 *restrict ar, const bf16 *restrict ur,
                                  bf16 *restrict dg, bf16 *restrict du, int64_t F) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t j = 0; j < F; j += 16) {
        __mmask16 m = v_mask(F - j);
        if ((j & 31) == 0) {
            v_prefetch(ar + j + PF_AHEAD);
            v_prefetch(ur + j + PF_AHEAD);
            v_prefetch(gr + j + PF_AHEAD);
        }
        __m512 a = v_load(ar + j, m), s = v_sigmoid(a), ys = _mm512_mul_ps(v_load(gr + j, m), s);
        v_store(du + j, _mm512_mul_ps(ys, a), m);
        __m512 t = _mm512_fmadd_ps(a, _mm512_sub_ps(one, s), one);
        v_store(dg + j, _mm512_mul_ps(_mm512_mul_ps(ys, v_load(ur + j, m)), t), m);
    }
}
#else
static inline void swiglu_row(const bf16 *restrict gr, const bf16 *restrict ur, bf16 *restrict o, int64_t F) {
#pragma omp simd
    for (int64_t j = 0; j < F; j++) {
        float a = b2f(gr[j]);
        o[j] = f2b(a * sigmoid(a) * b2f(ur[j]));
    }
}

static inline void swiglu_bwd_row(const bf16 *restrict gr, const bf16 *restrict ar, const bf16 *restrict ur,
                                  bf16 *restrict dg, bf16 *restrict du, int64_t F) {
#pragma omp simd
    for (int64_t j = 0; j < F; j++) {
        float a = b2f(ar[j]), y = b2f(gr[j]);
        float s = sigmoid(a);
        du[j] = f2b(y * a * s);
        dg[j] = f2b(y * b2f(ur[j]) * s * (1.0f + a * (1.0f - s)));
    }
}
#endif

void swiglu_fwd(const bf16 *restrict gate, const bf16 *restrict up, bf16 *restrict out, int64_t rows, int64_t F,
                int64_t ld, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < rows; i++) swiglu_row(gate + i * ld, up + i * ld, out + i * F, F);
}

void swiglu_bwd(const bf16 *restrict g, const bf16 *restrict gate, const bf16 *restrict up, bf16 *restrict dgate,
                bf16 *restrict dup, int64_t rows, int64_t F, int64_t ld_in, int64_t ld_out, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < rows; i++)
        swiglu_bwd_row(g + i * F, gate + i * ld_in, up + i * ld_in, dgate + i * ld_out, dup + i * ld_out, F);
}

/* ------------------------------------------------------------------ RoPE (rotate-half)
 * For each (b, t, h) row of D values: out = x * c + sign * rotate_half(x) * s, with c, s the bf16-rounded first
 * halves of the cos / sin tables [T, D] (fp32). sign = +1 forward, -1 backward (the inverse rotation). Input and
 * output rows are addressed by element strides, so forward reads [B, T, H, D] and writes [B, H, T, D] directly. */
#if HAVE_AVX512BF16
static inline void rope_position(const bf16 *restrict x, bf16 *restrict out, const float *restrict ct,
                                 const float *restrict st, int64_t H, int64_t half, int64_t xh, int64_t oh,
                                 float sign) {
    const __m512 sg = _mm512_set1_ps(sign);
    for (int64_t j = 0; j < half; j += 16) {
        __mmask16 m = v_mask(half - j);
        const __m512 c = v_round(_mm512_maskz_loadu_ps(m, ct + j));
        const __m512 s = _mm512_mul_ps(sg, v_round(_mm512_maskz_loadu_ps(m, st + j)));
        for (int64_t h = 0; h < H; h++) {
            const bf16 *restrict xr = x + h * xh;
            bf16 *restrict o = out + h * oh;
            __m512 x1 = v_load(xr + j, m), x2 = v_load(xr + j + half, m);
            v_store(o + j, _mm512_fnmadd_ps(x2, s, _mm512_mul_ps(x1, c)), m);
            v_store(o + j + half, _mm512_fmadd_ps(x1, s, _mm512_mul_ps(x2, c)), m);
        }
    }
}
#else
static inline void rope_position(const bf16 *restrict x, bf16 *restrict out, const float *restrict ct,
                                 const float *restrict st, int64_t H, int64_t half, int64_t xh, int64_t oh,
                                 float sign) {
    for (int64_t h = 0; h < H; h++) {
        const bf16 *restrict xr = x + h * xh;
        bf16 *restrict o = out + h * oh;
#pragma omp simd
        for (int64_t j = 0; j < half; j++) {
            float c = b2f(f2b(ct[j])), s = b2f(f2b(st[j]));
            float x1 = b2f(xr[j]), x2 = b2f(xr[j + half]);
            o[j] = f2b(x1 * c - sign * x2 * s);
            o[j + half] = f2b(x2 * c + sign * x1 * s);
        }
    }
}
#endif

void rope(const bf16 *restrict x, bf16 *restrict out, const float *restrict cos_t, const float *restrict sin_t,
          int64_t B, int64_t T, int64_t H, int64_t D, int64_t xb, int64_t xt, int64_t xh, int64_t ob, int64_t ot,
          int64_t oh, float sign, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) collapse(2)
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++)
            rope_position(x + b * xb + t * xt, out + b * ob + t * ot, cos_t + t * D, sin_t + t * D, H, D / 2, xh,
                          oh, sign);
}

/* ------------------------------------------------------------------ fp32 RMSNorm, SwiGLU and RoPE
 * The three kernels above for fp32 tensors, for CPUs without native bf16, where training runs in fp32: the same
 * formulas, arguments and layouts, in plain C for the auto-vectoriser (no roundings to make), one pass over memory
 * each way where PyTorch's fp32 path makes three to five. */
static inline float rms_norm_row_f32(const float *restrict xr, const float *restrict ar, const float *restrict w,
                                     float *restrict hr, float *restrict o, int64_t D, float eps) {
    float ss = 0.0f;
    if (ar) {
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < D; j++) {
            float v = xr[j] + ar[j];
            hr[j] = v;
            ss += v * v;
        }
    } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < D; j++) ss += xr[j] * xr[j];
    }
    const float r = 1.0f / sqrtf(ss / (float)D + eps);
    const float *restrict src = ar ? hr : xr;
#pragma omp simd
    for (int64_t j = 0; j < D; j++) o[j] = src[j] * r * w[j];
    return r;
}

void rms_norm_fwd_f32(const float *restrict x, const float *restrict a, const float *restrict w, float *restrict h,
                      float *restrict out, float *restrict rstd, int64_t n, int64_t D, float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++)
        rstd[i] = rms_norm_row_f32(x + i * D, a ? a + i * D : NULL, w, h ? h + i * D : NULL, out + i * D, D, eps);
}

void rms_norm_bwd_f32(const float *restrict g, const float *restrict x, const float *restrict w,
                      const float *restrict rstd, const float *restrict gres, float *restrict dx, int64_t n,
                      int64_t D, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *restrict gr = g + i * D, *restrict xr = x + i * D;
        const float *restrict rr = gres ? gres + i * D : NULL;
        float *restrict o = dx + i * D;
        const float r = rstd[i];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < D; j++) dot += gr[j] * w[j] * xr[j];
        const float beta = -r * r * r * dot / (float)D;
        if (rr) {
#pragma omp simd
            for (int64_t j = 0; j < D; j++) o[j] = r * gr[j] * w[j] + beta * xr[j] + rr[j];
        } else {
#pragma omp simd
            for (int64_t j = 0; j < D; j++) o[j] = r * gr[j] * w[j] + beta * xr[j];
        }
    }
}

void swiglu_fwd_f32(const float *restrict gate, const float *restrict up, float *restrict out, int64_t rows,
                    int64_t F, int64_t ld, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float *restrict gr = gate + i * ld, *restrict ur = up + i * ld;
        float *restrict o = out + i * F;
#pragma omp simd
        for (int64_t j = 0; j < F; j++) o[j] = gr[j] * sigmoid(gr[j]) * ur[j];
    }
}

void swiglu_bwd_f32(const float *restrict g, const float *restrict gate, const float *restrict up,
                    float *restrict dgate, float *restrict dup, int64_t rows, int64_t F, int64_t ld_in,
                    int64_t ld_out, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float *restrict gr = g + i * F, *restrict ar = gate + i * ld_in, *restrict ur = up + i * ld_in;
        float *restrict dg = dgate + i * ld_out, *restrict du = dup + i * ld_out;
#pragma omp simd
        for (int64_t j = 0; j < F; j++) {
            const float a = ar[j], s = sigmoid(a), ys = gr[j] * s;
            du[j] = ys * a;
            dg[j] = ys * ur[j] * (1.0f + a * (1.0f - s));
        }
    }
}

/* cos / sin [T, D] used as they are (HF rounds the tables to the data's dtype: fp32 keeps them). */
void rope_f32(const float *restrict x, float *restrict out, const float *restrict cos_t, const float *restrict sin_t,
              int64_t B, int64_t T, int64_t H, int64_t D, int64_t xb, int64_t xt, int64_t xh, int64_t ob, int64_t ot,
              int64_t oh, float sign, int nt) {
    const int64_t half = D / 2;
#pragma omp parallel for num_threads(nt) schedule(static) collapse(2)
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            const float *restrict ct = cos_t + t * D, *restrict st = sin_t + t * D;
            for (int64_t h = 0; h < H; h++) {
                const float *restrict xr = x + b * xb + t * xt + h * xh;
                float *restrict o = out + b * ob + t * ot + h * oh;
#pragma omp simd
                for (int64_t j = 0; j < half; j++) {
                    const float x1 = xr[j], x2 = xr[j + half];
                    o[j] = x1 * ct[j] - sign * x2 * st[j];
                    o[j + half] = x2 * ct[j] + sign * x1 * st[j];
                }
            }
        }
}

/* ------------------------------------------------------------------ causal softmax
 * s: R rows of L scores, blocks of the queries first..L-1 against keys 0..L-1 (first = 0: all T = L queries);
 * row i is query position t = first + i % (L - first) and sees keys 0..t. In place:
 * p = softmax(scale * s) over the visible keys, 0 elsewhere. Each thread keeps the row's exponentials in an fp32
 * buffer (T + 16 floats), so every score costs one exp. Returns nonzero if the buffer could not be allocated.
 * Backward, in place on dp: ds = scale * p * (dp - sum_k p_k dp_k), the gradient of the scores before scaling. */
#if HAVE_AVX512BF16
static inline void softmax_row(bf16 *restrict row, int64_t len, int64_t T, float scale, float *restrict buf) {
    __m512 vm = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < len; j += 16) {
        __mmask16 m = v_mask(len - j);
        vm = _mm512_mask_max_ps(vm, m, vm, v_load(row + j, m));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vm)), sc = _mm512_set1_ps(scale);
    __m512 vs = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 16) {
        __mmask16 m = v_mask(len - j);
        __m512 e = _mm512_maskz_mov_ps(m, v_exp(_mm512_mul_ps(sc, _mm512_sub_ps(v_load(row + j, m), mx))));
        _mm512_storeu_ps(buf + j, e);
        vs = _mm512_add_ps(vs, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vs));
    for (int64_t j = 0; j < T; j += 16)  /* lanes past len: 0 (the buffer's tail block holds zeros) */
        v_store(row + j, j < len ? _mm512_mul_ps(_mm512_loadu_ps(buf + j), inv) : _mm512_setzero_ps(), v_mask(T - j));
}

static inline void softmax_bwd_row(const bf16 *restrict pr, bf16 *restrict d, int64_t len, int64_t T, float scale) {
    __m512 vd = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 16) {
        __mmask16 m = v_mask(len - j);
        vd = _mm512_fmadd_ps(v_load(pr + j, m), v_load(d + j, m), vd);
    }
    const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(vd)), sc = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < T; j += 16) {
        __mmask16 in = j < len ? v_mask(len - j) : 0;
        __m512 x = _mm512_maskz_mul_ps(in, _mm512_mul_ps(sc, v_load(pr + j, in)), _mm512_sub_ps(v_load(d + j, in), dot));
        v_store(d + j, x, v_mask(T - j));
    }
}
#else
static inline void softmax_row(bf16 *restrict row, int64_t len, int64_t T, float scale, float *restrict buf) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; j++) {
        float v = b2f(row[j]);
        buf[j] = v;
        m = v > m ? v : m;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; j++) {
        float e = fexp(scale * (buf[j] - m));
        buf[j] = e;
        sum += e;
    }
    float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < len; j++) row[j] = f2b(buf[j] * inv);
    for (int64_t j = len; j < T; j++) row[j] = 0;
}

static inline void softmax_bwd_row(const bf16 *restrict pr, bf16 *restrict d, int64_t len, int64_t T, float scale) {
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < len; j++) dot += b2f(pr[j]) * b2f(d[j]);
#pragma omp simd
    for (int64_t j = 0; j < len; j++) d[j] = f2b(scale * b2f(pr[j]) * (b2f(d[j]) - dot));
    for (int64_t j = len; j < T; j++) d[j] = 0;
}
#endif

int causal_softmax_fwd(bf16 *restrict s, int64_t R, int64_t L, int64_t first, float scale, int nt) {
    const int64_t h = L - first;
    int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        float *restrict buf = (float *)malloc((size_t)(L + 16) * sizeof(float));
        failed = buf == NULL;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < R; i++)
            if (buf != NULL) softmax_row(s + i * L, first + i % h + 1, L, scale, buf);
        free(buf);
    }
    return failed;
}

void causal_softmax_bwd(const bf16 *restrict p, bf16 *restrict dp, int64_t R, int64_t L, int64_t first, float scale,
                        int nt) {
    const int64_t h = L - first;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < R; i++) softmax_bwd_row(p + i * L, dp + i * L, first + i % h + 1, L, scale);
}

/* The fp32 twins (fp32 training on CPUs without native bf16): the same rows, arguments and in-place layouts. */
static inline void softmax_row_f32(float *restrict row, int64_t len, int64_t T, float scale) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; j++) m = row[j] > m ? row[j] : m;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; j++) {
        const float e = fexp(scale * (row[j] - m));
        row[j] = e;
        sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < len; j++) row[j] *= inv;
    for (int64_t j = len; j < T; j++) row[j] = 0.0f;
}

int causal_softmax_fwd_f32(float *restrict s, int64_t R, int64_t L, int64_t first, float scale, int nt) {
    const int64_t h = L - first;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < R; i++) softmax_row_f32(s + i * L, first + i % h + 1, L, scale);
    return 0;
}

void causal_softmax_bwd_f32(const float *restrict p, float *restrict dp, int64_t R, int64_t L, int64_t first,
                            float scale, int nt) {
    const int64_t h = L - first;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < R; i++) {
        const float *restrict pr = p + i * L;
        float *restrict d = dp + i * L;
        const int64_t len = first + i % h + 1;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < len; j++) dot += pr[j] * d[j];
#pragma omp simd
        for (int64_t j = 0; j < len; j++) d[j] = scale * pr[j] * (d[j] - dot);
        for (int64_t j = len; j < L; j++) d[j] = 0.0f;
    }
}

/* ------------------------------------------------------------------ cross-entropy over logits rows
 * logits [R, V] bf16, targets y [R]. loss[i] = logsumexp(row) - row[y] in fp32. With grad != 0 the row is
 * overwritten in place by softmax(row) - onehot(y), the gradient of loss[i] with respect to the row.
 * Confident rows (p[y] near 1) would cancel in both 1 - p[y] and log(sum): the sum over the other classes is
 * kept apart, so that p[y] - 1 = -others / sum and loss = log1p(others / e[y]) keep their relative precision.
 * The row functions leave the exponentials in buf and return the maximum m and the sum over the others. */
#if HAVE_AVX512BF16
static inline float ce_exp_row(const bf16 *restrict row, int64_t t, int64_t V, float *restrict buf, float *m_out) {
    __m512 vm = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < V; j += 16) {
        __mmask16 m = v_mask(V - j);
        vm = _mm512_mask_max_ps(vm, m, vm, v_load(row + j, m));
    }
    *m_out = _mm512_reduce_max_ps(vm);
    const __m512 mx = _mm512_set1_ps(*m_out);
    __m512 vo = _mm512_setzero_ps();
    for (int64_t j = 0; j < V; j += 16) {
        __mmask16 k = v_mask(V - j);
        __m512 e = _mm512_maskz_mov_ps(k, v_exp(_mm512_sub_ps(v_load(row + j, k), mx)));
        _mm512_storeu_ps(buf + j, e);
        if (t >= j && t < j + 16) k &= (__mmask16)~(1u << (t - j));
        vo = _mm512_mask_add_ps(vo, k, vo, e);
    }
    return _mm512_reduce_add_ps(vo);
}

static inline void ce_grad_row(bf16 *restrict row, const float *restrict buf, int64_t V, float inv) {
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t j = 0; j < V; j += 16) v_store(row + j, _mm512_mul_ps(_mm512_loadu_ps(buf + j), vinv), v_mask(V - j));
}
#else
static inline float ce_exp_row(const bf16 *restrict row, int64_t t, int64_t V, float *restrict buf, float *m_out) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; j++) {
        float v = b2f(row[j]);
        m = v > m ? v : m;
    }
    float others = 0.0f;
#pragma omp simd reduction(+ : others)
    for (int64_t j = 0; j < V; j++) {
        float e = fexp(b2f(row[j]) - m);
        buf[j] = e;
        others += j == t ? 0.0f : e;
    }
    *m_out = m;
    return others;
}

static inline void ce_grad_row(bf16 *restrict row, const float *restrict buf, int64_t V, float inv) {
#pragma omp simd
    for (int64_t j = 0; j < V; j++) row[j] = f2b(buf[j] * inv);
}
#endif

int cross_entropy_rows(bf16 *restrict logits, const int64_t *restrict y, float *restrict loss, int64_t R,
                       int64_t V, int grad, int nt) {
    int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        float *restrict buf = (float *)malloc((size_t)(V + 16) * sizeof(float));  /* the row's exponentials */
        failed = buf == NULL;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < R; i++) {
            if (buf == NULL) continue;
            bf16 *restrict row = logits + i * V;
            const int64_t t = y[i];
            float m;
            const float others = ce_exp_row(row, t, V, buf, &m);
            const float xt = b2f(row[t]);
            const float et = expf(xt - m);
            const float sum = et + others;
            loss[i] = xt - m > -60.0f ? log1pf(others / et) : (m - xt) + logf(sum);
            if (grad) {
                const float inv = 1.0f / sum;
                ce_grad_row(row, buf, V, inv);
                row[t] = f2b(-others * inv);
            }
        }
        free(buf);
    }
    return failed;
}

/* ------------------------------------------------------------------ causal attention on AMX tiles
 * Forward and backward of causal grouped-query attention, one (sequence, K/V head) at a time per thread, with
 * every product on the AMX bf16 tile unit (16x16 fp32 accumulators, 16x32 bf16 operands) and the softmax in
 * AVX-512. Nothing of size [T, T] leaves the thread's cache: the forward returns the output and keeps each row's
 * log-sum-exp, from which the backward recomputes the probabilities (as FlashAttention does); products over key
 * blocks above the diagonal are skipped.
 *
 * Layouts: q, k, v, o, dout, dq, dk, dv are [B, heads, T, D] with any (batch, head, position) strides and unit
 * stride over D (q and k come straight from the packed q|k|v projection when RoPE is applied here); lse [B, H, T]. Needs T % 32 == 0 and D % 64 == 0 (else callers use the
 * GEMM attention). AMX wants operands in two shapes: "A" tiles are 16 rows x 32 bf16 of a row-major matrix, "B"
 * tiles 16 rows of 16 bf16 pairs, the pair being two consecutive entries of the reduced dimension. So K^T and V^T
 * are stored as [D/2][T] pairs ("transposed pairs", one 32-bit transpose), V and K for the products over keys as
 * [T/2][D] pairs ("row pairs", two rows interleaved), and the probabilities and score gradients as row pairs over
 * the queries, written straight from the softmax registers. The products over queries (dK, dV) take Q^T and
 * dO^T as A tiles and produce dK^T, dV^T, transposed once at the end. */
#if HAVE_AVX512BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define HAVE_AMX 0
#endif

#if HAVE_AMX
/* Linux gives a process the AMX register state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XFEATURE_XTILEDATA); oneDNN asks too, and asking twice is harmless. */
static int amx_permitted(void) {
    static int state = -1;
    if (state < 0)
        state = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return state;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_cfg;

static void amx_config(void) { /* all 8 tiles 16 rows x 64 bytes */
    amx_cfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.rows[i] = 16;
        c.colsb[i] = 64;
    }
    _tile_loadconfig(&c);
}

/* Software prefetch of rows [0, rows) of x (stride ld elements), D bf16 each. The attention reads its operands
 * as short rows (one head, 128 bytes) far apart in the [B, T, heads, D] layouts, a pattern the hardware prefetchers
 * do not follow across pages: without this, inputs that come from memory (as in a training step) cost more than
 * the arithmetic. */
static inline void prefetch_rows(const bf16 *x, int64_t ld, int64_t rows, int64_t D) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t d = 0; d < D; d += 32)
            v_prefetch(x + r * ld + d);
}

/* d[c][r] = s[r][c] for a 16 x 16 block of 32-bit values (row strides in elements) */
static inline void tr16(const uint32_t *s, int64_t ss, __m512i out[16]) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++)
        r[i] = _mm512_loadu_si512(s + i * ss);
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i + c], lane L: column 4L + c of rows 4i..4i+3 */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
        __m512i w0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
        __m512i w1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
        out[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
        out[4 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
        out[8 + c] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
        out[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
    }
}

/* transposed pairs: out[dd][n] = (x[n][2dd], x[n][2dd+1]) for x [T][D] bf16 rows (stride ld), out [D/2][T] */
static void pack_tpairs(const bf16 *x, int64_t ld, uint32_t *out, int64_t T, int64_t D) {
    __m512i o[16];
    for (int64_t n = 0; n < T; n += 16) {
        if (n + 16 < T)
            prefetch_rows(x + (n + 16) * ld, ld, 16, D);
        for (int64_t dd = 0; dd < D / 2; dd += 16) {
            tr16((const uint32_t *)(x + n * ld) + dd, ld / 2, o);
            for (int j = 0; j < 16; j++)
                _mm512_storeu_si512(out + (dd + j) * T + n, o[j]);
        }
    }
}

/* the transpose of x [R][D] bf16 rows (stride ld) into out [D][ldo] bf16 (columns from 0) */
static void transpose_bf16(const bf16 *x, int64_t ld, bf16 *out, int64_t ldo, int64_t R, int64_t D) {
    __m512i o[16];
    for (int64_t r = 0; r < R; r += 16) {
        if (r + 16 < R)
            prefetch_rows(x + (r + 16) * ld, ld, 16, D);
        for (int64_t dd = 0; dd < D / 2; dd += 16) {
            tr16((const uint32_t *)(x + r * ld) + dd, ld / 2, o);
            for (int j = 0; j < 16; j++) {
                _mm256_storeu_si256((__m256i *)(out + (2 * (dd + j)) * ldo + r), _mm512_cvtepi32_epi16(o[j]));
                _mm256_storeu_si256((__m256i *)(out + (2 * (dd + j) + 1) * ldo + r),
                                    _mm512_cvtepi32_epi16(_mm512_srli_epi32(o[j], 16)));
            }
        }
    }
}

/* row pairs: out[nn][d] = (x[2nn][d], x[2nn+1][d]) for x [T][D] bf16 rows (stride ld), out [T/2][D] */
static void pack_rpairs(const bf16 *x, int64_t ld, uint32_t *out, int64_t T, int64_t D) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t n = 0; n < T; n += 2) {
        if (n + 8 < T)
            prefetch_rows(x + (n + 8) * ld, ld, 2, D);
        for (int64_t d = 0; d < D; d += 32) {
            __m512i a = _mm512_loadu_si512(x + n * ld + d), b = _mm512_loadu_si512(x + (n + 1) * ld + d);
            _mm512_storeu_si512(out + (n / 2) * D + d, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(out + (n / 2) * D + d + 16, _mm512_permutex2var_epi16(a, hi, b));
        }
    }
}

/* two fp32 rows of 16 -> 16 bf16 pairs (a[i], b[i]) */
static inline __m512i pair_rows(__m512 a, __m512 b) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

/* the accumulator tiles 0-3 to zero */
static inline void zero_tiles4(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

/* S[16][ldS] fp32 = rows x (A tiles from bf16 rows, stride ld) times keys [0, nk) given as transposed pairs kp
 * [D/2][T]; nk a multiple of 32 */
static inline void tile_scores(const bf16 *x, int64_t ld, const uint32_t *kp, int64_t T, int64_t D, int64_t nk,
                               float *S) {
    for (int64_t n = 0; n < nk; n += 32) {
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t c = 0; c < D / 32; c++) {
            _tile_loadd(4, x + 32 * c, ld * 2);
            _tile_loadd(6, kp + 16 * c * T + n, T * 4);
            _tile_loadd(7, kp + 16 * c * T + n + 16, T * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
        }
        _tile_stored(0, S + n, T * 4);
        _tile_stored(1, S + n + 16, T * 4);
    }
}

/* out[16][D] fp32 (stride D) = a [16][nk] bf16 (stride T) times row pairs rp [T/2][D]; D % 64 == 0 */
static inline void tile_times_rpairs(const bf16 *a, const uint32_t *rp, int64_t T, int64_t D, int64_t nk,
                                     float *out) {
    for (int64_t d = 0; d < D; d += 64) {
        zero_tiles4();
        for (int64_t n = 0; n < nk; n += 32) {
            const uint32_t *b = rp + (n / 2) * D + d;
            _tile_loadd(4, a + n, T * 2);
            _tile_loadd(6, b, D * 4);
            _tile_loadd(7, b + 16, D * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(6, b + 32, D * 4);
            _tile_loadd(7, b + 48, D * 4);
            _tile_dpbf16ps(2, 4, 6);
            _tile_dpbf16ps(3, 4, 7);
        }
        _tile_stored(0, out + d, D * 4);
        _tile_stored(1, out + d + 16, D * 4);
        _tile_stored(2, out + d + 32, D * 4);
        _tile_stored(3, out + d + 48, D * 4);
    }
}

static inline void store_rows(const float *acc, int64_t D, float scale, bf16 *dst, int64_t ld) {
    const __m512 vs = _mm512_set1_ps(scale);
    for (int r = 0; r < 16; r++)
        for (int64_t d = 0; d < D; d += 16)
            v_store(dst + r * ld + d, _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + d), vs), 0xFFFF);
}

/* Per-thread scratch that outlives the call (OpenMP's pool threads persist): grown when too small, so calls in a
 * training loop neither allocate nor touch fresh pages. carve() hands out 64-byte aligned pieces of it. */
static __thread char *arena_buf;
static __thread size_t arena_cap;

static size_t round64(size_t bytes) { return (bytes + 63) / 64 * 64; }

static char *arena(size_t bytes) {
    if (bytes > arena_cap) {
        free(arena_buf);
        arena_buf = aligned_alloc(64, round64(bytes));
        arena_cap = arena_buf ? bytes : 0;
    }
    return arena_buf;
}

static void *carve(char **p, size_t bytes) {
    void *r = *p;
    *p += round64(bytes);
    return r;
}

/* The item's G query heads as rows qr [G][T][D] and its keys kr [T][D] (RoPE applied, rounded as the rope kernel
 * does, when cs != NULL: the callers then pass q and k straight from the packed q|k|v projection). */
static void item_rows(const bf16 *q, int64_t qh, int64_t qt, const bf16 *k, int64_t kt, int64_t G, int64_t T,
                      int64_t D, const float *cs, const float *sn, bf16 *qr, bf16 *kr) {
    const int64_t ahead = 8; /* positions */
    for (int64_t t = 0; t < T; t++) {
        if (t + ahead < T) {
            for (int64_t g = 0; g < G; g++)
                prefetch_rows(q + g * qh + (t + ahead) * qt, 0, 1, D);
            prefetch_rows(k + (t + ahead) * kt, 0, 1, D);
        }
        if (cs) {
            rope_position(q + t * qt, qr + t * D, cs + t * D, sn + t * D, G, D / 2, qh, T * D, 1.0f);
            rope_position(k + t * kt, kr + t * D, cs + t * D, sn + t * D, 1, D / 2, 0, 0, 1.0f);
        } else {
            for (int64_t g = 0; g < G; g++)
                memcpy(qr + (g * T + t) * D, q + g * qh + t * qt, D * 2);
            memcpy(kr + t * D, k + t * kt, D * 2);
        }
    }
}

/* rows [n][D] bf16 (stride D) to dst rows (stride ld), through the inverse rotation when cs != NULL */
static void store_unrotated(const bf16 *rows, int64_t n, int64_t D, bf16 *dst, int64_t ld, const float *cs,
                            const float *sn) {
    for (int64_t r = 0; r < n; r++) {
        if (cs)
            rope_position(rows + r * D, dst + r * ld, cs + r * D, sn + r * D, 1, D / 2, 0, 0, -1.0f);
        else
            memcpy(dst + r * ld, rows + r * D, D * 2);
    }
}

typedef struct {
    int64_t b, h, t; /* element strides of a [B, heads, T, D] operand (unit stride over D) */
} strides3;

/* One (sequence, K/V head): its G query heads at q, the outputs o likewise, k and v its key / value rows. */
static void attn_fwd_item(const bf16 *q, strides3 qs, const bf16 *k, int64_t kt, const bf16 *v, int64_t vt, bf16 *o,
                          strides3 os, float *lse, int64_t G, int64_t T, int64_t D, float scale, const float *cs,
                          const float *sn, bf16 *qr, bf16 *kr, uint32_t *kp, uint32_t *vp, float *S, bf16 *P,
                          float *acc) {
    item_rows(q, qs.h, qs.t, k, kt, G, T, D, cs, sn, qr, kr);
    pack_tpairs(kr, D, kp, T, D);
    pack_rpairs(v, vt, vp, T, D);
    const float sl = scale * (float)M_LOG2E; /* exponentials as 2^(scores sl - max sl) */
    const __m512 vsl = _mm512_set1_ps(sl);
    float inv[16];
    for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < T; i += 16) {
            const int64_t nk = (i + 16 + 31) / 32 * 32; /* keys 0..i+15, in whole 32-key steps */
            tile_scores(qr + (g * T + i) * D, D, kp, T, D, nk, S);
            for (int r = 0; r < 16; r++) { /* P unnormalised (the exponentials, in bf16); O scaled by 1 / sum */
                const int64_t t = i + r, full = (t + 1) / 16 * 16;
                const float *s = S + r * T;
                bf16 *pr = P + r * T;
                __m512 vm = _mm512_set1_ps(-INFINITY);
                for (int64_t n = 0; n <= t; n += 16)
                    vm = _mm512_mask_max_ps(vm, v_mask(t + 1 - n), vm, _mm512_loadu_ps(s + n));
                const float mx = _mm512_reduce_max_ps(vm);
                const __m512 vmx = _mm512_set1_ps(mx * sl);
                __m512 vsum = _mm512_setzero_ps();
                int64_t n = 0;
                for (; n < full; n += 16) {
                    const __m512 e = v_exp2(_mm512_fmsub_ps(_mm512_loadu_ps(s + n), vsl, vmx));
                    vsum = _mm512_add_ps(vsum, e);
                    v_store(pr + n, e, 0xFFFF);
                }
                if (n <= t) { /* the keys up to t in a last partial vector */
                    const __m512 e = _mm512_maskz_mov_ps(v_mask(t + 1 - n),
                                                         v_exp2(_mm512_fmsub_ps(_mm512_loadu_ps(s + n), vsl, vmx)));
                    vsum = _mm512_add_ps(vsum, e);
                    v_store(pr + n, e, 0xFFFF);
                    n += 16;
                }
                for (; n < nk; n += 16)
                    _mm256_storeu_si256((__m256i *)(pr + n), _mm256_setzero_si256());
                const float sum = _mm512_reduce_add_ps(vsum);
                inv[r] = 1.0f / sum;
                lse[g * T + t] = mx * scale + logf(sum);
            }
            tile_times_rpairs(P, vp, T, D, nk, acc);
            bf16 *dst = o + g * os.h + i * os.t;
            for (int r = 0; r < 16; r++) {
                const __m512 vi = _mm512_set1_ps(inv[r]);
                for (int64_t d = 0; d < D; d += 16)
                    v_store(dst + r * os.t + d, _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + d), vi), 0xFFFF);
            }
        }
}

/* The backward of one (sequence, K/V head). Per 16-query block: the scores and dP = dO V^T again, then
 * P = exp(scale S - lse), dS = P (dP - rowsum(P dP)) (the gradient of the scaled scores; rowsum(P dP) equals
 * FlashAttention's rowsum(dO o) and spares reading o, a strided pass over memory), dQ = scale dS K; P and dS
 * also go, as row pairs over queries, to buffers from which dK^T = scale Q^T dS and dV^T = dO^T P are taken once
 * all query blocks are done. */
typedef struct {
    uint32_t *kp, *vt, *kv, *pv, *dsv;
    bf16 *qr, *kr, *qT, *doT, *dsr, *dqr;
    float *S, *dP, *acc, *dkT, *dvT;
} attn_bwd_buf;

static void attn_bwd_item(const bf16 *q, strides3 qs, const bf16 *k, int64_t kt, const bf16 *v, int64_t vt,
                          const bf16 *go, strides3 gs, const float *lse, bf16 *dq,
                          strides3 dqs, bf16 *dk, int64_t dkt, bf16 *dv, int64_t dvt, int64_t G, int64_t T, int64_t D,
                          float scale, const float *cs, const float *sn, const attn_bwd_buf *w) {
    const int64_t R = G * T;
    item_rows(q, qs.h, qs.t, k, kt, G, T, D, cs, sn, w->qr, w->kr);
    pack_tpairs(w->kr, D, w->kp, T, D);
    pack_tpairs(v, vt, w->vt, T, D);
    pack_rpairs(w->kr, D, w->kv, T, D);
    transpose_bf16(w->qr, D, w->qT, R, R, D);
    for (int64_t g = 0; g < G; g++)
        transpose_bf16(go + g * gs.h, gs.t, w->doT + g * T, R, T, D);
    const __m512 vscale = _mm512_set1_ps(scale), vsl = _mm512_set1_ps(scale * (float)M_LOG2E);
    for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < T; i += 16) {
            const int64_t nk = (i + 16 + 31) / 32 * 32;
            tile_scores(w->qr + (g * T + i) * D, D, w->kp, T, D, nk, w->S);
            tile_scores(go + g * gs.h + i * gs.t, gs.t, w->vt, T, D, nk, w->dP);
            for (int r = 0; r < 16; r += 2) {
                const int64_t t = i + r;
                const __m512 l0 = _mm512_set1_ps(lse[g * T + t] * (float)M_LOG2E);
                const __m512 l1 = _mm512_set1_ps(lse[g * T + t + 1] * (float)M_LOG2E);
                float *s0 = w->S + r * T, *s1 = s0 + T;
                const float *p0 = w->dP + r * T, *p1 = p0 + T;
                __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();
                for (int64_t n = 0; n < nk; n += 16) { /* P, and rowsum(P dP) = rowsum(dO o) */
                    __m512 e0 = v_exp2(_mm512_fmsub_ps(_mm512_loadu_ps(s0 + n), vsl, l0));
                    __m512 e1 = v_exp2(_mm512_fmsub_ps(_mm512_loadu_ps(s1 + n), vsl, l1));
                    if (n + 15 > t) { /* keys past t (row t) or t + 1 (row t + 1) */
                        e0 = _mm512_maskz_mov_ps(n <= t ? v_mask(t + 1 - n) : 0, e0);
                        e1 = _mm512_maskz_mov_ps(n <= t + 1 ? v_mask(t + 2 - n) : 0, e1);
                    }
                    d0 = _mm512_fmadd_ps(e0, _mm512_loadu_ps(p0 + n), d0);
                    d1 = _mm512_fmadd_ps(e1, _mm512_loadu_ps(p1 + n), d1);
                    _mm512_storeu_ps(s0 + n, e0);
                    _mm512_storeu_ps(s1 + n, e1);
                }
                const __m512 delta0 = _mm512_set1_ps(_mm512_reduce_add_ps(d0));
                const __m512 delta1 = _mm512_set1_ps(_mm512_reduce_add_ps(d1));
                uint32_t *pv = w->pv + ((g * T + t) / 2) * T, *dsv = w->dsv + ((g * T + t) / 2) * T;
                bf16 *dsr = w->dsr + r * T;
                for (int64_t n = 0; n < nk; n += 16) {
                    __m512 e0 = _mm512_loadu_ps(s0 + n), e1 = _mm512_loadu_ps(s1 + n);
                    __m512 ds0 = _mm512_mul_ps(e0, _mm512_sub_ps(_mm512_loadu_ps(p0 + n), delta0));
                    __m512 ds1 = _mm512_mul_ps(e1, _mm512_sub_ps(_mm512_loadu_ps(p1 + n), delta1));
                    _mm512_storeu_si512(pv + n, pair_rows(e0, e1));
                    _mm512_storeu_si512(dsv + n, pair_rows(ds0, ds1));
                    v_store(dsr + n, ds0, 0xFFFF);
                    v_store(dsr + T + n, ds1, 0xFFFF);
                }
            }
            tile_times_rpairs(w->dsr, w->kv, T, D, nk, w->acc);
            store_rows(w->acc, D, scale, w->dqr, D);
            store_unrotated(w->dqr, 16, D, dq + g * dqs.h + i * dqs.t, dqs.t, cs ? cs + i * D : NULL,
                            cs ? sn + i * D : NULL);
        }
    for (int64_t d = 0; d < D; d += 16)
        for (int64_t n = 0; n < T; n += 32) {
            zero_tiles4();
            for (int64_t g = 0; g < G; g++)
                for (int64_t r = g * T + n; r < (g + 1) * T; r += 32) { /* queries at or after these keys */
                    _tile_loadd(4, w->qT + d * R + r, R * 2);
                    _tile_loadd(5, w->doT + d * R + r, R * 2);
                    _tile_loadd(6, w->dsv + (r / 2) * T + n, T * 4);
                    _tile_loadd(7, w->dsv + (r / 2) * T + n + 16, T * 4);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_loadd(6, w->pv + (r / 2) * T + n, T * 4);
                    _tile_loadd(7, w->pv + (r / 2) * T + n + 16, T * 4);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
            _tile_stored(0, w->dkT + d * T + n, T * 4);
            _tile_stored(1, w->dkT + d * T + n + 16, T * 4);
            _tile_stored(2, w->dvT + d * T + n, T * 4);
            _tile_stored(3, w->dvT + d * T + n + 16, T * 4);
        }
    __m512i tr[16];
    for (int64_t d = 0; d < D; d += 16)
        for (int64_t n = 0; n < T; n += 16) {
            tr16((const uint32_t *)w->dkT + d * T + n, T, tr);
            for (int j = 0; j < 16; j++) /* kr (the keys' rows) is free again: dK's rows wait there */
                v_store(w->kr + (n + j) * D + d, _mm512_mul_ps(_mm512_castsi512_ps(tr[j]), vscale), 0xFFFF);
            tr16((const uint32_t *)w->dvT + d * T + n, T, tr);
            for (int j = 0; j < 16; j++)
                v_store(dv + (n + j) * dvt + d, _mm512_castsi512_ps(tr[j]), 0xFFFF);
        }
    store_unrotated(w->kr, T, D, dk, dkt, cs, sn);
}

/* Runs item(it, args, scratch) for it in [0, items) on nt threads, each with `bytes` of its own scratch and its
 * tiles configured: 0, or 2 when a thread's scratch could not be allocated. */
static int attn_items(int64_t items, size_t bytes, void (*item)(int64_t, const void *, char *), const void *args,
                      int nt) {
    int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        char *p = arena(bytes);
        failed = p == NULL ? 2 : 0;
        if (p)
            amx_config();
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++)
            if (p)
                item(it, args, p);
        if (p)
            _tile_release();
    }
    return failed;
}

typedef struct { /* one call's arguments; L: the layouts (see the entry points) */
    const bf16 *q, *k, *v, *go;
    bf16 *dq, *dk, *dv, *out;
    float *lse;
    const strides3 *L;
    const float *cs, *sn;
    int64_t H, Hkv, G, T, D;
    float scale;
} attn_args;

static void fwd_item(int64_t it, const void *args, char *p) {
    const attn_args *a = args;
    const strides3 *L = a->L;
    const int64_t G = a->G, T = a->T, D = a->D, b = it / a->Hkv, j = it % a->Hkv, h = j * G;
    const size_t td = T * D * 2;
    uint32_t *kp = carve(&p, td), *vp = carve(&p, td);
    bf16 *kr = carve(&p, td), *qr = carve(&p, G * T * D * 2);
    float *S = carve(&p, 16 * T * 4), *acc = carve(&p, 16 * D * 4);
    bf16 *P = carve(&p, 16 * T * 2);
    attn_fwd_item(a->q + b * L[0].b + h * L[0].h, L[0], a->k + b * L[1].b + j * L[1].h, L[1].t,
                  a->v + b * L[2].b + j * L[2].h, L[2].t, a->out + b * L[3].b + h * L[3].h, L[3],
                  a->lse + (b * a->H + h) * T, G, T, D, a->scale, a->cs, a->sn, qr, kr, kp, vp, S, P, acc);
}

static void bwd_item(int64_t it, const void *args, char *p) {
    const attn_args *a = args;
    const strides3 *L = a->L;
    const int64_t G = a->G, T = a->T, D = a->D, R = G * T, b = it / a->Hkv, j = it % a->Hkv, h = j * G;
    const size_t td = T * D * 2, rt = R * T * 2, rd = R * D * 2;
    attn_bwd_buf w;
    w.kp = carve(&p, td), w.vt = carve(&p, td), w.kv = carve(&p, td), w.kr = carve(&p, td);
    w.pv = carve(&p, rt), w.dsv = carve(&p, rt), w.qr = carve(&p, rd), w.qT = carve(&p, rd);
    w.doT = carve(&p, rd), w.dsr = carve(&p, 16 * T * 2), w.dqr = carve(&p, 16 * D * 2);
    w.S = carve(&p, 16 * T * 4), w.dP = carve(&p, 16 * T * 4), w.acc = carve(&p, 16 * D * 4);
    w.dkT = carve(&p, D * T * 4), w.dvT = carve(&p, D * T * 4);
    attn_bwd_item(a->q + b * L[0].b + h * L[0].h, L[0], a->k + b * L[1].b + j * L[1].h, L[1].t,
                  a->v + b * L[2].b + j * L[2].h, L[2].t, a->go + b * L[3].b + h * L[3].h, L[3],
                  a->lse + (b * a->H + h) * T, a->dq + b * L[4].b + h * L[4].h, L[4], a->dk + b * L[5].b + j * L[5].h,
                  L[5].t, a->dv + b * L[6].b + j * L[6].h, L[6].t, G, T, D, a->scale, a->cs, a->sn, &w);
}
#endif

/* lay: the (batch, head, position) element strides of q, k, v, dout, dq, dk, dv, in that order. cs, sn: the
 * RoPE cos / sin tables [T, D] (fp32) when q and k come unrotated (then dq and dk are returned unrotated too), or
 * NULL. Returns 0, 1 without AMX, 2 when scratch memory could not be allocated. */
int attn_amx_bwd(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *go, const float *lse,
                 bf16 *dq, bf16 *dk, bf16 *dv, const int64_t *lay, const float *cs, const float *sn, int64_t B,
                 int64_t H, int64_t Hkv, int64_t T, int64_t D, float scale, int nt) {
#if HAVE_AMX
    if (!amx_permitted())
        return 1;
    const int64_t G = H / Hkv, R = G * T;
    const attn_args a = {q, k, v, go, dq, dk, dv, NULL, (float *)lse, (const strides3 *)lay, cs, sn,
                         H, Hkv, G, T, D, scale};
    const size_t bytes = 4 * round64(T * D * 2) + 2 * round64(R * T * 2) + 3 * round64(R * D * 2) +
                         round64(16 * T * 2) + round64(16 * D * 2) + 2 * round64(16 * T * 4) + round64(16 * D * 4) +
                         2 * round64(D * T * 4);
    return attn_items(B * Hkv, bytes, bwd_item, &a, nt);
#else
    (void)q, (void)k, (void)v, (void)go, (void)lse, (void)dq, (void)dk, (void)dv, (void)lay, (void)cs;
    (void)sn, (void)B, (void)H, (void)Hkv, (void)T, (void)D, (void)scale, (void)nt;
    return 1;
#endif
}

/* lay: the (batch, head, position) element strides of q, k, v, o; cs, sn and the result as for attn_amx_bwd. */
int attn_amx_fwd(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, const int64_t *lay,
                 const float *cs, const float *sn, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t D,
                 float scale, int nt) {
#if HAVE_AMX
    if (!amx_permitted())
        return 1;
    const int64_t G = H / Hkv;
    const attn_args a = {q, k, v, NULL, NULL, NULL, NULL, o, lse, (const strides3 *)lay, cs, sn,
                         H, Hkv, G, T, D, scale};
    const size_t bytes = 3 * round64(T * D * 2) + round64(G * T * D * 2) + round64(16 * T * 4) +
                         round64(16 * D * 4) + round64(16 * T * 2);
    return attn_items(B * Hkv, bytes, fwd_item, &a, nt);
#else
    (void)q, (void)k, (void)v, (void)o, (void)lse, (void)lay, (void)cs, (void)sn, (void)B, (void)H, (void)Hkv;
    (void)T, (void)D, (void)scale, (void)nt;
    return 1;
#endif
}

/* ------------------------------------------------------------------ LoRA rank-side products on AMX
 * Around the frozen GEMMs of a LoRA linear Y = X W^T + S B^T with S = X A^T (adapters stacked: A [R][K], B [N][R],
 * B already scaled), oneDNN runs X W^T and G W; these kernels run the rank-R products, each in one pass over the
 * big operands per block of 32 rows instead of one GEMM call (and one pass over memory) per product:
 *   forward   S = bf16(X A^T) (returned, kept for backward), Y += S B^T in place (one rounding);
 *   backward  T = bf16(G B) (as PyTorch's bf16 matmul rounds it), dX += T A in place, dA = T^T X and
 *             dB^T = S^T G in fp32 (summed over threads; the caller rounds them to the parameters' dtype).
 * R is zero-padded to Rp (a multiple of 32) inside; K and N must be multiples of 32; any M (a last partial block
 * goes through zero-padded scratch). Operands are repacked as bf16 pairs where AMX wants them. */
#if HAVE_AMX
/* out[i][j] = (src(2i, j), src(2i + 1, j)) for i < P, j < Q, src(r, c) = m[r * rs + c * cs] when r < rows and
 * c < cols, else 0: the pair layout of AMX's second operand, built from any orientation of a small matrix */
static void pack_pairs(const bf16 *m, int64_t rs, int64_t cs, int64_t rows, int64_t cols, uint32_t *out, int64_t P,
                       int64_t Q) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < P; i++)
        for (int64_t j = 0; j < Q; j++) {
            uint32_t lo = 2 * i < rows && j < cols ? m[2 * i * rs + j * cs] : 0;
            uint32_t hi = 2 * i + 1 < rows && j < cols ? m[(2 * i + 1) * rs + j * cs] : 0;
            out[i * Q + j] = lo | hi << 16;
        }
}

/* out[32][Rp] bf16 = round(a [32 rows, stride lda][Kd] times pairs bp [Kd/2][Rp]); Kd % 32 == 0 */
static void rank_product(const bf16 *a, int64_t lda, const uint32_t *bp, int64_t Rp, int64_t Kd, float *f,
                         bf16 *out) {
    for (int64_t r = 0; r < Rp; r += 32) {
        zero_tiles4();
        for (int64_t k = 0; k < Kd; k += 32) {
            _tile_loadd(4, a + k, lda * 2);
            _tile_loadd(5, a + 16 * lda + k, lda * 2);
            _tile_loadd(6, bp + (k / 2) * Rp + r, Rp * 4);
            _tile_loadd(7, bp + (k / 2) * Rp + r + 16, Rp * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, f + r, Rp * 4);
        _tile_stored(1, f + r + 16, Rp * 4);
        _tile_stored(2, f + 16 * Rp + r, Rp * 4);
        _tile_stored(3, f + 16 * Rp + r + 16, Rp * 4);
    }
    for (int64_t i = 0; i < 32 * Rp; i += 16)
        v_store(out + i, _mm512_loadu_ps(f + i), 0xFFFF);
}

/* y[rows < 32][Nc] (stride ldy) += s [32][Rp] bf16 times pairs bp [Rp/2][Nc], rounded once; Nc % 32 == 0 */
static void add_rank_product(const bf16 *s, int64_t Rp, const uint32_t *bp, int64_t Nc, bf16 *y, int64_t ldy,
                             int64_t rows, float *buf) {
    for (int64_t m = 0; m < rows; m += 16)
        for (int64_t n = 0; n < Nc; n += 64) {
            const int w = Nc - n >= 64 ? 4 : 2; /* tiles of 16 columns */
            zero_tiles4();
            for (int64_t r = 0; r < Rp; r += 32) {
                const uint32_t *b = bp + (r / 2) * Nc + n;
                _tile_loadd(4, s + m * Rp + r, Rp * 2);
                _tile_loadd(6, b, Nc * 4);
                _tile_loadd(7, b + 16, Nc * 4);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                if (w == 4) {
                    _tile_loadd(6, b + 32, Nc * 4);
                    _tile_loadd(7, b + 48, Nc * 4);
                    _tile_dpbf16ps(2, 4, 6);
                    _tile_dpbf16ps(3, 4, 7);
                }
            }
            _tile_stored(0, buf, 256);
            _tile_stored(1, buf + 16, 256);
            if (w == 4) {
                _tile_stored(2, buf + 32, 256);
                _tile_stored(3, buf + 48, 256);
            }
            for (int64_t i = 0; i < 16 && m + i < rows; i++) {
                bf16 *yr = y + (m + i) * ldy + n;
                for (int j = 0; j < 16 * w; j += 16)
                    v_store(yr + j, _mm512_add_ps(v_load(yr + j, 0xFFFF), _mm512_loadu_ps(buf + i * 64 + j)), 0xFFFF);
            }
        }
}

/* c [Rp][Nc] fp32 += at [Rp][32 sub] bf16 (a block's rows as columns, row stride 32 sub) times p, the same rows
 * as pairs [16 sub][Nc]: each 16 x 16 tile of c is loaded and stored once per block of sub x 32 rows */
static void acc_outer(const bf16 *at, int64_t Rp, const uint32_t *p, int64_t Nc, int64_t sub, float *c) {
    const int64_t W = 32 * sub;
    for (int64_t r = 0; r < Rp; r += 32)
        for (int64_t n = 0; n < Nc; n += 16) {
            float *c0 = c + r * Nc + n, *c1 = c0 + 16 * Nc;
            _tile_loadd(0, c0, Nc * 4);
            _tile_loadd(1, c1, Nc * 4);
            for (int64_t j = 0; j < sub; j++) {
                _tile_loadd(4, at + r * W + 32 * j, W * 2);
                _tile_loadd(5, at + (r + 16) * W + 32 * j, W * 2);
                _tile_loadd(6, p + 16 * j * Nc + n, Nc * 4);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 5, 6);
            }
            _tile_stored(0, c0, Nc * 4);
            _tile_stored(1, c1, Nc * 4);
        }
}

/* at [Rp][W] = the transpose of src [rows][cols] (row stride ld), zero beyond rows / cols */
static void small_transpose(const bf16 *src, int64_t ld, int64_t rows, int64_t cols, bf16 *at, int64_t Rp,
                            int64_t W) {
    for (int64_t r = 0; r < Rp; r++)
        for (int64_t m = 0; m < W; m++)
            at[r * W + m] = r < cols && m < rows ? src[m * ld + r] : 0;
}

/* rows [0, rows) of src (stride ld) as a zero-padded [32][cols] block in dst, or src itself when whole */
static const bf16 *whole_block(const bf16 *src, int64_t ld, int64_t rows, int64_t cols, bf16 *dst, int64_t *ldo) {
    if (rows == 32) {
        *ldo = ld;
        return src;
    }
    memset(dst, 0, 32 * cols * 2);
    for (int64_t i = 0; i < rows; i++)
        memcpy(dst + i * cols, src + i * ld, cols * 2);
    *ldo = cols;
    return dst;
}
#endif

static int64_t round32(int64_t n) { return (n + 31) / 32 * 32; }

/* s [M][R] = bf16(x A^T), y [M][N] (stride ldy) += s B^T; x rows stride ldx. Returns 0, 1 without AMX, 2 when
 * scratch memory could not be allocated. */
int lora_amx_fwd(const bf16 *x, int64_t ldx, const bf16 *a, const bf16 *b, bf16 *s, bf16 *y, int64_t ldy,
                 int64_t M, int64_t K, int64_t N, int64_t R, int nt) {
#if HAVE_AMX
    if (!amx_permitted())
        return 1;
    const int64_t Rp = round32(R);
    uint32_t *akp = aligned_alloc(64, round64(K / 2 * Rp * 4)), *brp = aligned_alloc(64, round64(Rp / 2 * N * 4));
    int failed = akp == NULL || brp == NULL ? 2 : 0;
    if (failed) {
        free(akp);
        free(brp);
        return failed;
    }
    const size_t bytes = round64(32 * Rp * 4) + round64(32 * Rp * 2) + round64(16 * 64 * 4) + round64(32 * K * 2);
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        pack_pairs(a, 1, K, K, R, akp, K / 2, Rp);      /* (A^T) as pairs over k */
        pack_pairs(b, 1, R, R, N, brp, Rp / 2, N);      /* (B^T) as pairs over r */
        char *p = arena(bytes);
        failed = p == NULL ? 2 : 0;
        float *f = p ? carve(&p, 32 * Rp * 4) : NULL, *buf = p ? carve(&p, 16 * 64 * 4) : NULL;
        bf16 *sb = p ? carve(&p, 32 * Rp * 2) : NULL, *tail = p ? carve(&p, 32 * K * 2) : NULL;
        if (f)
            amx_config();
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m += 32) {
            if (!f)
                continue;
            const int64_t rows = M - m < 32 ? M - m : 32;
            int64_t ld;
            const bf16 *xb = whole_block(x + m * ldx, ldx, rows, K, tail, &ld);
            rank_product(xb, ld, akp, Rp, K, f, sb);
            for (int64_t i = 0; i < rows; i++)
                memcpy(s + (m + i) * R, sb + i * Rp, R * 2);
            add_rank_product(sb, Rp, brp, N, y + m * ldy, ldy, rows, buf);
        }
        if (f)
            _tile_release();
    }
    free(akp);
    free(brp);
    return failed;
#else
    (void)x, (void)ldx, (void)a, (void)b, (void)s, (void)y, (void)ldy, (void)M, (void)K, (void)N, (void)R, (void)nt;
    return 1;
#endif
}

/* The backward of lora_amx_fwd for g = dL/dy [M][N] (stride ldg): dx [M][K] (stride lddx) += T A when dx != NULL,
 * da [R][K] = T^T x when da != NULL, dbt [R][N] = s^T g (dB transposed) when dbt != NULL, T = bf16(g B); da and
 * dbt fp32. x (stride ldx) is read only for da, s only for dbt. Returns as lora_amx_fwd. */
int lora_amx_bwd(const bf16 *g, int64_t ldg, const bf16 *x, int64_t ldx, const bf16 *s, const bf16 *a,
                 const bf16 *b, bf16 *dx, int64_t lddx, float *da, float *dbt, int64_t M, int64_t K, int64_t N,
                 int64_t R, int nt) {
#if HAVE_AMX
    if (!amx_permitted())
        return 1;
    const int64_t LB = 128, Rp = round32(R), blocks = (M + LB - 1) / LB; /* rows per block */
    const int need_t = dx != NULL || da != NULL;
    const int chunks = nt < 1 ? 1 : (int)(nt < blocks ? nt : blocks); /* one fp32 accumulator per chunk of rows */
    const size_t acc = round64(((da ? Rp * K : 0) + (dbt ? Rp * N : 0)) * 4);
    uint32_t *bnp = aligned_alloc(64, round64(N / 2 * Rp * 4)), *arp = aligned_alloc(64, round64(Rp / 2 * K * 4));
    char *accs = aligned_alloc(64, chunks * acc + 64);
    int failed = bnp == NULL || arp == NULL || accs == NULL ? 2 : 0;
    if (failed) {
        free(bnp);
        free(arp);
        free(accs);
        return failed;
    }
    memset(accs, 0, chunks * acc);
    const size_t bytes = round64(32 * Rp * 4) + 3 * round64(LB * Rp * 2) + round64(16 * 64 * 4) +
                         round64(LB / 2 * K * 4) + round64(LB / 2 * N * 4) + round64(32 * K * 2) + round64(32 * N * 2);
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        if (need_t)
            pack_pairs(b, R, 1, N, R, bnp, N / 2, Rp);  /* B as pairs over n */
        if (dx)
            pack_pairs(a, K, 1, R, K, arp, Rp / 2, K);  /* A as pairs over r */
        char *p = arena(bytes);
        failed = p == NULL ? 2 : 0;
        if (p)
            amx_config();
#pragma omp for schedule(static)
        for (int c = 0; c < chunks; c++) {
            if (!p)
                continue;
            char *q = p;
            float *f = carve(&q, 32 * Rp * 4), *buf = carve(&q, 16 * 64 * 4);
            bf16 *tb = carve(&q, LB * Rp * 2), *tt = carve(&q, LB * Rp * 2), *st = carve(&q, LB * Rp * 2);
            uint32_t *xp = carve(&q, LB / 2 * K * 4), *gp = carve(&q, LB / 2 * N * 4);
            bf16 *xtail = carve(&q, 32 * K * 2), *gtail = carve(&q, 32 * N * 2);
            float *dac = (float *)(accs + c * acc), *dbc = dac + (da ? Rp * K : 0);
            for (int64_t blk = blocks * c / chunks; blk < blocks * (c + 1) / chunks; blk++) {
                const int64_t m0 = blk * LB, rows = M - m0 < LB ? M - m0 : LB, sub = (rows + 31) / 32;
                for (int64_t j = 0; j < sub; j++) { /* 32-row pieces: T, dX, and the pairs for dA / dB */
                    const int64_t m = m0 + 32 * j, n = M - m < 32 ? M - m : 32;
                    int64_t lg, lx;
                    const bf16 *gb = whole_block(g + m * ldg, ldg, n, N, gtail, &lg);
                    if (need_t)
                        rank_product(gb, lg, bnp, Rp, N, f, tb + 32 * j * Rp);
                    if (dx)
                        add_rank_product(tb + 32 * j * Rp, Rp, arp, K, dx + m * lddx, lddx, n, buf);
                    if (da) {
                        const bf16 *xb = whole_block(x + m * ldx, ldx, n, K, xtail, &lx);
                        pack_rpairs(xb, lx, xp + 16 * j * K, 32, K);
                    }
                    if (dbt)
                        pack_rpairs(gb, lg, gp + 16 * j * N, 32, N);
                }
                if (da) {
                    small_transpose(tb, Rp, 32 * sub, Rp, tt, Rp, 32 * sub);
                    acc_outer(tt, Rp, xp, K, sub, dac);
                }
                if (dbt) {
                    small_transpose(s + m0 * R, R, rows, R, st, Rp, 32 * sub);
                    acc_outer(st, Rp, gp, N, sub, dbc);
                }
            }
        }
        if (p)
            _tile_release();
        /* the implicit barrier of the loop above: every chunk's sums are complete */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++)
            for (int c = 0; c < chunks; c++) {
                const float *dac = (const float *)(accs + c * acc), *dbc = dac + (da ? Rp * K : 0);
                if (da)
                    for (int64_t k = 0; k < K; k++)
                        da[r * K + k] = (c ? da[r * K + k] : 0.0f) + dac[r * K + k];
                if (dbt)
                    for (int64_t n = 0; n < N; n++)
                        dbt[r * N + n] = (c ? dbt[r * N + n] : 0.0f) + dbc[r * N + n];
            }
    }
    free(bnp);
    free(arp);
    free(accs);
    return failed;
#else
    (void)g, (void)ldg, (void)x, (void)ldx, (void)s, (void)a, (void)b, (void)dx, (void)lddx, (void)da, (void)dbt;
    (void)M, (void)K, (void)N, (void)R, (void)nt;
    return 1;
#endif
}

/* 1 when attn_amx_fwd / attn_amx_bwd can run: compiled for AMX and the OS grants the tile state. */
int amx_available(void) {
#if HAVE_AMX
    return amx_permitted();
#else
    return 0;
#endif
}
