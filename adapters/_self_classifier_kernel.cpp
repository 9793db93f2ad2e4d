// Fused CPU kernel of the Self-Classifier loss of one head (linear-space path).
//
// Built on first use by adapters/_native.py (a C++ compiler, C ABI, loaded with ctypes) and
// called by the PyTorch and JAX adapters. It computes the closed form of
// clusterlearn/self_classifier_closed_form.py on its linear-space path (same formula, same
// max(sum, eps) clamps; the exp floors and eps come in Params from the core's GuardPlan,
// clusterlearn/self_classifier_guards.py, their only home), but streams the K views of shape
// (N, C) row by row instead of materialising any N x C intermediate:
//
//   forward   pass 1  row maxima and column maxima of every view
//             pass 2  per row: the row softmax's normaliser, then its contribution to the
//                     column sums Q; the column sums of exp((x - column max)/tau_col)
//             pass 3  per loss row: the column softmax p, its row sum S and the targets T;
//                     q, w, LP = log(w + eps) and pi; A, B and the pair dots (the loss);
//                     then the column sums of U = T (A - a r) and of pi B and, when a
//                     gradient is wanted, its row-local part g0 = U + alpha pi B
//   backward  pass 4  per row: the gradient from g0, the row's exponentials and the statistics
//
// Between passes only (K, N) and (K, C) statistics are kept (the `stats` buffer, laid out by
// Layout), besides g0 and, for small problems, a cache of pass 2's exponentials; the logits
// are read four times, g0 written once and read once. Per element: six exponentials (two with
// the cache), one logarithm, one division. exp and log are written as plain arithmetic so
// that the loops over the classes vectorise (the row helpers take __restrict pointers and stay
// out of line); rows are split over `threads` threads: on XLA's intra-op pool under JAX (a
// TaskPool from the FFI handler), PyTorch's OpenMP pool when sc_use_openmp gave it, else
// std::threads. Notation and gradient: see the docstring of clusterlearn/self_classifier_closed_form.py.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace {

struct Params {
  int64_t k, n, c;       // views, global rows, classes
  int64_t r0, r1;        // loss rows [r0, r1)
  const int64_t* pairs;  // npairs (target view, prediction view) pairs, flattened
  int64_t npairs;
  double inv_tc, inv_tr;            // 1/tau_col, 1/tau_row
  double log_floor_t, log_floor_p;  // log of the exp floors (targets, predictions): GuardPlan's
  double eps;
  int threads;
};

// Offsets of the statistics in the stats buffer (all of the kernel's dtype).
struct Layout {
  int64_t row_max, row_sum, row_b;            // (K, N) each
  int64_t col_max, col_sum, q, col_u, col_v;  // (K, C) each
  int64_t finite;                             // (K): 1 where the view holds NaN or inf, else 0
  int64_t size;
  Layout(int64_t k, int64_t n, int64_t c) {
    const int64_t kn = k * n, kc = k * c;
    row_max = 0;
    row_sum = kn;
    row_b = 2 * kn;
    col_max = 3 * kn;
    col_sum = col_max + kc;
    q = col_sum + kc;
    col_u = q + kc;
    col_v = col_u + kc;
    finite = col_v + kc;
    size = finite + k;
  }
};

// Flush-to-zero and denormals-are-zero for the current thread while in scope (restored after):
// products such as pi * T reach 1e-46 in float32, and each operation on a denormal costs ~100x.
class FlushDenormals {
#if defined(__SSE__)
 public:
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// An OpenMP runtime already in the process (PyTorch's), set by sc_use_openmp: parallel() then
// runs on its thread pool instead of starting threads. Its idle workers spin for milliseconds
// after each of PyTorch's parallel regions, so threads of our own would compete with them for
// the cores; its pool picks the work up at once.
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel
  int (*thread_num)() = nullptr;                                           // omp_get_thread_num
  int (*num_threads)() = nullptr;                                          // omp_get_num_threads
};
OpenMP openmp;

// Block i of `t` contiguous blocks of [0, n): f(i, begin, end), with denormals flushed.
template <class F>
struct Blocks {
  F* f;
  int t;
  int64_t n;
  // noexcept: an exception (bad_alloc) ends the process here instead of leaving parallel()
  // while other threads still run blocks that point into the caller's frame.
  void operator()(int i) const noexcept {
    FlushDenormals ftz;
    (*f)(i, n * i / t, n * (i + 1) / t);
  }
};

// A task queue of a thread pool the caller owns (XLA's intra-op pool, from the FFI handler):
// schedule(context, task, data) runs task(data) once, on some thread, now or later.
struct TaskPool {
  void (*schedule)(void* context, void (*task)(void*), void* data);
  void* context;
};

