// Declarations shared by the CPU and CUDA kernels of moe_lora::align_block_size and the
// registration file. The algorithm is described at the top of align_block_size_cuda.cu.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace moe_lora {

// (sorted_pair_ids, expert_of_block, num_blocks), all int32.
using AlignBlockSizeOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Sizes every backend derives from its arguments alone (never from the values of topk_ids).
struct AlignBlockSizeShape {
  int64_t num_pairs;         // N = T * K
  int64_t top_k;             // K
  int64_t slots_per_expert;  // L + 1: the adapter slots, then slot -1
  int64_t max_blocks;        // static upper bound on the number of blocks
};

// Checks shapes, dtypes, devices and integer arguments (TORCH_CHECK) and returns the sizes.
// Does not read tensor values: the range of token_lora is each kernel's job.
AlignBlockSizeShape check_align_block_size_args(
    const at::Tensor& topk_ids,
    const std::optional<at::Tensor>& token_lora,
    int64_t num_experts,
    int64_t max_loras,
    int64_t block_size);

// Allocates the three int32 outputs at their static sizes on topk_ids' device (uninitialised).
AlignBlockSizeOutputs empty_align_block_size_outputs(
    const at::Tensor& topk_ids,
    const AlignBlockSizeShape& shape,
    int64_t block_size);

// Calls fn with a value of the C++ type of an int32 or int64 index tensor.
template <typename Fn>
void dispatch_index_type(at::ScalarType type, Fn&& fn) {
  if (type == at::kInt) {
    fn(int32_t{});
  } else {
    fn(int64_t{});
  }
}

AlignBlockSizeOutputs align_block_size_cpu(
    const at::Tensor& topk_ids,
    const std::optional<at::Tensor>& token_lora,
    int64_t num_experts,
    int64_t max_loras,
    int64_t block_size);

AlignBlockSizeOutputs align_block_size_cuda(
    const at::Tensor& topk_ids,
    const std::optional<at::Tensor>& token_lora,
    int64_t num_experts,
    int64_t max_loras,
    int64_t block_size);

}  // namespace moe_lora
