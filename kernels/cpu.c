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

static inline __m512 v_sigmoid(__m512 a) {
    __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, v_exp(_mm512_sub_ps(_mm512_setzero_ps(), a))));
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
        __m512 a = v_load(gr + j, m);
        v_store(o + j, _mm512_mul_ps(_mm512_mul_ps(a, v_sigmoid(a)), v_load(ur + j, m)), m);
    }
}

static inline void swiglu_bwd_row(const bf16 *restrict gr, const bf16 *restrict ar, const bf16 *restrict ur,
                                  bf16 *restrict dg, bf16 *restrict du, int64_t F) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t j = 0; j < F; j += 16) {
        __mmask16 m = v_mask(F - j);
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

/* ------------------------------------------------------------------ causal softmax
 * s: R rows of T scores; row i is query position t = i % T and sees keys 0..t. In place:
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

int causal_softmax_fwd(bf16 *restrict s, int64_t R, int64_t T, float scale, int nt) {
    int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        float *restrict buf = (float *)malloc((size_t)(T + 16) * sizeof(float));
        failed = buf == NULL;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < R; i++)
            if (buf != NULL) softmax_row(s + i * T, i % T + 1, T, scale, buf);
        free(buf);
    }
    return failed;
}

void causal_softmax_bwd(const bf16 *restrict p, bf16 *restrict dp, int64_t R, int64_t T, float scale, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < R; i++) softmax_bwd_row(p + i * T, dp + i * T, i % T + 1, T, scale);
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
