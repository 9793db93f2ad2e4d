// XLA FFI handlers of the fused Self-Classifier kernel, for the JAX adapter on the CPU.
//
// Built on first use by adapters/_native.py against the XLA FFI headers that jaxlib ships
// (jax.ffi.include_dir()) and registered as the custom-call targets
// "clusterlearn_sc_forward" and "clusterlearn_sc_backward":
//
//   forward   args: K views (N, C)            results: loss (), stats (sc_stats_size)
//   backward  args: K views, stats, g ()      results: K gradients (N, C)
//
// with the kernel's Params as attributes (backward adds `scale`: the gradient is
// g * scale * (d_col + alpha d_row)). The views' dtype (float32 or float64) picks the kernel.

#include "_self_classifier_kernel.cpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <class T>
ffi::Error forward(ffi::RemainingArgs args, ffi::AnyBuffer loss, ffi::AnyBuffer stats, const Params& p) {
  std::vector<const T*> views(p.k);
  for (int64_t v = 0; v < p.k; ++v) {
    auto x = args.get<ffi::AnyBuffer>(v);
    if (x.has_error()) return x.error();
    views[v] = static_cast<const T*>(x->untyped_data());
  }
  const double value = Kernel<T>(views.data(), p, static_cast<T*>(stats.untyped_data())).forward();
  *static_cast<T*>(loss.untyped_data()) = static_cast<T>(value);
  return ffi::Error::Success();
}

template <class T>
ffi::Error backward(ffi::RemainingArgs args, ffi::RemainingRets rets, const Params& p, double scale) {
  std::vector<const T*> views(p.k);
  std::vector<T*> grads(p.k);
  for (int64_t v = 0; v < p.k; ++v) {
    auto x = args.get<ffi::AnyBuffer>(v);
    auto g = rets.get<ffi::AnyBuffer>(v);
    if (x.has_error()) return x.error();
    if (g.has_error()) return g.error();
    views[v] = static_cast<const T*>(x->untyped_data());
    grads[v] = static_cast<T*>((*g)->untyped_data());
  }
  auto stats = args.get<ffi::AnyBuffer>(p.k);
  auto cotangent = args.get<ffi::AnyBuffer>(p.k + 1);
  if (stats.has_error()) return stats.error();
  if (cotangent.has_error()) return cotangent.error();
  const double g = static_cast<double>(*static_cast<const T*>(cotangent->untyped_data()));
  Kernel<T>(views.data(), p, static_cast<T*>(stats->untyped_data())).backward(g * scale, grads.data());
  return ffi::Error::Success();
}

Params params(int64_t k, int64_t n, int64_t c, int64_t r0, int64_t r1, ffi::Span<const int64_t> pairs,
              double inv_tc, double inv_tr, double log_floor_t, double log_floor_p, double eps, int64_t threads) {
  return Params{k, n, c, r0, r1, pairs.begin(), static_cast<int64_t>(pairs.size() / 2), inv_tc, inv_tr,
                log_floor_t, log_floor_p, eps, static_cast<int>(threads)};
}

ffi::Error forward_impl(ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> stats,
                        int64_t k, int64_t n, int64_t c, int64_t r0, int64_t r1, ffi::Span<const int64_t> pairs,
                        double inv_tc, double inv_tr, double log_floor_t, double log_floor_p, double eps,
                        int64_t threads) {
  const Params p = params(k, n, c, r0, r1, pairs, inv_tc, inv_tr, log_floor_t, log_floor_p, eps, threads);
  switch (loss->element_type()) {
    case ffi::DataType::F32:
      return forward<float>(args, *loss, *stats, p);
    case ffi::DataType::F64:
      return forward<double>(args, *loss, *stats, p);
    default:
      return ffi::Error::InvalidArgument("clusterlearn_sc_forward: float32 or float64 logits expected");
  }
}

ffi::Error backward_impl(ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t k, int64_t n, int64_t c,
                         int64_t r0, int64_t r1, ffi::Span<const int64_t> pairs, double inv_tc, double inv_tr,
                         double log_floor_t, double log_floor_p, double eps, int64_t threads, double scale) {
  const Params p = params(k, n, c, r0, r1, pairs, inv_tc, inv_tr, log_floor_t, log_floor_p, eps, threads);
  auto first = args.get<ffi::AnyBuffer>(0);
  if (first.has_error()) return first.error();
  switch (first->element_type()) {
    case ffi::DataType::F32:
      return backward<float>(args, rets, p, scale);
    case ffi::DataType::F64:
      return backward<double>(args, rets, p, scale);
    default:
      return ffi::Error::InvalidArgument("clusterlearn_sc_backward: float32 or float64 logits expected");
  }
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
                              ffi::Ffi::Bind().RemainingArgs().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                                  SC_PARAM_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(clusterlearn_sc_backward, backward_impl,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets() SC_PARAM_ATTRS.Attr<double>("scale"));