// Blocks shared by the caller and the tasks it scheduled: whoever comes first claims the next
// block, so the caller never waits for a task that has not started (the pool may be busy, or
// be running the caller itself); it waits only for blocks claimed and still running. A task
// that starts after all blocks are claimed touches nothing but this (shared) record.
struct Claims {
  std::atomic<int> next{0}, done{0};
  int blocks = 0;
  void (*run)(const void*, int) = nullptr;
  const void* data = nullptr;
  void work() {
    for (int i; (i = next.fetch_add(1, std::memory_order_relaxed)) < blocks;) {
      run(data, i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// f(block, begin, end) on `threads` contiguous blocks of [0, n) in parallel: on `pool` when
// given, else on the OpenMP pool of sc_use_openmp, else on threads started here.
template <class F>
void parallel(int threads, int64_t n, F&& f, const TaskPool* pool = nullptr) {
  using B = Blocks<std::remove_reference_t<F>>;
  const B blocks{&f, threads, n};
  if (threads > 1 && pool != nullptr) {
    auto claims = std::make_shared<Claims>();
    claims->blocks = threads;
    claims->run = [](const void* b, int i) { (*static_cast<const B*>(b))(i); };
    claims->data = &blocks;
    for (int i = 1; i < threads; ++i)
      pool->schedule(pool->context,
                     [](void* held) {
                       const std::unique_ptr<std::shared_ptr<Claims>> own(static_cast<std::shared_ptr<Claims>*>(held));
                       (*own)->work();
                     },
                     new std::shared_ptr<Claims>(claims));
    claims->work();
    for (int spins = 0; claims->done.load(std::memory_order_acquire) < threads; ++spins)
      if (spins > 1000) std::this_thread::yield();
    return;
  }
  if (threads > 1 && openmp.parallel != nullptr) {
    openmp.parallel(
        [](void* data) {
          const B& b = *static_cast<const B*>(data);
          // the runtime may give fewer threads than asked: each takes every team-th block
          const int team = openmp.num_threads();
          for (int i = openmp.thread_num(); i < b.t; i += team) b(i);
        },
        const_cast<void*>(static_cast<const void*>(&blocks)), static_cast<unsigned>(threads), 0);
    return;
  }
  std::vector<std::thread> started;
  started.reserve(threads - 1);
  for (int i = 1; i < threads; ++i) started.emplace_back(blocks, i);
  blocks(0);
  for (auto& th : started) th.join();
}

// Per-thread column sums of `arrays` (K, C) arrays: accumulated in T over blocks of kBlock rows
// (in cache, half the traffic of double), each block then added to double totals.
template <class T>
class ColumnSums {
 public:
  static constexpr int kBlock = 32;
  ColumnSums(int arrays, int64_t kc) : kc_(kc), block_(arrays * kc, T(0)), total_(arrays * kc, 0.0) {}
  T* operator[](int array) { return block_.data() + array * kc_; }
  void row_done() {
    if (++rows_ == kBlock) flush();
  }
  void flush() {
    for (size_t i = 0; i < block_.size(); ++i) total_[i] += block_[i];
    std::fill(block_.begin(), block_.end(), T(0));
    rows_ = 0;
  }
  // out[i] = sum over the threads' totals of array `array`.
  static void reduce(std::vector<ColumnSums>& sums, int array, T* out) {
    const int64_t kc = sums[0].kc_;
    for (int64_t i = 0; i < kc; ++i) {
      double s = 0.0;
      for (ColumnSums& t : sums) s += t.total_[array * kc + i];
      out[i] = static_cast<T>(s);
    }
  }

 private:
  int64_t kc_;
  int rows_ = 0;
  std::vector<T> block_;
  std::vector<double> total_;
};

// ---- exp and log as plain arithmetic, so that the loops calling them vectorise ----

// Always inlined: left to its heuristics, g++ once called exp out of line from a loop (a scalar
// call per element, the forward 2.6x slower) after unrelated code grew the file.
#define SC_INLINE inline __attribute__((always_inline))

template <class T>
struct Bits;
template <>
struct Bits<float> {
  using I = int32_t;
  static constexpr int mantissa = 23, bias = 127;
};
template <>
struct Bits<double> {
  using I = int64_t;
  static constexpr int mantissa = 52, bias = 1023;
};

template <class T>
SC_INLINE T from_bits(typename Bits<T>::I i) {
  T t;
  std::memcpy(&t, &i, sizeof t);
  return t;
}

template <class T>
SC_INLINE typename Bits<T>::I to_bits(T t) {
  typename Bits<T>::I i;
  std::memcpy(&i, &t, sizeof t);
  return i;
}

// c0 + x (c1 + x (c2 + ...)), unrolled at compile time (a loop here would stop the vectoriser).
template <class T>
SC_INLINE T horner(T, T c) {
  return c;
}
template <class T, class... Rest>
SC_INLINE T horner(T x, T c, Rest... rest) {
  return std::fma(horner(x, rest...), x, c);
}

// ln 2 = kLn2Hi + kLn2Lo, kLn2Hi exact in 16 bits (n * kLn2Hi is exact for |n| < 2^8 in float).
constexpr double kLn2Hi = 0.693145751953125, kLn2Lo = 1.4286068203094172321e-6;
constexpr double kLog2E = 1.44269504088896340736;

// ln 2^k / k!, the Taylor coefficients of 2^f.
constexpr double exp2_taylor(int k) { return k == 0 ? 1.0 : exp2_taylor(k - 1) * 0.69314718055994530942 / k; }

// 2^y for y in [log2(smallest normal) + 1, 0] (exp(z) = 2^(z log2 e): the callers fold log2 e
// into their temperatures): y = n + f with n the nearest integer, |f| <= 1/2, 2^f by a
// polynomial in f (float: degree 6, fitted for the least maximum relative error, 5.9e-9;
// double: Taylor to degree 13), times 2^n built in the exponent bits (a normal number in that
// range). n is rounded by adding 1.5 * 2^mantissa plus the exponent bias, which leaves the
// biased n in the sum's low bits, and f = y - n is exact: 14 operations with the callers'
// subtraction, scaling and floor, against 16 in base e with a two-part ln 2 (10 % faster
// than that again with nearbyint and a cast). Within 1 ulp of the correctly rounded value in
// float and double (measured over 1.6e7 points each).
template <class T>
SC_INLINE T exp2_nonpositive(T y) {
  using U = std::make_unsigned_t<typename Bits<T>::I>;
  constexpr T shifter = T(U(3) << (Bits<T>::mantissa - 1)) + T(Bits<T>::bias);
  const T t = y + shifter;
  const T f = y - (t - shifter);
  T p;
  if constexpr (sizeof(T) == 4) {
    p = horner(f, T(1), T(6.9314723201e-01), T(2.4022644823e-01), T(5.5502934835e-02), T(9.6187742198e-03),
               T(1.3410475081e-03), T(1.5272534884e-04));
  } else {
    p = horner(f, exp2_taylor(0), exp2_taylor(1), exp2_taylor(2), exp2_taylor(3), exp2_taylor(4), exp2_taylor(5),
               exp2_taylor(6), exp2_taylor(7), exp2_taylor(8), exp2_taylor(9), exp2_taylor(10), exp2_taylor(11),
               exp2_taylor(12), exp2_taylor(13));
  }
  return p * from_bits<T>(static_cast<typename Bits<T>::I>(static_cast<U>(to_bits(t)) << Bits<T>::mantissa));
}

// log(x) for a positive normal x: x = 2^e m, m in [sqrt(1/2), sqrt(2)), f = m - 1. float:
// log(1 + f) = f - f^2/2 + f^3 P(f) with Cephes' degree-8 minimax P (no division; within
// 1.2 ulp over 1.6e7 points); double: 2 atanh(f / (2 + f)) by its series (within 2 ulp).
template <class T>
SC_INLINE T log_positive(T x) {
  using I = typename Bits<T>::I;
  const I bits = to_bits(x);
  const I e = (bits - to_bits(T(0.70710678118654752440))) >> Bits<T>::mantissa;
  const T f = from_bits<T>(bits - static_cast<I>(static_cast<std::make_unsigned_t<I>>(e) << Bits<T>::mantissa)) - T(1);
  T log_m;
  if constexpr (sizeof(T) == 4) {
    const T f2 = f * f;
    const T p = horner(f, 3.3333331174E-1f, -2.4999993993E-1f, 2.0000714765E-1f, -1.6668057665E-1f, 1.4249322787E-1f,
                       -1.2420140846E-1f, 1.1676998740E-1f, -1.1514610310E-1f, 7.0376836292E-2f);
    log_m = std::fma(f2 * f, p, std::fma(T(-0.5), f2, f));
  } else {
    const T s = f / (T(2) + f), s2 = s * s;
    const T p = horner(s2, 1.0 / 3, 1.0 / 5, 1.0 / 7, 1.0 / 9, 1.0 / 11, 1.0 / 13, 1.0 / 15, 1.0 / 17, 1.0 / 19, 1.0 / 21);
    log_m = T(2) * std::fma(s * s2, p, s);
  }
  const T ef = static_cast<T>(e);
  return std::fma(ef, T(kLn2Hi), std::fma(ef, T(kLn2Lo), log_m));
}

// exp(max(z, log_floor)) = 2^max(y, log2_floor) for y = z log2 e <= 0; log_floor >= log(8 *
// smallest normal) (the callers' floors).
template <class T>
SC_INLINE T floored_exp(T y, T log2_floor) {
  return exp2_nonpositive(y > log2_floor ? y : log2_floor);
}

// The kernel's constants in its dtype; ic, ir, lft and lfp in base 2 (times log2 e): 1/tau_col,
// 1/tau_row, the targets' and the predictions' log exp floors.
template <class T>
struct Consts {
  T ic, ir, lft, lfp, eps, ratio;
};

// ---- row helpers: one row of one view, vectorised over the c classes ----

// Kept out of line: inlined into the passes' lambdas, g++ lost their __restrict guarantees and
// ran scalar fallbacks (measured: the backward 1.5x slower); a call per row costs nothing.
#define SC_ROW __attribute__((noinline))

// Row maximum; col_max = max(col_max, x); nonfinite += sum_y (x - x), NaN iff x has NaN or inf.
template <class T>
SC_ROW T max_row(int64_t c, const T* __restrict x, T* __restrict col_max, T& nonfinite) {
  T m = std::numeric_limits<T>::lowest(), z = 0;
#pragma omp simd reduction(max : m) reduction(+ : z)
  for (int64_t y = 0; y < c; ++y) {
    m = x[y] > m ? x[y] : m;
    col_max[y] = x[y] > col_max[y] ? x[y] : col_max[y];
    z += x[y] - x[y];
  }
  nonfinite += z;
  return m;
}

// The exponentials of one row of one view: computed from the logits, or (Cached) loaded from
// the forward's cache of them (er: row softmax numerators, ec: column softmax numerators).
template <class T>
struct RowExps {
  const T* x;
  const T* er;
  const T* ec;
  T rm;
  const T* cm;
};

// The loops read RowExps' members through __restrict locals (er/ec unused when not Cached,
// x/cm unused when Cached).
#define SC_ROW_EXPS(e, k)                                                                    \
  const T* __restrict x = e.x;                                                               \
  const T* __restrict er = e.er;                                                             \
  const T* __restrict ec = e.ec;                                                             \
  const T* __restrict cm = e.cm;                                                             \
  const T rm = e.rm, ic = k.ic, ir = k.ir, lft = k.lft, lfp = k.lfp
#define SC_ROW_EXP(y) (Cached ? er[y] : floored_exp((x[y] - rm) * ir, lfp))
#define SC_COL_EXP(y) (Cached ? ec[y] : floored_exp((x[y] - cm[y]) * ic, lft))

// Row sum of the floored exp((x - rm)/tau_row) (returned, the exps kept in `er`); col_sum +=
// floored exp((x - cm)/tau_col) (kept in `ec` unless null); q_sum += the row softmax er / sum.
template <class T>
SC_ROW T sums_row(int64_t c, const T* __restrict x, T rm, const T* __restrict cm, const Consts<T>& k,
           T* __restrict er, T* __restrict ec, T* __restrict col_sum, T* __restrict q_sum) {
  const T ic = k.ic, ir = k.ir, lft = k.lft, lfp = k.lfp;
  T s = 0;
  if (ec != nullptr) {
#pragma omp simd reduction(+ : s)
    for (int64_t y = 0; y < c; ++y) {
      const T r = floored_exp((x[y] - rm) * ir, lfp), cy = floored_exp((x[y] - cm[y]) * ic, lft);
      er[y] = r;
      s += r;
      ec[y] = cy;
      col_sum[y] += cy;
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t y = 0; y < c; ++y) {
      const T r = floored_exp((x[y] - rm) * ir, lfp);
      er[y] = r;
      s += r;
      col_sum[y] += floored_exp((x[y] - cm[y]) * ic, lft);
    }
  }
  const T inv = T(1) / s;
#pragma omp simd
  for (int64_t y = 0; y < c; ++y) q_sum[y] += er[y] * inv;
  return s;
}

// One loss row of one view in one sweep: the column softmax p (returns its row sum S; the
// targets are T = p / max(S, eps)), LP = log(w + eps) and pi = w / (w + eps) with w = q wq,
// q the row softmax and wq = (N/C) / max(Q, eps).
template <bool Cached, class T>
SC_ROW T loss_quantities_row(int64_t c, const RowExps<T>& e, const T* __restrict inv_cs, T inv_rs,
                      const T* __restrict wq, const Consts<T>& k, T* __restrict p, T* __restrict lp,
                      T* __restrict pi) {
  SC_ROW_EXPS(e, k);
  const T eps = k.eps;
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t y = 0; y < c; ++y) {
    const T py = SC_COL_EXP(y) * inv_cs[y];
    const T w = SC_ROW_EXP(y) * inv_rs * wq[y];
    const T w_eps = w + eps;
    p[y] = py;
    s += py;
    lp[y] = log_positive(w_eps);
    pi[y] = w / w_eps;
  }
  return s;
}

// dst += scale src.
template <class T>
SC_ROW void add_row(int64_t c, T scale, const T* __restrict src, T* __restrict dst) {
#pragma omp simd
  for (int64_t y = 0; y < c; ++y) dst[y] += scale * src[y];
}

template <class T>
SC_ROW T dot_row(int64_t c, const T* __restrict a, const T* __restrict b) {
  T d = 0;
#pragma omp simd reduction(+ : d)
  for (int64_t y = 0; y < c; ++y) d += a[y] * b[y];
  return d;
}

// col_u += U = T (A - r) with T = ts p; col_v += pi B with B = bs b; returns sum_y pi B. With
// g0: g0 = U + alpha pi B, the part of the gradient (before scaling) known from this row alone.
template <class T>
SC_ROW T backward_sums_row(int64_t c, const T* __restrict p, T ts, const T* __restrict a, T r, const T* __restrict pi,
                    const T* __restrict b, T bs, T alpha, T* __restrict col_u, T* __restrict col_v,
                    T* __restrict g0) {
  T sb = 0;
  if (g0 != nullptr) {
#pragma omp simd reduction(+ : sb)
    for (int64_t y = 0; y < c; ++y) {
      const T u = ts * p[y] * (a[y] - r), pb = bs * pi[y] * b[y];
      col_u[y] += u;
      col_v[y] += pb;
      sb += pb;
      g0[y] = u + alpha * pb;
    }
  } else {
#pragma omp simd reduction(+ : sb)
    for (int64_t y = 0; y < c; ++y) {
      const T pb = bs * pi[y] * b[y];
      col_u[y] += ts * p[y] * (a[y] - r);
      col_v[y] += pb;
      sb += pb;
    }
  }
  return sb;
}

// The gradient of one row of one view from the forward's row-local part g0 (g0 = 0 outside the
// loss rows: g0 == nullptr): out = scale (g0 - p cu - alpha q (cq - h)), h = sum_y q cq - sb,
// with p = ec / col_sum and q = er / row_sum, where pcu = cu / col_sum. out may be g0; when
// the exponentials are not Cached, `row_exps` (c values) receives the row's er for the second loop.
template <bool Cached, class T>
SC_ROW void finish_row(int64_t c, const RowExps<T>& e, const Consts<T>& k, T inv_rs, const T* g0, T sb,
                       const T* __restrict pcu, const T* __restrict cq, T alpha, T scale, T* __restrict row_exps,
                       T* out) {
  SC_ROW_EXPS(e, k);
  T d = 0;
#pragma omp simd reduction(+ : d)
  for (int64_t y = 0; y < c; ++y) {
    const T r = SC_ROW_EXP(y);
    if (!Cached) row_exps[y] = r;
    d += r * cq[y];
  }
  const T h = d * inv_rs - sb, fq = alpha * inv_rs;
#define SC_FINISH_TERMS(y) (SC_COL_EXP(y) * pcu[y] + (Cached ? er[y] : row_exps[y]) * fq * (cq[y] - h))
  if (g0 != nullptr) {
#pragma omp simd
    for (int64_t y = 0; y < c; ++y) out[y] = scale * (g0[y] - SC_FINISH_TERMS(y));
  } else {
#pragma omp simd
    for (int64_t y = 0; y < c; ++y) out[y] = -scale * SC_FINISH_TERMS(y);
  }
#undef SC_FINISH_TERMS
}

template <class T>
class Kernel {
 public:
  // cache: null, or 2 K N C values for the exponentials of pass 2 (row softmax numerators, then
  // column softmax numerators, view by view), which passes 3 and 4 then read instead of
  // recomputing four of the six exponentials per element.
  Kernel(const T* const* views, const Params& p, T* stats, T* cache, const TaskPool* pool = nullptr)
      : x_(views), p_(p), lay_(p.k, p.n, p.c), st_(stats), cache_(cache), pool_(pool),
        k_{static_cast<T>(p.inv_tc * kLog2E), static_cast<T>(p.inv_tr * kLog2E), base2_floor(p.log_floor_t),
           base2_floor(p.log_floor_p), static_cast<T>(p.eps),
           static_cast<T>(static_cast<double>(p.n) / static_cast<double>(p.c))},
        to_pred_(p.k), to_target_(p.k) {
    for (int64_t i = 0; i < p.npairs; ++i) {
      to_pred_[p.pairs[2 * i]].push_back(p.pairs[2 * i + 1]);
      to_target_[p.pairs[2 * i + 1]].push_back(p.pairs[2 * i]);
    }
  }

  // A log exp floor in base 2, at least 2^(2 - bias) (the adapters' floors are 8 x the smallest
  // normal or more: no change), within exp2_nonpositive's range whatever the caller passes.
  static T base2_floor(double log_floor) {
    return static_cast<T>(std::max(log_floor * kLog2E, static_cast<double>(2 - Bits<T>::bias)));
  }

  // Passes 1-3; returns the loss. With g0 (K pointers to (N, C), or nullptr) also writes the
  // row-local part of the gradient on the loss rows, for finish().
  double forward(T* const* g0) {
    const int64_t k = p_.k, n = p_.n, c = p_.c, kc = k * c;
    const int t = threads(n);

    // Pass 1: maxima, and whether each view is finite.
    std::vector<T> cmax(static_cast<size_t>(t) * kc, std::numeric_limits<T>::lowest());
    std::vector<T> nonfinite(static_cast<size_t>(t) * k, T(0));
    parallel(t, n, [&](int id, int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row)
        for (int64_t v = 0; v < k; ++v)
          st_[lay_.row_max + v * n + row] =
              max_row(c, x_[v] + row * c, cmax.data() + id * kc + v * c, nonfinite[id * k + v]);
    }, pool_);
    for (int64_t i = 0; i < kc; ++i) {
      T m = cmax[i];
      for (int j = 1; j < t; ++j) m = std::max(m, cmax[j * kc + i]);
      st_[lay_.col_max + i] = m;
    }
    bool finite = true;
    for (int64_t v = 0; v < k; ++v) {
      T z = 0;
      for (int j = 0; j < t; ++j) z += nonfinite[j * k + v];
      finite = finite && z == T(0);
      st_[lay_.finite + v] = z == T(0) ? T(0) : T(1);
    }
    if (!finite) return not_finite(g0);

    // Pass 2: row softmax normalisers, Q, column sums of the column softmax's exp.
    std::vector<ColumnSums<T>> sums(t, ColumnSums<T>(2, kc));  // column sums of exp, Q
    parallel(t, n, [&](int id, int64_t b, int64_t e) {
      std::vector<T> buf(static_cast<size_t>(c));
      ColumnSums<T>& own = sums[id];
      for (int64_t row = b; row < e; ++row) {
        for (int64_t v = 0; v < k; ++v) {
          const int64_t at = (v * n + row) * c;
          st_[lay_.row_sum + v * n + row] =
              sums_row(c, x_[v] + row * c, st_[lay_.row_max + v * n + row], st_ + lay_.col_max + v * c, k_,
                       cache_ != nullptr ? cache_ + at : buf.data(), cache_ != nullptr ? cache_ + kc * n + at : nullptr,
                       own[0] + v * c, own[1] + v * c);
        }
        own.row_done();
      }
      own.flush();
    }, pool_);
    ColumnSums<T>::reduce(sums, 0, st_ + lay_.col_sum);
    ColumnSums<T>::reduce(sums, 1, st_ + lay_.q);

    // Pass 3: loss rows: dots (the loss), then the column sums of U and pi B.
    const Derived d = derived(false);
    const int64_t nl = p_.r1 - p_.r0;
    const int tl = threads(nl);
    std::vector<ColumnSums<T>> uv(tl, ColumnSums<T>(2, kc));  // column sums of U, pi B
    std::vector<double> loss(tl, 0.0);
    const T alpha = static_cast<T>(p_.inv_tr / p_.inv_tc);
    parallel(tl, nl, [&](int id, int64_t b, int64_t e) {
      Row buf(k, c);
      ColumnSums<T>& own = uv[id];
      for (int64_t row = p_.r0 + b; row < p_.r0 + e; ++row) {
        loss_row(row, d, buf);
        for (int64_t v = 0; v < k; ++v) {
          const int64_t o = v * c;
          loss[id] += buf.dots[v];
          st_[lay_.row_b + v * n + row] =
              backward_sums_row(c, &buf.p[o], buf.ts[v], buf.a_ptr[v], buf.r[v], &buf.pi[o], buf.b_ptr[v],
                                buf.bs[v], alpha, own[0] + o, own[1] + o, g0 != nullptr ? g0[v] + row * c : nullptr);
        }
        own.row_done();
      }
      own.flush();
    }, pool_);
    ColumnSums<T>::reduce(uv, 0, st_ + lay_.col_u);
    ColumnSums<T>::reduce(uv, 1, st_ + lay_.col_v);
    double total = 0.0;
    for (double l : loss) total += l;
    return -total / (static_cast<double>(p_.npairs) * static_cast<double>(nl));
  }

  // Pass 4: out[v] = scale (d_col + (tau_col/tau_row) d_row), scale = -g / (P n tau_col), from the
  // statistics and forward(g0)'s g0 (out may be g0: each row is read before it is written).
  void finish(double scale, const T* const* g0, T* const* out) {
    const int64_t k = p_.k, n = p_.n, c = p_.c;
    const T alpha = static_cast<T>(p_.inv_tr / p_.inv_tc), sc = static_cast<T>(scale);
    const Derived d = derived(true);
    parallel(threads(n), n, [&](int, int64_t b, int64_t e) {
      std::vector<T> row_exps(cache_ != nullptr ? 0 : static_cast<size_t>(c));
      for (int64_t row = b; row < e; ++row) {
        const bool in_loss = row >= p_.r0 && row < p_.r1;
        for (int64_t v = 0; v < k; ++v) {
          const int64_t o = v * c;
          const T inv_rs = T(1) / st_[lay_.row_sum + v * n + row];
          const T* g = in_loss ? g0[v] + row * c : nullptr;
          const T sb = in_loss ? st_[lay_.row_b + v * n + row] : T(0);
          if (cache_ != nullptr)
            finish_row<true>(c, exps<true>(v, row), k_, inv_rs, g, sb, &d.pcu[o], &d.cq[o], alpha, sc, static_cast<T*>(nullptr),
                             out[v] + row * c);
          else
            finish_row<false>(c, exps<false>(v, row), k_, inv_rs, g, sb, &d.pcu[o], &d.cq[o], alpha, sc,
                              row_exps.data(), out[v] + row * c);
        }
      }
    }, pool_);
  }

 private:
  // (K, C) quantities derived from the column statistics, shared by the threads of a pass.
  struct Derived {
    std::vector<T> inv_cs, wq, cq, pcu;  // 1/col_sum; (N/C)/max(Q, eps); [Q > eps] col_v / Q; col_u/col_sum
  };

  // One row's buffers: p, LP, pi, and A, B where they are sums of several views: (K, C) each.
  // Per view: S, ts = 1/max(S, eps) (T = ts p), dots, r = [S > eps] dots; A_v at a_ptr[v] and
  // B_v = bs[v] * (the row at b_ptr[v]), pointing into lp and p where a view has one partner.
  struct Row {
    std::vector<T> p, lp, pi, a, b, s, ts, dots, r, bs;
    std::vector<const T*> a_ptr, b_ptr;
    Row(int64_t k, int64_t c)
        : p(k * c), lp(k * c), pi(k * c), a(k * c), b(k * c), s(k), ts(k), dots(k), r(k), bs(k),
          a_ptr(k), b_ptr(k) {}
  };

  Derived derived(bool backward) const {
    const int64_t kc = p_.k * p_.c;
    Derived d{std::vector<T>(kc), std::vector<T>(kc), std::vector<T>(backward ? kc : 0),
              std::vector<T>(backward ? kc : 0)};
    for (int64_t i = 0; i < kc; ++i) {
      const T q = st_[lay_.q + i];
      d.inv_cs[i] = T(1) / st_[lay_.col_sum + i];
      d.wq[i] = k_.ratio / std::max(q, k_.eps);
      if (backward) {
        d.cq[i] = q > k_.eps ? st_[lay_.col_v + i] / q : T(0);
        d.pcu[i] = st_[lay_.col_u + i] * d.inv_cs[i];
      }
    }
    return d;
  }

  // Non-finite logits: every statistic (so every gradient from finish()) and g0 NaN; the loss NaN.
  double not_finite(T* const* g0) {
    std::fill(st_, st_ + lay_.finite, std::numeric_limits<T>::quiet_NaN());
    if (g0 != nullptr)
      for (int64_t v = 0; v < p_.k; ++v) std::fill(g0[v], g0[v] + p_.n * p_.c, std::numeric_limits<T>::quiet_NaN());
    return std::numeric_limits<double>::quiet_NaN();
  }

  // Threads for a pass over `rows` rows: at least kMinWork elements each, because starting and
  // joining a thread costs ~50-75 us here (128 x 100 logits: 0.28 ms on one thread, 0.58 on two).
  int threads(int64_t rows) const {
    constexpr int64_t kMinWork = 1 << 16;
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p_.threads, rows * p_.c * p_.k / kMinWork)));
  }

  template <bool Cached>
  RowExps<T> exps(int64_t v, int64_t row) const {
    const int64_t at = (v * p_.n + row) * p_.c, kcn = p_.k * p_.c * p_.n;
    return {x_[v] + row * p_.c, Cached ? cache_ + at : nullptr, Cached ? cache_ + kcn + at : nullptr,
            st_[lay_.row_max + v * p_.n + row], st_ + lay_.col_max + v * p_.c};
  }

  // One loss row: p, LP, pi and S of every view, then A_v = sum_{(v, j)} LP_j,
  // B_v = sum_{(i, v)} T_i, dots_v = sum_y T_v A_v and r_v = [S_v > eps] dots_v.
  void loss_row(int64_t row, const Derived& d, Row& buf) const {
    const int64_t k = p_.k, n = p_.n, c = p_.c;
    for (int64_t v = 0; v < k; ++v) {
      const int64_t o = v * c;
      const T inv_rs = T(1) / st_[lay_.row_sum + v * n + row];
      buf.s[v] = cache_ != nullptr ? loss_quantities_row<true>(c, exps<true>(v, row), &d.inv_cs[o], inv_rs, &d.wq[o], k_,
                                                         &buf.p[o], &buf.lp[o], &buf.pi[o])
                                   : loss_quantities_row<false>(c, exps<false>(v, row), &d.inv_cs[o], inv_rs, &d.wq[o], k_,
                                                         &buf.p[o], &buf.lp[o], &buf.pi[o]);
      buf.ts[v] = T(1) / std::max(buf.s[v], k_.eps);
    }
    for (int64_t v = 0; v < k; ++v) {
      const int64_t o = v * c;
      const std::vector<int64_t>& preds = to_pred_[v];
      if (preds.size() == 1) {
        buf.a_ptr[v] = &buf.lp[preds[0] * c];
      } else {
        std::fill(&buf.a[o], &buf.a[o] + c, T(0));
        for (int64_t j : preds) add_row(c, T(1), &buf.lp[j * c], &buf.a[o]);
        buf.a_ptr[v] = &buf.a[o];
      }
      buf.dots[v] = buf.ts[v] * dot_row(c, &buf.p[o], buf.a_ptr[v]);
      buf.r[v] = buf.s[v] > k_.eps ? buf.dots[v] : T(0);
      const std::vector<int64_t>& targets = to_target_[v];
      if (targets.size() == 1) {
        buf.b_ptr[v] = &buf.p[targets[0] * c];
        buf.bs[v] = buf.ts[targets[0]];
      } else {
        std::fill(&buf.b[o], &buf.b[o] + c, T(0));
        for (int64_t i : targets) add_row(c, buf.ts[i], &buf.p[i * c], &buf.b[o]);
        buf.b_ptr[v] = &buf.b[o];
        buf.bs[v] = T(1);
      }
    }
  }

  const T* const* x_;
  Params p_;
  Layout lay_;
  T* st_;
  T* cache_;
  const TaskPool* pool_;  // the caller's thread pool, or nullptr
  Consts<T> k_;
  std::vector<std::vector<int64_t>> to_pred_, to_target_;  // per view: its pairs' prediction / target views
};

}  // namespace

