// XLA FFI handlers of the fused Self-Classifier kernel, for the JAX adapter on the CPU.
//
// Built on first use by adapters/_native.py against the XLA FFI headers that jaxlib ships
// (jax.ffi.include_dir()) and registered as these custom-call targets:
//
//   clusterlearn_sc_forward   args: K views (N, C)                 results: loss (), stats
//                             (the loss alone: the kernel's forward without g0)
//   clusterlearn_sc_vjp_fwd   args: K views                        results: loss, stats, K g0[, cache]
//   clusterlearn_sc_vjp_bwd   args: K views, stats, K g0, g ()[, cache]   results: K gradients
//                             (the adapter aliases each g0 with its gradient)
//
// with the kernel's Params as attributes, and `cache` (1: the exponentials' cache of 2 K N C
// values is the last result of vjp_fwd and the last argument of vjp_bwd); vjp_bwd adds
// `scale` (the gradient is g * scale * (d_col + alpha d_row)). The views' dtype (float32 or
// float64) picks the kernel. The passes run on XLA's intra-op thread pool.

#include "_self_classifier_kernel.cpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The kernel's TaskPool on XLA's intra-op thread pool.
TaskPool on(ffi::ThreadPool& pool) {
  return {[](void* context, void (*task)(void*), void* data) {
            static_cast<ffi::ThreadPool*>(context)->Schedule([task, data] { task(data); });
          },
          &pool};
}

template <class T>
std::vector<const T*> inputs(const ffi::RemainingArgs& args, int64_t first, int64_t count, ffi::Error& error) {
  std::vector<const T*> out(count);
  for (int64_t i = 0; i < count; ++i) {
    auto x = args.get<ffi::AnyBuffer>(first + i);
    if (x.has_error()) {
      error = x.error();
      return {};
    }
    out[i] = static_cast<const T*>(x->untyped_data());
  }
  return out;
}

template <class T>
std::vector<T*> outputs(const ffi::RemainingRets& rets, int64_t first, int64_t count, ffi::Error& error) {
  std::vector<T*> out(count);
  for (int64_t i = 0; i < count; ++i) {
    auto x = rets.get<ffi::AnyBuffer>(first + i);
    if (x.has_error()) {
      error = x.error();
      return {};
    }
    out[i] = static_cast<T*>((*x)->untyped_data());
  }
  return out;
}

// Forward; with_g0: results 2 .. K+1 receive the gradient's row-local part, and (cached) the
// next one the exponentials' cache.
template <class T>
ffi::Error forward(const ffi::RemainingArgs& args, const ffi::RemainingRets& rets, const Params& p, bool with_g0,
                   bool cached, const TaskPool& pool) {
  ffi::Error error = ffi::Error::Success();
  std::vector<const T*> views = inputs<T>(args, 0, p.k, error);
  std::vector<T*> head = outputs<T>(rets, 0, 2, error);  // loss, stats
  std::vector<T*> g0 = with_g0 ? outputs<T>(rets, 2, p.k, error) : std::vector<T*>();
  std::vector<T*> cache = cached ? outputs<T>(rets, 2 + (with_g0 ? p.k : 0), 1, error) : std::vector<T*>{nullptr};
  if (error.failure()) return error;
  *head[0] = static_cast<T>(Kernel<T>(views.data(), p, head[1], cache[0], &pool).forward(with_g0 ? g0.data() : nullptr));
  return error;
}

template <class T>
ffi::Error finish(const ffi::RemainingArgs& args, const ffi::RemainingRets& rets, const Params& p, double scale,
                  bool cached, const TaskPool& pool) {
  ffi::Error error = ffi::Error::Success();
  std::vector<const T*> views = inputs<T>(args, 0, p.k, error);
  std::vector<const T*> stats = inputs<T>(args, p.k, 1, error);
  std::vector<const T*> g0 = inputs<T>(args, p.k + 1, p.k, error);
  std::vector<const T*> g = inputs<T>(args, 2 * p.k + 1, 1, error);
  std::vector<const T*> cache = cached ? inputs<T>(args, 2 * p.k + 2, 1, error) : std::vector<const T*>{nullptr};
  std::vector<T*> out = outputs<T>(rets, 0, p.k, error);
  if (error.failure()) return error;
  Kernel<T>(views.data(), p, const_cast<T*>(stats[0]), const_cast<T*>(cache[0]), &pool)
      .finish(static_cast<double>(*g[0]) * scale, g0.data(), out.data());
  return error;
}

