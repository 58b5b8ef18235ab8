// The fused_vae ops: their schemas and one autograd kernel for every forward op (all devices).
//
// The schemas come from fused_vae/schemas.h (fused_vae/backends/protocol.py derives the same
// strings; a test compares them) and docs/design.md section 8 is the protocol. Device
// implementations live in cpu/ and cuda/; fake (meta) impls and the backward ops'
// derivatives are registered by fused_vae/backends/registration.py.
//
// Autograd, written once for every op family: the kernel saves the forward op's tensor
// arguments (the inputs and the seed; the noise is regenerated, never saved) and its other
// arguments, and backward calls the paired <name>_bwd op with the output gradients (absent
// or empty ones as None) and the same arguments; it returns a gradient per differentiable
// input, which is every tensor argument before the first non-differentiable one (the
// backward op's return count). When the backward itself is being recorded
// (create_graph=True) the backward op is called through autograd, which gives it its own
// derivative; otherwise below autograd, so a training step runs no Python between the
// user's code and the kernels.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "fused_vae/schemas.h"

TORCH_LIBRARY(fused_vae, m) {
#define FV_DEFINE_OP(name, fwd_schema, bwd_schema) \
  m.def(#name "_fwd" fwd_schema);                  \
  m.def(#name "_bwd" bwd_schema);
  FV_FOR_EACH_OP(FV_DEFINE_OP)
#undef FV_DEFINE_OP
}

namespace fused_vae {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A forward op, its backward op and how many differentiable inputs lead its arguments.
struct OpPair {
  c10::OperatorHandle fwd;
  c10::OperatorHandle bwd;
  size_t num_inputs;
};

const OpPair& op_pair(const c10::OperatorHandle& fwd) {
  static std::mutex mutex;
  static std::unordered_map<std::string, OpPair> pairs;
  const std::string& name = fwd.schema().name();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = pairs.find(name);
  if (it == pairs.end()) {
    const std::string bwd_name = name.substr(0, name.size() - 4) + "_bwd";  // "..._fwd" -> "..._bwd"
    auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow(bwd_name.c_str(), "");
    it = pairs.emplace(name, OpPair{fwd, bwd, bwd.schema().returns().size()}).first;
  }
  return it->second;
}

// The forward op's whole argument list; the differentiable inputs that were given are
// passed to apply() separately, as autograd's inputs.
struct OpCall {
  const OpPair* pair;
  std::vector<c10::IValue> args;
};

class FusedOp : public torch::autograd::Function<FusedOp> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList /*given inputs*/, const OpCall& call) {
    torch::jit::Stack stack(call.args);
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      call.pair->fwd.callBoxed(stack);
    }
    // Tensor arguments are saved (version-checked); the rest stay as values, with None
    // marking where a saved tensor goes back.
    std::vector<at::Tensor> tensors;
    c10::impl::GenericList rest(c10::AnyType::get());
    c10::List<bool> is_tensor;
    for (const c10::IValue& a : call.args) {
      is_tensor.push_back(a.isTensor());
      if (a.isTensor()) {
        tensors.push_back(a.toTensor());
        rest.push_back(c10::IValue());
      } else {
        rest.push_back(a);
      }
    }
    ctx->save_for_backward(tensors);
    ctx->saved_data["rest"] = rest;
    ctx->saved_data["is_tensor"] = is_tensor;
    ctx->saved_data["pair"] = reinterpret_cast<int64_t>(call.pair);  // op_pair's entries never move
    ctx->set_materialize_grads(false);
    variable_list outs;
    outs.reserve(stack.size());
    for (c10::IValue& v : stack) outs.push_back(std::move(v).toTensor());
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto* pair = reinterpret_cast<const OpPair*>(ctx->saved_data["pair"].toInt());
    const auto saved = ctx->get_saved_variables();
    const auto rest = ctx->saved_data["rest"].toList();
    const auto is_tensor = ctx->saved_data["is_tensor"].toBoolList();
    torch::jit::Stack stack;
    bool any = false;
    for (const at::Tensor& g : grads) {  // an output without elements contributes nothing
      const bool used = g.defined() && g.sym_numel() != 0;
      any = any || used;
      stack.emplace_back(used ? c10::IValue(g) : c10::IValue());
    }
    std::vector<bool> given;  // which differentiable inputs were given
    size_t k = 0;
    for (size_t i = 0; i < rest.size(); ++i) {
      if (i < pair->num_inputs) given.push_back(is_tensor[i]);
      stack.emplace_back(is_tensor[i] ? c10::IValue(saved[k++]) : c10::IValue(rest.get(i)));
    }
    const size_t num_given = std::count(given.begin(), given.end(), true);
    variable_list out(num_given + 1);  // the given inputs, then the OpCall argument
    if (!any) return out;
    if (at::GradMode::is_enabled()) {  // create_graph=True: record the backward op too
      pair->bwd.callBoxed(stack);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      pair->bwd.callBoxed(stack);
    }
    for (size_t i = 0, j = 0; i < pair->num_inputs; ++i) {
      if (given[i]) out[j++] = stack[i].toTensor();
    }
    return out;
  }
};

// The Autograd kernel of every forward op, boxed: one definition for any argument list.
void fused_autograd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const OpPair& pair = op_pair(op);
  OpCall call{&pair, torch::jit::pop(*stack, op.schema().arguments().size())};
  std::vector<at::Tensor> given;
  for (size_t i = 0; i < pair.num_inputs; ++i) {
    if (call.args[i].isTensor()) given.push_back(call.args[i].toTensor());
  }
  for (at::Tensor& out : FusedOp::apply(at::TensorList(given), call)) stack->emplace_back(std::move(out));
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_vae, Autograd, m) {
#define FV_AUTOGRAD_OP(name, fwd_schema, bwd_schema) \
  m.impl(#name "_fwd", torch::CppFunction::makeFromBoxedFunction<&fused_autograd>());
  FV_FOR_EACH_OP(FV_AUTOGRAD_OP)
#undef FV_AUTOGRAD_OP
}

}  // namespace fused_vae