extern "C" {

// Run the parallel passes on an OpenMP runtime's pool: the addresses of its GOMP_parallel,
// omp_get_thread_num and omp_get_num_threads (null: start std::threads).
void sc_use_openmp(void* parallel, void* thread_num, void* num_threads) {
  openmp.parallel = reinterpret_cast<void (*)(void (*)(void*), void*, unsigned, unsigned)>(parallel);
  openmp.thread_num = reinterpret_cast<int (*)()>(thread_num);
  openmp.num_threads = reinterpret_cast<int (*)()>(num_threads);
}

// Length of the stats buffer for k views of shape (n, c).
int64_t sc_stats_size(int64_t k, int64_t n, int64_t c) { return Layout(k, n, c).size; }

// sc_forward: the loss (passes 1-3); g0: K pointers to (N, C) buffers for the gradient's
// row-local part, or nullptr (no gradient needed); cache: 2 K N C values kept for sc_finish,
// or nullptr (recompute). sc_finish: the gradient into out (which may be g0) from the
// statistics, g0 and the same cache; it reads the statistics only (an input under XLA).
#define SC_DEFINE(SUFFIX, T)                                                                      \
  double sc_forward_##SUFFIX(const T* const* views, const Params* p, T* stats, T* const* g0,      \
                             T* cache) {                                                          \
    return Kernel<T>(views, *p, stats, cache).forward(g0);                                        \
  }                                                                                               \
  void sc_finish_##SUFFIX(const T* const* views, const Params* p, const T* stats, double scale,    \
                          const T* const* g0, T* const* out, const T* cache) {                    \
    Kernel<T>(views, *p, const_cast<T*>(stats), const_cast<T*>(cache)).finish(scale, g0, out);    \
  }

SC_DEFINE(f32, float)
SC_DEFINE(f64, double)

}  // extern "C"
