// Runs an emulated op under every schedule (simt::Schedule) and requires bit-identical outputs: a
// missing __syncthreads, a race on shared memory or an assumption about the order of blocks then
// shows up as a difference instead of passing by luck under one order.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>
#include <type_traits>
#include <tuple>
#include <utility>

#include "simt.h"

namespace ltfast {
namespace simt {

namespace detail {

// Bitwise equality, NaN payloads included.
inline void check_identical(const at::Tensor& first, const at::Tensor& again, int output, Schedule schedule,
                            const std::string& kernels) {
  if (!first.defined() && !again.defined()) return;
  auto fail = [&](const std::string& what) {
    std::ostringstream out;
    out << "ltfast.simt: output " << output << " differs between the schedules '"
        << schedule_name(Schedule::kAscending) << "' and '" << schedule_name(schedule) << "' (kernels: " << kernels
        << "): " << what << ". A GPU would give run-to-run different results: look for a missing __syncthreads, a "
        << "race on shared or global memory, or an assumption about the order of blocks.";
    throw Error(out.str());
  };
  if (first.defined() != again.defined() || first.sizes() != again.sizes() ||
      first.scalar_type() != again.scalar_type()) {
    fail("shape or dtype differs");
  }
  const at::Tensor a = first.contiguous().reshape({-1}).view(at::kByte);
  const at::Tensor b = again.contiguous().reshape({-1}).view(at::kByte);
  if (at::equal(a, b)) return;
  const int64_t byte = at::nonzero(a != b).flatten()[0].item<int64_t>();
  const int64_t element = byte / static_cast<int64_t>(first.element_size());
  std::ostringstream what;
  what << "first difference at flat element " << element << ": "
       << first.contiguous().reshape({-1})[element].item().toDouble() << " vs "
       << again.contiguous().reshape({-1})[element].item().toDouble();
  fail(what.str());
}

template <typename... Ts, std::size_t... I>
void check_identical(const std::tuple<Ts...>& first, const std::tuple<Ts...>& again, Schedule schedule,
                     const std::string& kernels, std::index_sequence<I...>) {
  (check_identical(std::get<I>(first), std::get<I>(again), static_cast<int>(I), schedule, kernels), ...);
}

inline void check_outputs(const at::Tensor& first, const at::Tensor& again, Schedule schedule,
                          const std::string& kernels) {
  check_identical(first, again, 0, schedule, kernels);
}

template <typename... Ts>
void check_outputs(const std::tuple<Ts...>& first, const std::tuple<Ts...>& again, Schedule schedule,
                   const std::string& kernels) {
  check_identical(first, again, schedule, kernels, std::index_sequence_for<Ts...>{});
}

}  // namespace detail

template <auto function>
struct Scheduled;

template <typename Result, typename... Args, Result (*function)(Args...)>
struct Scheduled<function> {
  static Result call(Args... args) {
    if constexpr (std::is_void_v<Result>) {
      return call_in_place(args...);
    } else {
      return call_with_result(args...);
    }
  }

 private:
  static Result call_with_result(Args... args) {
    take_launched_kernel_names();
    Result first = [&] {
      ScheduleGuard guard(Schedule::kAscending);
      return function(args...);
    }();
    const std::string kernels = take_launched_kernel_names();
    for (int s = 1; s < kNumSchedules; ++s) {
      const auto schedule = static_cast<Schedule>(s);
      ScheduleGuard guard(schedule);
      const Result again = function(args...);
      detail::check_outputs(first, again, schedule, kernels.empty() ? "none" : kernels);
    }
    return first;
  }

  // An in-place op (its first argument is mutated, nothing returned: ltfast::_scale_forward_grad_): the
  // first schedule works on the caller's tensor, each other schedule on a copy of its original value,
  // and the results must agree bit for bit.
  template <typename... Rest>
  static void call_in_place(at::Tensor& out, Rest... rest) {
    const at::Tensor original = out.clone();
    take_launched_kernel_names();
    {
      ScheduleGuard guard(Schedule::kAscending);
      function(out, rest...);
    }
    const std::string kernels = take_launched_kernel_names();
    for (int s = 1; s < kNumSchedules; ++s) {
      const auto schedule = static_cast<Schedule>(s);
      ScheduleGuard guard(schedule);
      at::Tensor again = original.clone();
      function(again, rest...);
      detail::check_outputs(out, again, schedule, kernels.empty() ? "none" : kernels);
    }
  }
};


}  // namespace simt
}  // namespace ltfast
