// moe_lora::align_block_size on CUDA.
//
// What the op computes (align_block_size_ref in torch_moe_lora/reference.py is the definition):
// the N = T * K flattened (token, k) pairs, pair = t * K + k, are grouped by expert and adapter
// slot, and every expert's pairs are padded to a multiple of block_size so that each block of
// block_size entries belongs to one expert.
//   * Groups are visited expert by expert. A pair's group key is
//     expert * slots_per_expert + slot', where slot' is token_lora[t], or max_loras for slot -1;
//     slots_per_expert = L + 1 (L = max_loras). An expert's slots are laid out back to back
//     (slot -1 last) and only the expert's total is padded.
//   * Pairs with an expert id outside [0, E) are dropped. Padding entries hold N.
// Outputs have static sizes (CUDA graphs, torch.compile):
// max_blocks = (N + min(E, N) * (block_size - 1)) // block_size, sorted_pair_ids
// [max_blocks * block_size], expert_of_block [max_blocks], num_blocks [1]; past the num_blocks
// valid blocks they hold N and -1.
//
// Kernels (no host synchronisation). Up to kSingleBlockMaxPairs pairs (decode): one launch of
// one thread block of kThreads threads, phases 1-5 below. Beyond that, three launches: zeroed
// global counters are counted into by a grid (through per-block shared histograms when they fit
// in 48 KB) which also fills the padding; one block computes the offsets and block metadata
// (phases 3-4); a grid scatters (phase 5).
// Single-block counters: group_offset [E * slots_per_expert] then expert_offset [E], int32, in dynamic shared
// memory when they fit the device's opt-in limit next to the kernel's static shared memory,
// otherwise in a global workspace that this block alone uses (__syncthreads orders global
// accesses within a block as it does shared ones). Phases, separated by __syncthreads:
//   1. zero the counters;
//   2. count the pairs of each group (atomicAdd), asserting token_lora values on the device;
//   3. each thread takes a contiguous chunk of experts, computes their padded sizes, and a
//      cub::BlockScan over the chunk sums gives every expert's start; the thread then turns its
//      experts' group counts into group start offsets; thread 0 writes num_blocks;
//   4. one thread per block index finds its expert by binary search over the start offsets and
//      writes it (-1 past the valid blocks); sorted_pair_ids is filled with N;
//   5. scatter: each pair takes the next position of its group with atomicAdd.
// Because of the atomics in phase 5, the order of the pairs within a group is not deterministic
// on CUDA (the CPU kernel keeps the flattened order); the set of pairs of each group, the padding
// positions and the block metadata are deterministic.
// One block means one SM does all the work: its time grows with N / kThreads (hence the grid path
// for large N), and with the global workspace also with E * slots_per_expert / kThreads.
#include "align_block_size.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <array>
#include <mutex>

