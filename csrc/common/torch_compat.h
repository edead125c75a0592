// The few places where ltfast's C++ depends on PyTorch internals that changed inside the supported
// range (torch 2.11 through 2.15, pyproject.toml): each is decided here, once, by what the headers
// declare rather than by a version number, so a release that moves back or renames a piece takes
// the safe branch instead of failing to compile.
//
// 1. Autograd Node ownership: torch <= 2.13 holds Nodes by std::shared_ptr, torch 2.14 by
//    c10::intrusive_ptr (autograd's Edge::function, set_history and collect_next_edges all use the
//    one type). NodePtr is read off Edge::function, and make_node builds the matching pointer.
// 2. The torch-function "skip next hop" flag (PythonTorchFunctionTLS::peek_skip_next, new in a
//    2.1x release): where the headers have it, the eager fast path (csrc/python_entry.cpp) declines
//    while it is set; where they do not, the flag does not exist and there is nothing to honour.
//    The Python side also checks at import, behaviourally, that the fast path declines under a
//    TorchFunctionMode and turns it off otherwise (ltfast/_extension.py, fast_entry_points).
#pragma once

#include <torch/csrc/autograd/edge.h>
#include <torch/csrc/autograd/function.h>

#include <memory>
#include <type_traits>
#include <utility>

namespace ltfast {
namespace torch_compat {

using NodePtr = decltype(torch::autograd::Edge::function);
inline constexpr bool kNodesAreSharedPtr = std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>;

template <typename NodeType, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (kNodesAreSharedPtr) {
    return std::make_shared<NodeType>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<NodeType>(std::forward<Args>(args)...);
  }
}

// True where the headers declare TLS::peek_skip_next() (detected, not version-checked).
template <typename TLS, typename = void>
struct has_peek_skip_next : std::false_type {};
template <typename TLS>
struct has_peek_skip_next<TLS, std::void_t<decltype(TLS::peek_skip_next())>> : std::true_type {};

// Whether the next has_torch_function check is to be skipped (false where torch has no such flag).
template <typename TLS>
bool torch_function_skip_next_pending() {
  if constexpr (has_peek_skip_next<TLS>::value) {
    return TLS::peek_skip_next();
  } else {
    return false;
  }
}

}  // namespace torch_compat
}  // namespace ltfast
