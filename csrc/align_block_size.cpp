// moe_lora::align_block_size on CPU, plus the argument checks every backend shares.
//
// A stable counting sort of the flattened (token, k) pairs by group key
// expert * slots_per_expert + slot', where slot' is the adapter slot, or max_loras for slot -1
// (kept last). Pairs keep their flattened order inside a group, so the output equals
// align_block_size_ref exactly. The layout of the outputs is described at the top of
// align_block_size_cuda.cu.
#include "align_block_size.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace moe_lora {

namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

bool is_index_dtype(at::ScalarType type) {
  return type == at::kInt || type == at::kLong;
}

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Validates every token_lora value: a slot outside [-1, max_loras) would index a missing adapter.
template <typename lora_t>
void check_token_lora_values(const lora_t* token_lora, int64_t num_tokens, int64_t max_loras) {
  for (int64_t token = 0; token < num_tokens; ++token) {
    const int64_t slot = token_lora[token];
    TORCH_CHECK(
        slot >= -1 && slot < max_loras,
        "align_block_size: token_lora[", token, "] = ", slot,
        " is outside [-1, max_loras) = [-1, ", max_loras, ")");
  }
}

template <typename id_t, typename lora_t>
void align_block_size_cpu_kernel(
    const id_t* topk_ids,
    const lora_t* token_lora,  // nullptr: every token has slot -1
    const AlignBlockSizeShape& shape,
    int64_t num_experts,
    int64_t max_loras,
    int64_t block_size,
    int32_t* sorted_pair_ids,
    int32_t* expert_of_block,
    int32_t* num_blocks) {
  const int64_t num_pairs = shape.num_pairs;
  const int64_t slots_per_expert = shape.slots_per_expert;
  // Group key of a pair, or -1 when the pair is dropped.
  auto key_of_pair = [&](int64_t pair) -> int64_t {
    const int64_t expert = topk_ids[pair];
    if (expert < 0 || expert >= num_experts) {
      return -1;
    }
    const int64_t slot = token_lora == nullptr ? -1 : static_cast<int64_t>(token_lora[pair / shape.top_k]);
    return expert * slots_per_expert + (slot >= 0 ? slot : max_loras);
  };

  std::vector<int64_t> group_offset(num_experts * slots_per_expert, 0);
  for (int64_t pair = 0; pair < num_pairs; ++pair) {
    const int64_t key = key_of_pair(pair);
    if (key >= 0) {
      ++group_offset[key];
    }
  }

  // Turn counts into start positions and write the expert of each block of an expert's padded segment.
  int64_t position = 0;
  int64_t block = 0;
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    const int64_t expert_start = position;
    for (int64_t slot = 0; slot < slots_per_expert; ++slot) {
      int64_t& offset = group_offset[expert * slots_per_expert + slot];
      const int64_t count = offset;
      offset = position;
      position += count;
    }
    const int64_t padded_size = round_up(position - expert_start, block_size);
    for (int64_t end = block + padded_size / block_size; block < end; ++block) {
      expert_of_block[block] = static_cast<int32_t>(expert);
    }
    position = expert_start + padded_size;
  }
  num_blocks[0] = static_cast<int32_t>(block);
  std::fill(expert_of_block + block, expert_of_block + shape.max_blocks, -1);
  std::fill(sorted_pair_ids, sorted_pair_ids + shape.max_blocks * block_size, static_cast<int32_t>(num_pairs));

  for (int64_t pair = 0; pair < num_pairs; ++pair) {
    const int64_t key = key_of_pair(pair);
    if (key >= 0) {
      sorted_pair_ids[group_offset[key]++] = static_cast<int32_t>(pair);
    }
  }
}

}  // namespace