namespace moe_lora {

namespace {

constexpr int kThreads = 1024;       // threads of the single-block kernels
constexpr int kGridThreads = 256;    // threads per block of the grid-wide count and scatter
constexpr int kMaxDevices = 64;
// Up to this many pairs, one launch of one block is fastest (decode); beyond it the count and the
// scatter spread over a grid (each thread of one block would otherwise wait on many loads in turn).
constexpr int64_t kSingleBlockMaxPairs = 4096;
// Per-block private histograms in the grid-wide count up to this size (no opt-in needed).
constexpr size_t kPrivateCountsMaxBytes = 48 * 1024;

struct AlignParams {
  int64_t num_pairs;
  int32_t top_k;
  int32_t num_experts;
  int32_t max_loras;
  int32_t slots_per_expert;
  int32_t block_size;
  int32_t max_blocks;
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

// Phase 2: counts the pairs of each group; pairs first, first + stride, ...
template <typename id_t, typename lora_t>
__device__ __forceinline__ void count_pairs(
    const id_t* __restrict__ topk_ids,
    const lora_t* __restrict__ token_lora,
    const AlignParams& params,
    int32_t* counts,
    int64_t first,
    int64_t stride) {
  for (int64_t pair = first; pair < params.num_pairs; pair += stride) {
    const int32_t key = group_key(topk_ids, token_lora, pair, params);
    if (key >= 0) {
      atomicAdd(&counts[key], 1);
    }
  }
}

// Phase 3, by one whole thread block: turns group counts into start offsets and fills
// expert_offset [E] with each expert's start; returns the padded total (in every thread) and
// writes num_blocks. Ends with __syncthreads.
__device__ __forceinline__ int32_t counts_to_offsets(
    const AlignParams& params,
    int32_t* group_offset,
    int32_t* expert_offset,
    int32_t* __restrict__ num_blocks,
    typename cub::BlockScan<int32_t, kThreads>::TempStorage& scan_storage) {
  const int32_t thread = threadIdx.x;
  const int32_t experts_per_thread = (params.num_experts + kThreads - 1) / kThreads;
  const int32_t first_expert = min(thread * experts_per_thread, params.num_experts);
  const int32_t end_expert = min(first_expert + experts_per_thread, params.num_experts);
  int32_t chunk_size = 0;
  for (int32_t expert = first_expert; expert < end_expert; ++expert) {
    const int32_t* counts = group_offset + expert * params.slots_per_expert;
    int32_t expert_size = 0;
    for (int32_t slot = 0; slot < params.slots_per_expert; ++slot) {
      expert_size += counts[slot];
    }
    expert_size = round_up(expert_size, params.block_size);
    expert_offset[expert] = expert_size;
    chunk_size += expert_size;
  }
  int32_t expert_start = 0;
  int32_t total_size = 0;
  cub::BlockScan<int32_t, kThreads>(scan_storage).ExclusiveSum(chunk_size, expert_start, total_size);
  for (int32_t expert = first_expert; expert < end_expert; ++expert) {
    const int32_t expert_size = expert_offset[expert];
    expert_offset[expert] = expert_start;
    int32_t* offsets = group_offset + expert * params.slots_per_expert;
    int32_t position = expert_start;
    for (int32_t slot = 0; slot < params.slots_per_expert; ++slot) {
      const int32_t count = offsets[slot];
      offsets[slot] = position;
      position += count;
    }
    expert_start += expert_size;
  }
  if (thread == 0) {
    num_blocks[0] = total_size / params.block_size;
  }
  __syncthreads();
  return total_size;
}

// Phase 4a: one thread per block index finds its expert by binary search over the experts' start
// offsets; -1 past the valid blocks.
__device__ __forceinline__ void write_block_metadata(
    const AlignParams& params,
    const int32_t* expert_offset,
    int32_t total_size,
    int32_t* __restrict__ expert_of_block) {
  for (int32_t block = threadIdx.x; block < params.max_blocks; block += kThreads) {
    const int64_t position = static_cast<int64_t>(block) * params.block_size;
    int32_t expert = -1;
    if (position < total_size) {
      expert = segment_at(expert_offset, params.num_experts, position);
    }
    expert_of_block[block] = expert;
  }
}

// Phase 4b: every entry of sorted_pair_ids starts as padding (N).
__device__ __forceinline__ void fill_padding(
    const AlignParams& params, int32_t* __restrict__ sorted_pair_ids, int64_t first, int64_t stride) {
  const int64_t num_entries = static_cast<int64_t>(params.max_blocks) * params.block_size;
  for (int64_t entry = first; entry < num_entries; entry += stride) {
    sorted_pair_ids[entry] = static_cast<int32_t>(params.num_pairs);
  }
}

// Phase 5: every kept pair takes the next free position of its group.
template <typename id_t, typename lora_t>
__device__ __forceinline__ void scatter_pairs(
    const id_t* __restrict__ topk_ids,
    const lora_t* __restrict__ token_lora,
    const AlignParams& params,
    int32_t* group_offset,
    int32_t* __restrict__ sorted_pair_ids,
    int64_t first,
    int64_t stride) {
  for (int64_t pair = first; pair < params.num_pairs; pair += stride) {
    const int32_t key = group_key(topk_ids, token_lora, pair, params);
    if (key >= 0) {
      sorted_pair_ids[atomicAdd(&group_offset[key], 1)] = static_cast<int32_t>(pair);
    }
  }
}

// Small batches: all five phases in one launch of one thread block.
template <typename id_t, typename lora_t, bool kSharedCounters>
__global__ void __launch_bounds__(kThreads) align_single_block_kernel(
    const id_t* __restrict__ topk_ids,
    const lora_t* __restrict__ token_lora,
    const AlignParams params,
    int32_t* __restrict__ sorted_pair_ids,
    int32_t* __restrict__ expert_of_block,
    int32_t* __restrict__ num_blocks,
    int32_t* global_counters) {
  __shared__ typename cub::BlockScan<int32_t, kThreads>::TempStorage scan_storage;
  extern __shared__ int32_t shared_counters[];
  int32_t* const group_offset = kSharedCounters ? shared_counters : global_counters;
  const int32_t num_groups = params.num_experts * params.slots_per_expert;
  int32_t* const expert_offset = group_offset + num_groups;
  for (int32_t i = threadIdx.x; i < num_groups + params.num_experts; i += kThreads) {
    group_offset[i] = 0;
  }
  __syncthreads();
  count_pairs(topk_ids, token_lora, params, group_offset, threadIdx.x, kThreads);
  __syncthreads();
  const int32_t total_size = counts_to_offsets(params, group_offset, expert_offset, num_blocks, scan_storage);
  write_block_metadata(params, expert_offset, total_size, expert_of_block);
  fill_padding(params, sorted_pair_ids, threadIdx.x, kThreads);
  __syncthreads();
  scatter_pairs(topk_ids, token_lora, params, group_offset, sorted_pair_ids, threadIdx.x, kThreads);
}

// Large batches, launch 1 of 3: counts (in a per-block shared histogram when kPrivate, then
// added to the zeroed global counters) and fills the padding, over a grid.
template <typename id_t, typename lora_t, bool kPrivate>
__global__ void __launch_bounds__(kGridThreads) align_count_kernel(
    const id_t* __restrict__ topk_ids,
    const lora_t* __restrict__ token_lora,
    const AlignParams params,
    int32_t* __restrict__ sorted_pair_ids,
    int32_t* counts) {
  extern __shared__ int32_t private_counts[];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kGridThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGridThreads;
  fill_padding(params, sorted_pair_ids, first, stride);
  if constexpr (kPrivate) {
    const int32_t num_groups = params.num_experts * params.slots_per_expert;
    for (int32_t i = threadIdx.x; i < num_groups; i += kGridThreads) {
      private_counts[i] = 0;
    }
    __syncthreads();
    count_pairs(topk_ids, token_lora, params, private_counts, first, stride);
    __syncthreads();
    for (int32_t i = threadIdx.x; i < num_groups; i += kGridThreads) {
      if (private_counts[i] != 0) {
        atomicAdd(&counts[i], private_counts[i]);
      }
    }
  } else {
    count_pairs(topk_ids, token_lora, params, counts, first, stride);
  }
}

// Launch 2 of 3, one thread block: offsets, num_blocks and block metadata.
__global__ void __launch_bounds__(kThreads) align_offsets_kernel(
    const AlignParams params,
    int32_t* __restrict__ expert_of_block,
    int32_t* __restrict__ num_blocks,
    int32_t* counters) {
  __shared__ typename cub::BlockScan<int32_t, kThreads>::TempStorage scan_storage;
  int32_t* const expert_offset = counters + params.num_experts * params.slots_per_expert;
  const int32_t total_size = counts_to_offsets(params, counters, expert_offset, num_blocks, scan_storage);
  write_block_metadata(params, expert_offset, total_size, expert_of_block);
}

// Launch 3 of 3: the scatter, over a grid.
template <typename id_t, typename lora_t>
__global__ void __launch_bounds__(kGridThreads) align_scatter_kernel(
    const id_t* __restrict__ topk_ids,
    const lora_t* __restrict__ token_lora,
    const AlignParams params,
    int32_t* __restrict__ sorted_pair_ids,
    int32_t* group_offset) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kGridThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGridThreads;
  scatter_pairs(topk_ids, token_lora, params, group_offset, sorted_pair_ids, first, stride);
}

// Device properties read once per device.
struct DeviceLimits {
  int shared_optin_bytes;
  int multiprocessors;
};

DeviceLimits device_limits(int device) {
  static std::array<std::once_flag, kMaxDevices> once;
  static std::array<DeviceLimits, kMaxDevices> limits;
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "align_block_size: device index ", device, " out of range");
  std::call_once(once[device], [device] {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(
        &limits[device].shared_optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits[device].multiprocessors, cudaDevAttrMultiProcessorCount, device));
  });
  return limits[device];
}

