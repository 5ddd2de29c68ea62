// moe_lora::align_block_size on CUDA.
//
// What the op computes (align_block_size_ref in torch_moe_lora/reference.py is the definition):
// the N = T * K flattened (token, k) pairs, pair = t * K + k, are grouped by expert and adapter
// slot, and every group is padded to a multiple of block_size so that each block of block_size
// entries belongs to one expert (and, with pad_per_adapter, one slot).
//   * Groups are visited expert by expert. A pair's group key is
//     expert * slots_per_expert + slot', where slot' is token_lora[t], or max_loras for slot -1.
//   * pad_per_adapter: slots_per_expert = L = max_loras. Each nonempty (expert, slot) group is
//     padded on its own; pairs with slot -1 are dropped; lora_of_block is the slot.
//   * otherwise: slots_per_expert = L + 1. An expert's slots are laid out back to back (slot -1
//     last) and only the expert's total is padded; lora_of_block is -1.
//   * Pairs with an expert id outside [0, E) are dropped. Padding entries hold N.
// Outputs have static sizes (CUDA graphs, torch.compile): with G = E * L or E groups,
// max_blocks = (N + min(G, N) * (block_size - 1)) // block_size, sorted_pair_ids
// [max_blocks * block_size], expert_of_block [max_blocks], lora_of_block [max_blocks],
// num_blocks [1]; past the num_blocks valid blocks they hold N, -1 and -1.
//
// Kernel: one launch of one thread block of kThreads threads, with no host synchronisation.
// Counters: group_offset [E * slots_per_expert] then expert_offset [E], int32, in dynamic shared
// memory when they fit the device's opt-in limit next to the kernel's static shared memory,
// otherwise in a global workspace that this block alone uses (__syncthreads orders global
// accesses within a block as it does shared ones). Phases, separated by __syncthreads:
//   1. zero the counters;
//   2. count the pairs of each group (atomicAdd), asserting token_lora values on the device;
//   3. each thread takes a contiguous chunk of experts, computes their padded sizes, and a
//      cub::BlockScan over the chunk sums gives every expert's start; the thread then turns its
//      experts' group counts into group start offsets; thread 0 writes num_blocks;
//   4. one thread per block index finds its expert (and slot) by binary search over the start
//      offsets and writes the block metadata (-1 past the valid blocks); sorted_pair_ids is
//      filled with N;
//   5. scatter: each pair takes the next position of its group with atomicAdd.
// Because of the atomics in phase 5, the order of the pairs within a group is not deterministic
// on CUDA (the CPU kernel keeps the flattened order); the set of pairs of each group, the padding
// positions and the block metadata are deterministic.
// One block means one SM does all the work: the time grows with N / kThreads, and with the global
// workspace also with E * slots_per_expert / kThreads.
#include "align_block_size.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_scan.cuh>