ffi::DataType dtype_of(const ffi::RemainingArgs& args) {
  auto first = args.get<ffi::AnyBuffer>(0);
  return first.has_error() ? ffi::DataType::INVALID : first->element_type();
}

Params params(int64_t k, int64_t n, int64_t c, int64_t r0, int64_t r1, ffi::Span<const int64_t> pairs,
              double inv_tc, double inv_tr, double log_floor_t, double log_floor_p, double eps, int64_t threads) {
  return Params{k, n, c, r0, r1, pairs.begin(), static_cast<int64_t>(pairs.size() / 2), inv_tc, inv_tr,
                log_floor_t, log_floor_p, eps, static_cast<int>(threads)};
}

#define SC_PARAM_ARGS                                                                                \
  int64_t k, int64_t n, int64_t c, int64_t r0, int64_t r1, ffi::Span<const int64_t> pairs, double inv_tc,  \
      double inv_tr, double log_floor_t, double log_floor_p, double eps, int64_t threads
#define SC_PARAMS params(k, n, c, r0, r1, pairs, inv_tc, inv_tr, log_floor_t, log_floor_p, eps, threads)
#define SC_DISPATCH(NAME, CALL)                                                   \
  switch (dtype_of(args)) {                                                       \
    case ffi::DataType::F32:                                                      \
      return CALL(float);                                                         \
    case ffi::DataType::F64:                                                      \
      return CALL(double);                                                        \
    default:                                                                      \
      return ffi::Error::InvalidArgument(NAME ": float32 or float64 logits expected"); \
  }

ffi::Error forward_impl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets, SC_PARAM_ARGS,
                        int64_t cache) {
#define SC_CALL(T) forward<T>(args, rets, SC_PARAMS, false, cache != 0, on(pool))
  SC_DISPATCH("clusterlearn_sc_forward", SC_CALL)
#undef SC_CALL
}

ffi::Error vjp_fwd_impl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets, SC_PARAM_ARGS,
                        int64_t cache) {
#define SC_CALL(T) forward<T>(args, rets, SC_PARAMS, true, cache != 0, on(pool))
  SC_DISPATCH("clusterlearn_sc_vjp_fwd", SC_CALL)
#undef SC_CALL
}

ffi::Error vjp_bwd_impl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets, SC_PARAM_ARGS,
                        int64_t cache, double scale) {
#define SC_CALL(T) finish<T>(args, rets, SC_PARAMS, scale, cache != 0, on(pool))
  SC_DISPATCH("clusterlearn_sc_vjp_bwd", SC_CALL)
#undef SC_CALL
}

}  // namespace

#define SC_PARAM_ATTRS                                                                               \
  .Attr<int64_t>("k").Attr<int64_t>("n").Attr<int64_t>("c").Attr<int64_t>("r0").Attr<int64_t>("r1") \
      .Attr<ffi::Span<const int64_t>>("pairs")                                                      \
      .Attr<double>("inv_tc")                                                                       \
      .Attr<double>("inv_tr")                                                                       \
      .Attr<double>("log_floor_t")                                                                  \
      .Attr<double>("log_floor_p")                                                                  \
      .Attr<double>("eps")                                                                          \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(clusterlearn_sc_forward, forward_impl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().RemainingRets() SC_PARAM_ATTRS.Attr<int64_t>("cache"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(clusterlearn_sc_vjp_fwd, vjp_fwd_impl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().RemainingRets() SC_PARAM_ATTRS.Attr<int64_t>("cache"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(clusterlearn_sc_vjp_bwd, vjp_bwd_impl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().RemainingRets() SC_PARAM_ATTRS
                                  .Attr<int64_t>("cache")
                                  .Attr<double>("scale"));