template <typename id_t, typename lora_t>
void launch_align_block_size(
    const at::Tensor& topk_ids,
    const at::Tensor& token_lora,
    const AlignParams& params,
    AlignBlockSizeOutputs& outputs) {
  auto& [sorted_pair_ids, expert_of_block, num_blocks] = outputs;
  const id_t* id_data = topk_ids.const_data_ptr<id_t>();
  const lora_t* slot_data = token_lora.defined() ? token_lora.const_data_ptr<lora_t>() : nullptr;
  const int64_t num_groups = static_cast<int64_t>(params.num_experts) * params.slots_per_expert;
  const int64_t num_counters = num_groups + params.num_experts;
  const size_t counter_bytes = static_cast<size_t>(num_counters) * sizeof(int32_t);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DeviceLimits limits = device_limits(c10::cuda::current_device());
  int32_t* sorted = sorted_pair_ids.mutable_data_ptr<int32_t>();
  int32_t* experts = expert_of_block.mutable_data_ptr<int32_t>();
  int32_t* blocks = num_blocks.mutable_data_ptr<int32_t>();

  if (params.num_pairs > kSingleBlockMaxPairs) {
    const at::Tensor counters = at::zeros({num_counters}, topk_ids.options().dtype(at::kInt));
    int32_t* counter_data = counters.mutable_data_ptr<int32_t>();
    const int64_t wanted = (params.num_pairs + kGridThreads - 1) / kGridThreads;
    const int grid = static_cast<int>(std::min<int64_t>(wanted, 4 * limits.multiprocessors));
    const size_t private_bytes = static_cast<size_t>(num_groups) * sizeof(int32_t);
    if (private_bytes <= kPrivateCountsMaxBytes) {
      align_count_kernel<id_t, lora_t, true><<<grid, kGridThreads, private_bytes, stream>>>(
          id_data, slot_data, params, sorted, counter_data);
    } else {
      align_count_kernel<id_t, lora_t, false><<<grid, kGridThreads, 0, stream>>>(
          id_data, slot_data, params, sorted, counter_data);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    align_offsets_kernel<<<1, kThreads, 0, stream>>>(params, experts, blocks, counter_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    align_scatter_kernel<id_t, lora_t><<<grid, kGridThreads, 0, stream>>>(
        id_data, slot_data, params, sorted, counter_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  auto* shared_kernel = align_single_block_kernel<id_t, lora_t, true>;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, shared_kernel));
  if (attributes.sharedSizeBytes + counter_bytes <= static_cast<size_t>(limits.shared_optin_bytes)) {
    if (counter_bytes > static_cast<size_t>(attributes.maxDynamicSharedSizeBytes)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(
          shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(counter_bytes)));
    }
    shared_kernel<<<1, kThreads, counter_bytes, stream>>>(
        id_data, slot_data, params, sorted, experts, blocks, nullptr);
  } else {
    const at::Tensor counters = at::empty({num_counters}, topk_ids.options().dtype(at::kInt));
    align_single_block_kernel<id_t, lora_t, false><<<1, kThreads, 0, stream>>>(
        id_data, slot_data, params, sorted, experts, blocks, counters.mutable_data_ptr<int32_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

AlignBlockSizeOutputs align_block_size_cuda(
    const at::Tensor& topk_ids,
    const std::optional<at::Tensor>& token_lora,
    int64_t num_experts,
    int64_t max_loras,
    int64_t block_size) {
  const AlignBlockSizeShape shape =
      check_align_block_size_args(topk_ids, token_lora, num_experts, max_loras, block_size);
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
      static_cast<int32_t>(shape.max_blocks)};
  const at::ScalarType lora_type = slots.defined() ? slots.scalar_type() : at::kInt;
  dispatch_index_type(ids.scalar_type(), [&](auto id_value) {
    dispatch_index_type(lora_type, [&](auto lora_value) {
      launch_align_block_size<decltype(id_value), decltype(lora_value)>(ids, slots, params, outputs);
    });
  });
  return outputs;
}

}  // namespace moe_lora