namespace moe_lora {

namespace {

constexpr int kThreads = 1024;

struct AlignParams {
  int64_t num_pairs;
  int32_t top_k;
  int32_t num_experts;
  int32_t max_loras;
  int32_t slots_per_expert;
  int32_t block_size;
  int32_t max_blocks;
  bool pad_per_adapter;
};

__device__ __forceinline__ int32_t round_up(int32_t value, int32_t multiple) {
  return static_cast<int32_t>((static_cast<int64_t>(value) + multiple - 1) / multiple * multiple);
}

// Group key of a pair, or -1 when the pair is dropped.
template <typename id_t, typename lora_t>
__device__ __forceinline__ int32_t group_key(
    const id_t* __restrict__ topk_ids,
    const lora_t* __restrict__ token_lora,
    int64_t pair,
    const AlignParams& params) {
  int64_t slot = -1;
  if (token_lora != nullptr) {
    slot = token_lora[pair / params.top_k];
    CUDA_KERNEL_ASSERT_MSG(
        slot >= -1 && slot < params.max_loras, "align_block_size: token_lora values must lie in [-1, max_loras)");
    // Still never index out of bounds where device asserts are compiled out.
    if (slot < -1 || slot >= params.max_loras) {
      return -1;
    }
  }
  const int64_t expert = topk_ids[pair];
  if (expert < 0 || expert >= params.num_experts) {
    return -1;
  }
  if (slot < 0) {
    if (params.pad_per_adapter) {
      return -1;
    }
    slot = params.max_loras;
  }
  return static_cast<int32_t>(expert * params.slots_per_expert + slot);
}

// Largest index in [0, size) whose offset is <= position; offsets are non-decreasing and
// offsets[0] <= position. Empty segments share their start with the next one, so the index found
// is the nonempty segment that holds position.
__device__ __forceinline__ int32_t segment_at(const int32_t* offsets, int32_t size, int64_t position) {
  int32_t low = 0;
  int32_t high = size;
  while (high - low > 1) {
    const int32_t middle = low + (high - low) / 2;
    if (offsets[middle] <= position) {
      low = middle;
    } else {
      high = middle;
    }
  }
  return low;
}

template <typename id_t, typename lora_t, bool kSharedCounters>
__global__ void __launch_bounds__(kThreads) align_block_size_kernel(
    const id_t* __restrict__ topk_ids,
    const lora_t* __restrict__ token_lora,
    const AlignParams params,
    int32_t* __restrict__ sorted_pair_ids,
    int32_t* __restrict__ expert_of_block,
    int32_t* __restrict__ lora_of_block,
    int32_t* __restrict__ num_blocks,
    int32_t* global_counters) {
  using BlockScan = cub::BlockScan<int32_t, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  extern __shared__ int32_t shared_counters[];
  int32_t* const group_offset = kSharedCounters ? shared_counters : global_counters;
  const int32_t num_groups = params.num_experts * params.slots_per_expert;
  int32_t* const expert_offset = group_offset + num_groups;
  const int32_t thread = threadIdx.x;

  // 1. Zero the counters.
  for (int32_t i = thread; i < num_groups + params.num_experts; i += kThreads) {
    group_offset[i] = 0;
  }
  __syncthreads();

  // 2. Count the pairs of each group.
  for (int64_t pair = thread; pair < params.num_pairs; pair += kThreads) {
    const int32_t key = group_key(topk_ids, token_lora, pair, params);
    if (key >= 0) {
      atomicAdd(&group_offset[key], 1);
    }
  }
  __syncthreads();

  // 3. Padded expert sizes over this thread's chunk of experts, a block-wide exclusive scan of the
  // chunk sums, then counts -> start offsets.
  const int32_t experts_per_thread = (params.num_experts + kThreads - 1) / kThreads;
  const int32_t first_expert = min(thread * experts_per_thread, params.num_experts);
  const int32_t end_expert = min(first_expert + experts_per_thread, params.num_experts);
  int32_t chunk_size = 0;
  for (int32_t expert = first_expert; expert < end_expert; ++expert) {
    const int32_t* counts = group_offset + expert * params.slots_per_expert;
    int32_t expert_size = 0;
    for (int32_t slot = 0; slot < params.slots_per_expert; ++slot) {
      expert_size += params.pad_per_adapter ? round_up(counts[slot], params.block_size) : counts[slot];
    }
    if (!params.pad_per_adapter) {
      expert_size = round_up(expert_size, params.block_size);
    }
    expert_offset[expert] = expert_size;
    chunk_size += expert_size;
  }
  int32_t expert_start = 0;
  int32_t total_size = 0;
  BlockScan(scan_storage).ExclusiveSum(chunk_size, expert_start, total_size);
  for (int32_t expert = first_expert; expert < end_expert; ++expert) {
    const int32_t expert_size = expert_offset[expert];
    expert_offset[expert] = expert_start;
    int32_t* offsets = group_offset + expert * params.slots_per_expert;
    int32_t position = expert_start;
    for (int32_t slot = 0; slot < params.slots_per_expert; ++slot) {
      const int32_t count = offsets[slot];
      offsets[slot] = position;
      position += params.pad_per_adapter ? round_up(count, params.block_size) : count;
    }
    expert_start += expert_size;
  }
  if (thread == 0) {
    num_blocks[0] = total_size / params.block_size;
  }
  __syncthreads();

  // 4. Block metadata and padding.
  for (int32_t block = thread; block < params.max_blocks; block += kThreads) {
    const int64_t position = static_cast<int64_t>(block) * params.block_size;
    int32_t expert = -1;
    int32_t slot = -1;
    if (position < total_size) {
      expert = segment_at(expert_offset, params.num_experts, position);
      if (params.pad_per_adapter) {
        slot = segment_at(group_offset + expert * params.slots_per_expert, params.max_loras, position);
      }
    }
    expert_of_block[block] = expert;
    lora_of_block[block] = slot;
  }
  const int64_t num_entries = static_cast<int64_t>(params.max_blocks) * params.block_size;
  for (int64_t entry = thread; entry < num_entries; entry += kThreads) {
    sorted_pair_ids[entry] = static_cast<int32_t>(params.num_pairs);
  }
  __syncthreads();

  // 5. Scatter every kept pair to the next free position of its group.
  for (int64_t pair = thread; pair < params.num_pairs; pair += kThreads) {
    const int32_t key = group_key(topk_ids, token_lora, pair, params);
    if (key >= 0) {
      sorted_pair_ids[atomicAdd(&group_offset[key], 1)] = static_cast<int32_t>(pair);
    }
  }
}

template <typename id_t, typename lora_t>
void launch_align_block_size(
    const at::Tensor& topk_ids,
    const at::Tensor& token_lora,
    const AlignParams& params,
    AlignBlockSizeOutputs& outputs) {
  auto& [sorted_pair_ids, expert_of_block, lora_of_block, num_blocks] = outputs;
  const id_t* id_data = topk_ids.const_data_ptr<id_t>();
  const lora_t* slot_data = token_lora.defined() ? token_lora.const_data_ptr<lora_t>() : nullptr;
  const int64_t num_counters = static_cast<int64_t>(params.num_experts) * (params.slots_per_expert + 1);
  const size_t counter_bytes = static_cast<size_t>(num_counters) * sizeof(int32_t);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  auto* shared_kernel = align_block_size_kernel<id_t, lora_t, true>;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, shared_kernel));
  int shared_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  if (attributes.sharedSizeBytes + counter_bytes <= static_cast<size_t>(shared_limit)) {
    if (counter_bytes > static_cast<size_t>(attributes.maxDynamicSharedSizeBytes)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(
          shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(counter_bytes)));
    }
    shared_kernel<<<1, kThreads, counter_bytes, stream>>>(
        id_data, slot_data, params, sorted_pair_ids.mutable_data_ptr<int32_t>(),
        expert_of_block.mutable_data_ptr<int32_t>(), lora_of_block.mutable_data_ptr<int32_t>(),
        num_blocks.mutable_data_ptr<int32_t>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const at::Tensor counters = at::empty({num_counters}, topk_ids.options().dtype(at::kInt));
    align_block_size_kernel<id_t, lora_t, false><<<1, kThreads, 0, stream>>>(
        id_data, slot_data, params, sorted_pair_ids.mutable_data_ptr<int32_t>(),
        expert_of_block.mutable_data_ptr<int32_t>(), lora_of_block.mutable_data_ptr<int32_t>(),
        num_blocks.mutable_data_ptr<int32_t>(), counters.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

AlignBlockSizeOutputs align_block_size_cuda(
    const at::Tensor& topk_ids,
    const std::optional<at::Tensor>& token_lora,
    int64_t num_experts,
    int64_t max_loras,
    int64_t block_size,
    bool pad_per_adapter) {
  const AlignBlockSizeShape shape =
      check_align_block_size_args(topk_ids, token_lora, num_experts, max_loras, block_size, pad_per_adapter);
  const c10::cuda::CUDAGuard device_guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  const at::Tensor slots = token_lora.has_value() ? token_lora->contiguous() : at::Tensor();
  auto outputs = empty_align_block_size_outputs(topk_ids, shape, block_size);
  const AlignParams params{
      shape.num_pairs,
      static_cast<int32_t>(shape.top_k),
      static_cast<int32_t>(num_experts),
      static_cast<int32_t>(max_loras),
      static_cast<int32_t>(shape.slots_per_expert),
      static_cast<int32_t>(block_size),
      static_cast<int32_t>(shape.max_blocks),
      pad_per_adapter};
  const at::ScalarType lora_type = slots.defined() ? slots.scalar_type() : at::kInt;
  dispatch_index_type(ids.scalar_type(), [&](auto id_value) {
    dispatch_index_type(lora_type, [&](auto lora_value) {
      launch_align_block_size<decltype(id_value), decltype(lora_value)>(ids, slots, params, outputs);
    });
  });
  return outputs;
}

}  // namespace moe_lora
