"""An adapter per sequence of a packed batch and per request of transformers' continuous batching,
and more adapters than slots.

Ground truth: PEFT on each prompt alone (float32 tiny models on the CPU: greedy tokens must be
identical, logits within 1e-4 of their scale).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import GenerationConfig
from utils import COMMON, assert_rows_match, make_peft_adapters, requires_cuda, tiny_model

from torch_moe_lora import ExpertLoRASlots, patch_model
from torch_moe_lora.linear import MultiLoRALinear
from torch_moe_lora.lora import check_device_memory

FAMILY = "qwen3_moe"
NEW_TOKENS = 4
GREEDY = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)


def cb_config(**kwargs):
    """A small paged cache (the defaults size it from the machine's memory); its page size is
    ``block_size`` in transformers 5.17 and ``page_size`` later."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = (
        "page_size" if "page_size" in {f.name for f in dataclasses.fields(ContinuousBatchingConfig)} else "block_size"
    )
    return ContinuousBatchingConfig(**{**dict(num_blocks=32, max_batch_tokens=64, **{page: 16}), **kwargs})


def prompts(lengths, seed=3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, COMMON["vocab_size"], (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(PEFT adapters name -> (dir, PEFT model), reference models name -> model) of the tiny Qwen3-MoE."""
    made = make_peft_adapters(FAMILY, tmp_path_factory.mktemp("serving"))
    return made, {None: tiny_model(FAMILY), **{name: peft for name, (_, peft) in made.items()}}


def sdpa_model():
    model = tiny_model(FAMILY)
    model.config._attn_implementation = "sdpa"
    return model


def reference_tokens(models, prompt, adapter, new_tokens=NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = models[adapter].generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def check_outputs(outputs, requests, models) -> None:
    """Every request's greedy tokens are PEFT's on that prompt alone; some adapter changes its tokens."""
    differs = False
    for request_id, (prompt, adapter, new_tokens) in requests.items():
        out = outputs[request_id]
        expected = reference_tokens(models, prompt, adapter, new_tokens)
        base = reference_tokens(models, prompt, None, new_tokens)
        print(f"{request_id} ({adapter}): {out.generated_tokens} expected {expected} (base {base})")
        assert out.error is None and out.generated_tokens == expected, request_id
        differs |= adapter is not None and expected != base
    assert differs, "no adapter changed any request's tokens: the check would not see a wrong mapping"


# --- packed batches ------------------------------------------------------------------------------


def test_packed_batch_maps_each_sequence_to_its_adapter(served):
    """Three prompts one after another in one row (a block-diagonal causal mask, positions restarting):
    each sequence's logits are PEFT's on that prompt alone."""
    made, models = served
    model = tiny_model(FAMILY)
    handle = patch_model(model, {name: path for name, (path, _) in made.items()})
    sequences, names = prompts((5, 4, 3)), ["a", None, "c"]
    lengths = [len(p) for p in sequences]
    ids = torch.tensor([sum(sequences, [])])
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(len(seq), len(seq), dtype=torch.bool).tril()
    mask = torch.zeros(1, 1, len(seq), len(seq)).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad(), handle.adapters(names, lengths=lengths):
        assert handle.mapping.per_token and handle.mapping.slots == sum(([0] * 5, [-1] * 4, [2] * 3), [])
        packed = model(input_ids=ids, position_ids=positions, attention_mask=mask).logits[0].split(lengths)
        with pytest.raises(ValueError, match="the batch has 11 tokens but the packed mapping has 12"):
            model(input_ids=ids[:, :11])
    with torch.no_grad():
        for logits, prompt, name in zip(packed, sequences, names):
            ref = models[name](input_ids=torch.tensor([prompt])).logits[0]
            assert_rows_match(logits[None], ref[None], [name], f"packed sequence on {name}")
    assert handle.mapping.row_slot is None


@pytest.mark.parametrize(
    "names, lengths, error, message",
    [
        (["a", None], [3], TypeError, "one positive int per name"),
        (["a"], [0], TypeError, "one positive int per name"),
        (["a"], 3, TypeError, "lengths must be a sequence"),
        (None, [3], TypeError, "lengths without names"),
        (["zzz"], [3], KeyError, "'zzz'"),
    ],
)
def test_bad_packed_mappings_are_refused(names, lengths, error, message, served):
    made, _ = served
    handle = patch_model(tiny_model(FAMILY), {"a": made["a"][0]})
    with pytest.raises(error, match=message):
        handle.set_adapters(names, lengths=lengths)
    assert handle.mapping.row_slot is None


def test_packed_mapping_buffers_stay_put_per_token_count(served):
    """A packed mapping of ``T`` tokens always lies at the same addresses (captured graphs replay with
    new mappings), whatever was mapped in between."""
    made, _ = served
    handle = patch_model(tiny_model(FAMILY), {name: path for name, (path, _) in made.items()})
    handle.set_adapters(["a", "b"], lengths=[3, 2])
    first = [t.data_ptr() for t in handle.mapping.state()[:3]]
    handle.set_adapters(["c", None, "a"], lengths=[1, 30, 9])
    handle.set_adapters(["a", "b", "c"])
    handle.set_adapters([None, "c"], lengths=[4, 1])
    assert [t.data_ptr() for t in handle.mapping.state()[:3]] == first
    assert handle.mapping.slots == [-1] * 4 + [2]


# --- continuous batching -------------------------------------------------------------------------


def test_generate_batch_gives_each_request_its_adapter(served):
    """``handle.generate_batch``: every request's greedy tokens are PEFT's on that prompt alone; a
    request naming an unknown adapter fails alone with the error."""
    made, models = served
    model = sdpa_model()
    handle = patch_model(model, {name: path for name, (path, _) in made.items()})
    inputs = prompts((5, 9, 3, 7, 4, 6))
    adapters = ["a", "b", None, "c", "zzz", "a"]
    with torch.no_grad():
        outputs = handle.generate_batch(
            inputs, adapters, generation_config=GREEDY, continuous_batching_config=cb_config()
        )
    assert list(outputs) == [f"req_{i}" for i in range(len(inputs))]
    failed = outputs["req_4"]
    assert failed.status.name == "FAILED" and "'zzz'" in failed.error and failed.generated_tokens == []
    requests = {f"req_{i}": (p, a, NEW_TOKENS) for i, (p, a) in enumerate(zip(inputs, adapters)) if a != "zzz"}
    check_outputs(outputs, requests, models)
    assert handle.serving.in_use() == set()
    handle.unload_adapter("b")
    assert handle.unpatch() is model and not hasattr(model, "_moe_lora_requests")


def wait_for(manager, request_ids, timeout: float = 5.0) -> dict:
    """The finished outputs of ``request_ids``, waiting at most ``timeout`` seconds for each output."""
    results = {}
    while len(results) < len(request_ids):
        output = manager.get_result(timeout=timeout)
        assert output is not None, f"no result for {set(request_ids) - set(results)}"
        if output.is_finished():
            results[output.request_id] = output
    return results


def test_requests_join_and_leave_while_adapters_load(served):
    """A manager of transformers' own: requests of different lengths join while others run, an adapter
    loads while they run, and an adapter that a request uses cannot be unloaded until it is done."""
    made, models = served
    model = sdpa_model()
    handle = patch_model(model, {"a": made["a"][0], "b": made["b"][0]}, max_loras=3)
    manager = handle.init_continuous_batching(GREEDY, cb_config())
    first = prompts((6, 3, 8), seed=5)
    requests = {}
    with torch.no_grad():
        for prompt, adapter, new in zip(first, ["a", "b", None], (2, 9, 5)):
            requests[handle.add_request(manager, prompt, adapter=adapter, max_new_tokens=new)] = (prompt, adapter, new)
        with pytest.raises(ValueError, match="'b' is used by running requests"):
            handle.unload_adapter("b")  # queued before the manager starts: certainly not finished
        with pytest.raises(RuntimeError, match="still run or wait"):
            handle.unpatch()
        with pytest.raises(KeyError, match="'c', which is not loaded"):
            handle.add_request(manager, first[0], adapter="c")
        manager.start()
        try:
            results = wait_for(manager, [next(iter(requests))])  # the shortest is done: others still run
            handle.load_adapter("c", made["c"][0])
            later = prompts((4, 7, 5), seed=6)
            for prompt, adapter, new in zip(later, ["c", "a", "c"], (3, 6, 4)):
                rid = handle.add_request(manager, prompt, adapter=adapter, max_new_tokens=new)
                requests[rid] = (prompt, adapter, new)
            results |= wait_for(manager, [r for r in requests if r not in results])
        finally:
            manager.stop(block=True)
    check_outputs(results, requests, models)
    handle.unload_adapter("b")
    assert handle.registered_adapters == ["a", "c"]


def test_more_adapters_than_slots_wait_for_one(served):
    """One slot, three adapters: requests take turns for the slot (a request whose adapter has none
    waits outside the manager until no running request uses the slot) and all come out right."""
    made, models = served
    model = sdpa_model()
    handle = patch_model(model, {name: path for name, (path, _) in made.items()}, max_loras=1)
    assert handle.adapter_names == ["a"] and handle.registered_adapters == ["a", "b", "c"]
    inputs = prompts((5, 4, 6, 3, 7), seed=8)
    adapters = ["b", "c", "a", None, "b"]
    with torch.no_grad():
        outputs = handle.generate_batch(
            inputs, adapters, generation_config=GREEDY, continuous_batching_config=cb_config()
        )
    check_outputs(outputs, {f"req_{i}": (p, a, NEW_TOKENS) for i, (p, a) in enumerate(zip(inputs, adapters))}, models)
    assert len(handle.adapter_names) == 1


def test_a_waiting_request_whose_adapter_came_in_does_not_wait_behind_others(served):
    """One slot held by a running request of "a"; then "b", "c", "b" wait. When the slot frees, "b"
    swaps in and the second "b" request goes with the first instead of waiting behind "c": two
    swap-ins, not three (b, c, then b again); every request still matches PEFT."""
    made, models = served
    model = sdpa_model()
    handle = patch_model(model, {name: path for name, (path, _) in made.items()}, max_loras=1)
    swaps = []
    write = handle._write
    handle._write = lambda slot, adapter: (swaps.append(slot), write(slot, adapter))[1]
    manager = handle.init_continuous_batching(GREEDY, cb_config())
    long_prompt, *rest = prompts((6, 5, 4, 7), seed=13)
    requests = {}
    with torch.no_grad():
        manager.start()
        try:
            first = handle.add_request(manager, long_prompt, adapter="a", max_new_tokens=24)
            requests[first] = (long_prompt, "a", 24)
            for prompt, adapter in zip(rest, ["b", "c", "b"]):
                rid = handle.add_request(manager, prompt, adapter=adapter, max_new_tokens=NEW_TOKENS)
                requests[rid] = (prompt, adapter, NEW_TOKENS)
            results = wait_for(manager, list(requests), timeout=60.0)
        finally:
            manager.stop(block=True)
    assert len(results[first].generated_tokens) == 24
    check_outputs(results, requests, models)
    assert len(swaps) == 2, f"{len(swaps)} swap-ins"


def test_new_requests_of_a_resident_adapter_cannot_starve_a_waiting_one(served):
    """One slot held by a running request of "a"; a request of "b" waits. Of the requests of "a" that
    keep coming, ``BYPASS_LIMIT`` still go at once (beside the running one); the next waits behind
    "b", so that the slot drains: "b" swaps in when the "a" requests that run are done, then "a"
    again; every request matches PEFT. (Without the limit every new "a" request would go ahead of
    "b", as long as they kept coming.)"""
    from torch_moe_lora.serving import BYPASS_LIMIT

    made, models = served
    model = sdpa_model()
    handle = patch_model(model, {name: path for name, (path, _) in made.items()}, max_loras=1)
    swapped = []
    write = handle._write
    names = {id(adapter): name for name, adapter in handle._store.host.items()}
    handle._write = lambda slot, adapter: (swapped.append(names[id(adapter)]), write(slot, adapter))[1]
    assert handle.waiting_requests() == []  # no request yet
    manager = handle.init_continuous_batching(GREEDY, cb_config())
    first, waiting, *more = prompts((6, 5) + (3,) * (BYPASS_LIMIT + 2), seed=17)
    requests = {}
    with torch.no_grad():
        running = handle.add_request(manager, first, adapter="a", max_new_tokens=8)
        requests[running] = (first, "a", 8)
        b = handle.add_request(manager, waiting, adapter="b", max_new_tokens=NEW_TOKENS)
        requests[b] = (waiting, "b", NEW_TOKENS)
        later = []
        for prompt in more:
            later.append(handle.add_request(manager, prompt, adapter="a", max_new_tokens=NEW_TOKENS))
            requests[later[-1]] = (prompt, "a", NEW_TOKENS)
        assert handle.waiting_requests() == [b, *later[BYPASS_LIMIT:]]
        manager.start()
        try:
            results = wait_for(manager, list(requests), timeout=60.0)
        finally:
            manager.stop(block=True)
    check_outputs(results, requests, models)
    assert swapped == ["b", "a"], swapped
    assert handle.waiting_requests() == []


@requires_cuda
def test_continuous_batching_with_cuda_graphs_on_the_gpu(served):
    """The GPU path with CUDA graphs on: graphs captured for padded token counts replay with the slots
    of each new batch (requests join in two waves, adapters swap into two slots), and every
    request's float32 greedy tokens are PEFT's on that prompt alone."""
    made, models = served
    model = sdpa_model().cuda()
    handle = patch_model(model, {name: path for name, (path, _) in made.items()}, max_loras=2)
    manager = handle.init_continuous_batching(GREEDY, cb_config(use_cuda_graph=True))
    assert all(manager.continuous_batching_config.use_cuda_graph)
    waves = [prompts((5, 9, 3, 7), seed=11), prompts((4, 6, 8), seed=12)]
    names = [["a", "b", None, "c"], ["c", "a", "b"]]
    requests, results = {}, {}
    with torch.no_grad():
        manager.start()
        try:
            for wave, adapters in zip(waves, names):
                ids = [handle.add_request(manager, p, adapter=a) for p, a in zip(wave, adapters)]
                requests |= {rid: (p, a, NEW_TOKENS) for rid, p, a in zip(ids, wave, adapters)}
                # The first batches of each size compile the kernels and capture graphs: seconds each.
                results |= wait_for(manager, ids, timeout=120.0)
        finally:
            manager.stop(block=True)
    check_outputs(results, requests, models)


def test_a_manager_that_shares_kv_blocks_is_refused(served):
    made, _ = served
    model = sdpa_model()
    handle = patch_model(model, {"a": made["a"][0]})
    manager = model.init_continuous_batching(GREEDY, cb_config(allow_block_sharing=True))
    with pytest.raises(ValueError, match="allow_block_sharing=False"):
        handle.add_request(manager, [1, 2, 3], adapter="a")


def test_unpatched_models_run_through_the_hook_unchanged(served):
    """Once the hook is installed, transformers' own generate_batch of a model nobody patched is untouched."""
    made, models = served
    handle = patch_model(sdpa_model(), {"a": made["a"][0]})
    with torch.no_grad():
        handle.generate_batch([[1, 2, 3]], ["a"], generation_config=GREEDY, continuous_batching_config=cb_config())
        plain = sdpa_model()
        outputs = plain.generate_batch(
            prompts((4, 6)), generation_config=GREEDY, continuous_batching_config=cb_config()
        )
    for out, prompt in zip(outputs.values(), prompts((4, 6))):
        assert out.generated_tokens == reference_tokens(models, prompt, None)


# --- memory ----------------------------------------------------------------------------------------


def test_table_bytes_are_what_the_tables_allocate():
    table = ExpertLoRASlots(3, 4, 32, 16, 5, split_gate_up=True, dtype=torch.bfloat16)
    allocated = sum(t.numel() * t.element_size() for t in table.weights)
    assert ExpertLoRASlots.table_bytes(3, 4, 32, 16, 5, split_gate_up=True, dtype=torch.bfloat16) == allocated
    linear = torch.nn.Linear(24, 40, dtype=torch.float16)
    wrapped = MultiLoRALinear(linear, 3, 5, None)
    allocated = sum(b.numel() * b.element_size() for b in wrapped.buffers())
    assert MultiLoRALinear.table_bytes(linear, 3, 5) == allocated


def test_tables_that_do_not_fit_the_device_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))
    check_device_memory(2**30, torch.device("cuda:0"), "tables", 4, 16)
    expected = (
        r"tables need 20.00 GiB on cuda:0 \(5.000 GiB a slot at rank 16\), but only 2.00 of its 80.00 GiB are free; "
        r"lower max_loras \(now 4\) or max_rank \(now 16\)"
    )
    with pytest.raises(ValueError, match=expected):
        check_device_memory(20 * 2**30, torch.device("cuda:0"), "tables", 4, 16)
    check_device_memory(2**40, torch.device("cpu"), "tables", 4, 16)  # host memory is not checked


@requires_cuda
def test_patch_model_refuses_tables_larger_than_the_free_memory(served):
    made, _ = served
    model = tiny_model(FAMILY).cuda()
    free, _ = torch.cuda.mem_get_info()
    too_many = free // ExpertLoRASlots.table_bytes(1, 4, 32, 16, 1024, dtype=torch.float32) + 1
    with pytest.raises(ValueError, match="lower max_loras"):
        patch_model(model, {"a": made["a"][0]}, max_loras=int(too_many), max_rank=1024)
