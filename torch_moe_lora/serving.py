"""Continuous batching with an adapter per request, through transformers' own continuous batching.

transformers serves many requests with a ``ContinuousBatchingManager``: each forward pass packs the
tokens of the scheduled requests into one row (``input_ids [1, T]``, decoding requests first, then
prefill chunks) and, with CUDA graphs on, replays a graph captured for the padded token count
``T``. A patched model gives each request its own adapter through one hook, at the narrowest point
that sees both the batch and every forward: ``ModelRunner.compute_batch(self, model, batch_data)``
(``transformers.generation.continuous_batching.model_runner``, the same in transformers 5.17
through 5.24), which runs right before every forward, graph capture and graph replay. It is wrapped
once, at the class; for a model this library did not patch the wrapper calls it unchanged.

Before each forward the wrapper reads the batch's requests in token order
(``inputs_and_outputs.requests_in_batch``, of the current IO pair under async batching: each
entry's ``state.request_id`` and ``query_length``), and writes the slot of every token into the
handle's ``SlotMapping`` in place, on the compute stream; padding tokens and requests this library
did not add (transformers' warm-up, a plain ``manager.add_request``) get no adapter. A request
keeps its adapter's slot from ``add_request`` until its final output is delivered (the manager's
``output_router``, wrapped on each manager a request goes through) or it is cancelled through the
handle. Prefix sharing of KV-cache blocks (``allow_block_sharing``) matches prompts by their tokens
only, so it would share blocks computed under another adapter: requests are refused on a manager
that has it on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import threading
import weakref
from collections.abc import Sequence

import torch
import transformers
from packaging.version import Version

MIN_TRANSFORMERS = "5.17.0"
BYPASS_LIMIT = 4
"""How many new requests of the adapter whose slot a waiting request will get may go ahead of it
before that adapter drains (``RequestAdapters._drain``)."""
RUNNING = "running requests"
"""What uses an adapter that requests added through a handle use (``MoELoRAModel._in_use``)."""
_SERVING_ATTR = "_moe_lora_requests"
_HOOKED = "_moe_lora_hooked"


def _continuous_batching():
    """transformers' continuous-batching modules, checked for the version and the hook's signature."""
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise NotImplementedError(
            f"continuous batching with adapters needs transformers >= {MIN_TRANSFORMERS}, "
            f"found {transformers.__version__}"
        )
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching import model_runner, requests

    return model_runner.ModelRunner, ContinuousBatchingConfig, requests


def _install_hook() -> None:
    runner_class, _, _ = _continuous_batching()
    original = runner_class.compute_batch
    if getattr(original, _HOOKED, False):
        return

    @functools.wraps(original)
    def compute_batch(self, model, batch_data):
        requests = getattr(model, _SERVING_ATTR, None)
        if requests is None:
            return original(self, model, batch_data)
        return requests.compute_batch(original, self, model, batch_data)

    setattr(compute_batch, _HOOKED, True)
    runner_class.compute_batch = compute_batch


def continuous_batching_config(config=None):
    """``config`` (a ``ContinuousBatchingConfig`` or None for the defaults) with block sharing off."""
    _, config_class, _ = _continuous_batching()
    if config is None:
        return config_class(allow_block_sharing=False)
    return dataclasses.replace(config, allow_block_sharing=False)


@dataclasses.dataclass
class _Waiting:
    """A request whose adapter waits for a slot, with what ``manager.add_request`` gets once it has one."""

    manager: object
    request_id: str
    adapter: str
    input_ids: list[int]
    kwargs: dict
    bypassed: int = 0
    """Requests of the draining adapter that went ahead of this one (``RequestAdapters._drain``)."""


class RequestAdapters:
    """The adapter of each continuous-batching request added through one handle.

    Args:
        handle: the ``patch.MoELoRAModel``; its lock guards the slots, this object's own lock its books.
    """

    def __init__(self, handle) -> None:
        self.handle = handle
        self._lock = threading.Lock()
        self._adapter_of: dict[str, str | None] = {}
        self._waiting: list[_Waiting] = []
        self._managers: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._pump: threading.Thread | None = None

    # --- books ----------------------------------------------------------------------------------

    def in_use(self) -> set[str]:
        """Adapters of requests added and not yet finished (they keep their slots)."""
        with self._lock:
            return {name for name in self._adapter_of.values() if name is not None}

    def waiting(self) -> list[str]:
        """Ids of the requests waiting for their adapter's slot, first come first."""
        with self._lock:
            return [w.request_id for w in self._waiting]

    def running(self) -> bool:
        """Whether a manager that requests went through is running."""
        return any(manager.is_running() for manager in list(self._managers.values()))

    def detach(self) -> None:
        """Leaves the model to transformers alone (the hook passes it through from now on).

        Raises:
            RuntimeError: requests added through the handle still run or wait for a slot.
        """
        with self._lock:
            busy = sorted(self._adapter_of) + [w.request_id for w in self._waiting]
        if busy:
            raise RuntimeError(f"unpatch: continuous-batching requests {busy} still run or wait; let them finish first")
        if getattr(self.handle.model, _SERVING_ATTR, None) is self:
            delattr(self.handle.model, _SERVING_ATTR)

    def _attach(self, manager) -> None:
        """Hooks ``manager``'s output router once, so that a request's slot is released before its final
        output reaches the caller."""
        if id(manager) in self._managers:
            return
        if manager.continuous_batching_config.allow_block_sharing:
            raise ValueError(
                "this continuous-batching manager shares KV-cache blocks between prompts with the same tokens, which "
                "would mix adapters; create it with handle.init_continuous_batching(), or with "
                "ContinuousBatchingConfig(allow_block_sharing=False)"
            )
        if manager.num_return_sequences != 1:
            raise NotImplementedError("adapters per request need num_return_sequences == 1 in the generation config")
        router = manager.output_router
        deliver, deliver_batch = router.deliver, router.deliver_batch

        def deliver_one(output):
            self._finished([output])
            return deliver(output)

        def deliver_many(outputs):
            self._finished(outputs)
            return deliver_batch(outputs)

        router.deliver, router.deliver_batch = deliver_one, deliver_many
        self._managers[id(manager)] = manager
        setattr(self.handle.model, _SERVING_ATTR, self)
        _install_hook()

    def _finished(self, outputs) -> None:
        released = False
        with self._lock:
            for output in outputs:
                if output.is_finished() and output.request_id in self._adapter_of:
                    released |= self._adapter_of.pop(output.request_id) is not None
        if released and self._waiting:
            self._wake.set()

    def _drain(self) -> tuple[str | None, _Waiting | None]:
        """``(adapter, request)``: the adapter whose slot ``request``, the first waiting request that
        needs a slot, will get, or ``(None, None)``. Under the handle's lock.

        While a request waits for a slot and none can be freed (every slot's adapter is in use), new
        requests for resident adapters could keep every slot busy for ever. So the least recently
        used adapter that only running requests use drains: up to ``BYPASS_LIMIT`` of its new requests
        still go ahead (they run beside its running ones at no cost), later ones wait behind the
        waiting request, its running ones finish, and its slot goes to that request.
        """
        store = self.handle._store
        with self._lock:
            first = next((w for w in self._waiting if w.adapter not in store.slot_of), None)
        if first is None or store.free_slots():
            return None, None
        users = self.handle._in_use()
        if store.evictable(users):
            return None, None  # a slot can be freed now
        return store.least_recent(name for name in store.slot_of if users[name] == RUNNING), first

    def _place(self, adapter: str | None) -> bool:
        """Gives ``adapter`` a slot (swapping it in if need be) unless it drains its slot (``_drain``)
        or no slot can be freed; whether it has one. Under the handle's lock."""
        if adapter is None:
            return True  # the base model needs no slot
        draining, first = self._drain()
        if adapter == draining:
            with self._lock:
                if first.bypassed >= BYPASS_LIMIT:
                    return False
                first.bypassed += 1  # resident: the placement below cannot fail
        try:
            self.handle._make_resident([adapter])
        except ValueError:
            return False
        return True

    # --- requests -------------------------------------------------------------------------------

    def add_request(
        self, manager, input_ids: Sequence[int], adapter: str | None, request_id: str | None, **kwargs
    ) -> str:
        handle = self.handle
        if adapter is not None and not isinstance(adapter, str):
            raise TypeError(f"adapter must be an adapter name (str) or None, got {type(adapter).__name__}")
        if adapter is not None and adapter not in handle._store:
            raise KeyError(
                f"request names adapter {adapter!r}, which is not loaded; loaded: {handle.registered_adapters}"
            )
        self._attach(manager)
        request_id = f"lora_req_{next(self._ids)}" if request_id is None else request_id
        with handle._lock:
            with self._lock:
                if request_id in self._adapter_of or any(w.request_id == request_id for w in self._waiting):
                    raise ValueError(f"request id {request_id!r} is already running")
            if not self._place(adapter):
                with self._lock:
                    self._waiting.append(_Waiting(manager, request_id, adapter, list(input_ids), kwargs))
                self._start_pump()
                return request_id
            with self._lock:
                self._adapter_of[request_id] = adapter
        self._submit(manager, request_id, list(input_ids), kwargs)
        return request_id

    def _submit(self, manager, request_id: str, input_ids: list[int], kwargs: dict) -> None:
        # Outside the handle's lock: the manager's queue may block while its loop waits for that lock.
        if manager.add_request(input_ids, request_id=request_id, **kwargs) is None:
            with self._lock:
                self._adapter_of.pop(request_id, None)
            raise RuntimeError(f"the continuous-batching manager dropped request {request_id!r} (is it running?)")

    def cancel_request(self, manager, request_id: str) -> None:
        with self._lock:
            waiting = [w for w in self._waiting if w.request_id == request_id]
            self._waiting = [w for w in self._waiting if w.request_id != request_id]
            self._adapter_of.pop(request_id, None)
        if not waiting:
            manager.cancel_request(request_id)

    def wake(self) -> None:
        """Tells the waiting requests that a slot may have come free."""
        if self._waiting:
            self._wake.set()

    def _start_pump(self) -> None:
        if self._pump is None or not self._pump.is_alive():
            self._pump = threading.Thread(target=self._admit_waiting, name="moe_lora_waiting_requests", daemon=True)
            self._pump.start()

    def _admit_waiting(self) -> None:
        """Gives waiting requests their slots as slots come free, first come first served; a request
        whose adapter holds a slot by then (another waiting request's swap brought it in) goes at
        once, as a new request for a resident adapter does, rather than behind one still waiting,
        unless its adapter drains its slot (``_drain``)."""
        while True:
            self._wake.wait(timeout=0.05)
            self._wake.clear()
            admitted = []
            with self.handle._lock:
                with self._lock:
                    waiting = list(self._waiting)
                for request in waiting:
                    if not self._place(request.adapter):  # only requests of resident adapters go on
                        continue
                    with self._lock:
                        self._waiting.remove(request)
                        self._adapter_of[request.request_id] = request.adapter
                    admitted.append(request)
            for request in admitted:
                try:
                    self._submit(request.manager, request.request_id, request.input_ids, request.kwargs)
                except RuntimeError as error:  # the manager stopped meanwhile: the request fails alone
                    _, _, requests = _continuous_batching()
                    request.manager.output_router.deliver(requests.GenerationOutput(
                        request_id=request.request_id, prompt_ids=request.input_ids, error=str(error),
                        status=requests.RequestStatus.FAILED,
                    ))  # fmt: skip
            with self._lock:
                if not self._waiting:
                    self._pump = None
                    return

    # --- the hook -------------------------------------------------------------------------------

    def compute_batch(self, original, runner, model, batch_data) -> None:
        """Maps every token of the batch to its request's slot, then runs ``original``."""
        handle = self.handle
        ios = runner.inputs_and_outputs
        host = ios.io_pairs[ios.current_pair].host_io if hasattr(ios, "io_pairs") else ios
        num_tokens = batch_data["input_ids"].shape[-1]
        with handle._lock:
            with self._lock:
                names = [(self._adapter_of.get(f.state.request_id), f.query_length) for f in host.requests_in_batch]
            slot_of = handle._store.slot_of
            slots = [-1 if name is None else slot_of[name] for name, length in names for _ in range(length)]
            slots += [-1] * (num_tokens - len(slots))
            previous = handle.mapping.state()
            stream = getattr(ios, "compute_stream", None)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                handle.mapping.set_tokens(slots, handle.device)
            try:
                return original(runner, model, batch_data)
            finally:
                handle.mapping.restore(previous)