AlignBlockSizeShape check_align_block_size_args(
    const at::Tensor& topk_ids,
    const std::optional<at::Tensor>& token_lora,
    int64_t num_experts,
    int64_t max_loras,
    int64_t block_size) {
  TORCH_CHECK(
      topk_ids.dim() == 2, "align_block_size: topk_ids must be 2-D [T, K], got ", topk_ids.dim(), "-D");
  TORCH_CHECK(topk_ids.size(1) >= 1, "align_block_size: topk_ids must have K >= 1 columns, got shape ",
              topk_ids.sizes());
  TORCH_CHECK(is_index_dtype(topk_ids.scalar_type()),
              "align_block_size: topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  if (token_lora.has_value()) {
    TORCH_CHECK(token_lora->dim() == 1 && token_lora->size(0) == topk_ids.size(0),
                "align_block_size: token_lora must have shape [T] = [", topk_ids.size(0), "], got ",
                token_lora->sizes());
    TORCH_CHECK(is_index_dtype(token_lora->scalar_type()),
                "align_block_size: token_lora must be int32 or int64, got ", token_lora->scalar_type());
    TORCH_CHECK(token_lora->device() == topk_ids.device(),
                "align_block_size: token_lora must be on topk_ids' device ", topk_ids.device(), ", got ",
                token_lora->device());
  }
  TORCH_CHECK(num_experts >= 1 && num_experts <= kInt32Max,
              "align_block_size: num_experts must be in [1, 2^31), got ", num_experts);
  TORCH_CHECK(max_loras >= 0 && max_loras < kInt32Max,
              "align_block_size: max_loras must be in [0, 2^31 - 1), got ", max_loras);
  TORCH_CHECK(block_size >= 1 && block_size <= kInt32Max,
              "align_block_size: block_size must be in [1, 2^31), got ", block_size);

  const int64_t slots_per_expert = max_loras + 1;
  TORCH_CHECK(num_experts * (slots_per_expert + 1) <= kInt32Max,
              "align_block_size: num_experts * (max_loras + 1) = ", num_experts * (max_loras + 1),
              " groups is too many for int32 counters");
  const int64_t num_pairs = topk_ids.numel();
  const int64_t max_blocks = (num_pairs + std::min(num_experts, num_pairs) * (block_size - 1)) / block_size;
  TORCH_CHECK(num_pairs <= kInt32Max && max_blocks * block_size <= kInt32Max,
              "align_block_size: ", num_pairs, " pairs with block_size ", block_size,
              " need more than 2^31 - 1 sorted_pair_ids entries, which int32 outputs cannot index");
  return AlignBlockSizeShape{num_pairs, topk_ids.size(1), slots_per_expert, max_blocks};
}

AlignBlockSizeOutputs empty_align_block_size_outputs(
    const at::Tensor& topk_ids,
    const AlignBlockSizeShape& shape,
    int64_t block_size) {
  const auto options = topk_ids.options().dtype(at::kInt);
  return {at::empty({shape.max_blocks * block_size}, options), at::empty({shape.max_blocks}, options),
          at::empty({1}, options)};
}

AlignBlockSizeOutputs align_block_size_cpu(
    const at::Tensor& topk_ids,
    const std::optional<at::Tensor>& token_lora,
    int64_t num_experts,
    int64_t max_loras,
    int64_t block_size) {
  const AlignBlockSizeShape shape =
      check_align_block_size_args(topk_ids, token_lora, num_experts, max_loras, block_size);
  const at::Tensor ids = topk_ids.contiguous();
  const at::Tensor slots = token_lora.has_value() ? token_lora->contiguous() : at::Tensor();
  auto outputs = empty_align_block_size_outputs(topk_ids, shape, block_size);
  auto& [sorted_pair_ids, expert_of_block, num_blocks] = outputs;

  const at::ScalarType lora_type = slots.defined() ? slots.scalar_type() : at::kInt;
  dispatch_index_type(ids.scalar_type(), [&](auto id_value) {
    using id_t = decltype(id_value);
    dispatch_index_type(lora_type, [&](auto lora_value) {
      using lora_t = decltype(lora_value);
      const lora_t* slot_data = slots.defined() ? slots.const_data_ptr<lora_t>() : nullptr;
      if (slot_data != nullptr) {
        check_token_lora_values(slot_data, slots.numel(), max_loras);
      }
      align_block_size_cpu_kernel<id_t, lora_t>(
          ids.const_data_ptr<id_t>(), slot_data, shape, num_experts, max_loras, block_size,
          sorted_pair_ids.mutable_data_ptr<int32_t>(), expert_of_block.mutable_data_ptr<int32_t>(),
          num_blocks.mutable_data_ptr<int32_t>());
    });
  });
  return outputs;
}

}  // namespace moe_lora