def generate_batch(handle, inputs, adapters, generation_config=None, continuous_batching_config_=None, **kwargs):
    """``handle.generate_batch``: see its docstring."""
    _, _, requests = _continuous_batching()
    inputs = [list(prompt) for prompt in inputs]
    adapters = [None] * len(inputs) if adapters is None else list(adapters)
    if len(adapters) != len(inputs):
        raise ValueError(f"generate_batch: {len(inputs)} inputs but {len(adapters)} adapters; give one per input")
    manager = handle.init_continuous_batching(generation_config, continuous_batching_config_)
    results, pending = {}, set()
    manager.start()
    try:
        for i, (prompt, adapter) in enumerate(zip(inputs, adapters)):
            request_id = f"req_{i}"
            try:
                handle.add_request(manager, prompt, adapter=adapter, request_id=request_id, **kwargs)
            except KeyError as error:
                results[request_id] = requests.GenerationOutput(
                    request_id=request_id, prompt_ids=prompt, error=str(error), status=requests.RequestStatus.FAILED
                )
            else:
                pending.add(request_id)
        while pending:
            output = manager.get_result(timeout=1.0)
            if output is None:
                if not manager.is_running():
                    raise RuntimeError(
                        f"the continuous-batching manager stopped with requests {sorted(pending)} unfinished"
                    )
                continue
            if output.request_id in pending and output.is_finished():
                results[output.request_id] = output
                pending.discard(output.request_id)
    finally:
        manager.stop(block=True)
    return {f"req_{i}": results[f"req_{i}"] for i in range(len(inputs))}
