"""FedEx-LoRA's server memory: between `add` calls it holds the clients' factors, not dense
d_out x d_in products, and `finish` still computes bit-identical residuals (issue 31, docs/gpu.md)."""

import copy
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from fedsb.adapter.inject import adapter_layers, inject_adapters, load_state, mark_trainable, trainable_state
from fedsb.aggregation.base import Strategy, no_grad
from fedsb.aggregation.fedex import FedExLoRA, _fold
from fedsb.federated import comm


class DenseProductsFedEx(FedExLoRA):
    """FedEx-LoRA as it was before issue 31 fixed its memory: a running fp64 sum of every client's
    dense B_i A_i per layer, kept across `add` calls. The reference the residuals must equal."""

    def begin_round(self, model):
        super().begin_round(model)
        self._products = {}

    def add(self, model, update, num_examples):
        Strategy.add(self, model, update, num_examples)  # the factor sums
        w = self.client_weight(num_examples)
        for name, layer in adapter_layers(model).items():
            product = update[f"{name}.lora_B"].double() @ update[f"{name}.lora_A"].double()
            acc = self._products.get(name)
            if acc is None:
                self._products[name] = product * w
            else:
                acc.add_(product, alpha=w)

    @no_grad
    def finish(self, model, round_index):
        mean = self.mean_update()
        download = dict(mean)
        for name, layer in adapter_layers(model).items():
            mean_product = self._products[name] / self._total
            product_of_means = mean[f"{name}.lora_B"].double() @ mean[f"{name}.lora_A"].double()
            residual = ((mean_product - product_of_means) * layer.scaling).float()
            _fold(layer, residual)
            download[f"{name}.residual"] = residual
        self.load_global(model, mean)
        self._products = {}
        return download


class Stack(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out, bias=False) for d_out, d_in in shapes)


def tiny_model(shapes, rank, alpha=None, seed=0):
    torch.manual_seed(seed)
    model = Stack(shapes)
    inject_adapters(model, "all-linear", kind="lora", rank=rank, alpha=alpha, train_a=True)
    FedExLoRA(seed=seed).prepare(model)
    mark_trainable(model)
    return model


def client_uploads(model, n_clients, seed):
    """Each client's decoded upload (through the wire, as the server receives it)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    start = trainable_state(model)
    uploads = []
    for _ in range(n_clients):
        state = {k: v + torch.randn(v.shape, generator=g, device="cpu") for k, v in start.items()}
        uploads.append(comm.decode(comm.encode(state))[0])
    return uploads


def held_bytes(obj, seen=None) -> int:
    """Bytes of the distinct tensor storages reachable from `obj` (attributes, dicts, lists, tuples)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, Mapping):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(held_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        return sum(held_bytes(v, seen) for v in vars(obj).values())
    return 0


@pytest.mark.parametrize("weighted", [True, False])
def test_residuals_and_folded_weights_bit_identical_to_dense_running_sum(weighted):
    shapes = [(12, 8), (8, 12), (16, 16)]
    model_new = tiny_model(shapes, rank=3, alpha=7.0, seed=1)
    model_ref = copy.deepcopy(model_new)
    new, ref = FedExLoRA(weighted=weighted, seed=1), DenseProductsFedEx(weighted=weighted, seed=1)
    weights = [5, 1, 17]  # unequal: the order of the weighted sum matters to the bits
    for round_index in range(2):  # the second round starts from the first's folded base
        uploads = client_uploads(model_new, len(weights), seed=10 + round_index)
        downloads = []
        for strategy, model in ((new, model_new), (ref, model_ref)):
            strategy.begin_round(model)
            for update, w in zip(uploads, weights):
                strategy.add(model, update, w)
            downloads.append(strategy.finish(model, round_index))
        got, want = downloads
        assert set(got) == set(want)
        assert sum(k.endswith(".residual") for k in got) == len(shapes)
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
        assert any(bool(v.abs().max() > 0) for k, v in got.items() if k.endswith(".residual"))
        for (name, layer), (_, ref_layer) in zip(adapter_layers(model_new).items(), adapter_layers(model_ref).items()):
            assert torch.equal(layer.base_layer.weight, ref_layer.base_layer.weight), name
        ref_state = trainable_state(model_ref)
        for key, value in trainable_state(model_new).items():
            assert torch.equal(value, ref_state[key]), key


def test_factors_are_copied_on_add():
    """The server keeps what it received even if the caller reuses its tensors after `add`."""
    model = tiny_model([(6, 5)], rank=2, seed=3)
    uploads = client_uploads(model, 2, seed=4)
    want = DenseProductsFedEx(seed=3)
    got = FedExLoRA(seed=3)
    model_ref = copy.deepcopy(model)
    want.begin_round(model_ref)
    got.begin_round(model)
    for update in uploads:
        want.add(model_ref, update, 1)
        got.add(model, update, 1)
        for t in update.values():
            t.zero_()  # the caller overwrites its buffers
    want_down, got_down = want.finish(model_ref, 0), got.finish(model, 0)
    assert torch.equal(got_down["layers.0.residual"], want_down["layers.0.residual"])


D, RANK, CLIENTS = 256, 4, 3
ONE_DENSE_LAYER = D * D * 4  # one fp32 d_out x d_in matrix: 262,144 bytes


def state_between_adds(cls):
    model = tiny_model([(D, D)], rank=RANK, seed=5)
    strategy = cls(seed=5)
    strategy.begin_round(model)
    for update, w in zip(client_uploads(model, CLIENTS, seed=6), [3, 1, 2]):
        strategy.add(model, update, w)
    return strategy, model


def test_state_between_adds_is_the_factors_not_dense_products():
    """After 3 clients at d_out = d_in = 256, rank 4: the received factors (3 x 4 x 512 fp32 =
    24,576 bytes) and their fp64 sums (16,384 bytes), far below one dense layer."""
    strategy, model = state_between_adds(FedExLoRA)
    held = held_bytes(strategy)
    factors = CLIENTS * RANK * (D + D) * 4
    fp64_sums = RANK * (D + D) * 8
    assert held == factors + fp64_sums
    assert held < ONE_DENSE_LAYER
    strategy.finish(model, 0)
    assert held_bytes(strategy) == fp64_sums  # the factors are released by `finish`


def test_the_bound_catches_dense_products():
    """The same measure on the pre-fix accumulation (one fp64 256 x 256 sum: 524,288 bytes)
    exceeds the bound, so the test above fails on that code."""
    strategy, _ = state_between_adds(DenseProductsFedEx)
    assert held_bytes(strategy) >= D * D * 8 > ONE_DENSE_LAYER


# --- comm.decode(..., keys=...): a client decodes the trainable part of a download only ---------

import json  # noqa: E402
import struct  # noqa: E402

import safetensors.torch  # noqa: E402

from fedsb.federated.comm import PayloadError  # noqa: E402


def _payload(tensors, metadata=None):
    return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


@pytest.mark.parametrize("wire", ["fp32", "bf16", "fp16"])
def test_decode_keys_equals_the_full_decode_restricted(wire):
    g = torch.Generator(device="cpu").manual_seed(0)
    tensors = {f"l{i}.lora_A": torch.randn(3, 5 + i, generator=g, device="cpu") for i in range(3)}
    tensors |= {f"l{i}.residual": torch.randn(7, 5 + i, generator=g, device="cpu") for i in range(3)}
    tensors["empty"] = torch.zeros(0, 4, device="cpu")
    data = comm.encode(tensors, wire, metadata={"round": "3"})
    full, meta = comm.decode(data)
    for keys in [set(), {"l0.lora_A"}, {k for k in tensors if not k.endswith(".residual")}, set(tensors), {"l1.lora_A", "absent"}]:
        got, got_meta = comm.decode(data, keys=keys)
        assert got_meta == meta == {"round": "3"}
        assert set(got) == keys & set(full)
        for k, v in got.items():
            assert v.dtype == full[k].dtype == torch.float32 and v.shape == full[k].shape and torch.equal(v, full[k]), k
            v.add_(1)  # writable, and not shared with anything
    assert torch.equal(comm.decode(data, keys=list(tensors))[0]["l2.residual"], full["l2.residual"])


def test_decode_keys_reads_f64_and_never_materializes_the_rest(monkeypatch):
    data = _payload({"a": torch.tensor([1.5, -2.25], dtype=torch.float64), "big": torch.ones(1000, 1000)})
    full, _ = comm.decode(data)

    def boom(*args, **kwargs):
        raise AssertionError("the whole payload was loaded")

    monkeypatch.setattr(safetensors.torch, "load", boom)
    got, _ = comm.decode(data, keys={"a"})
    assert list(got) == ["a"] and torch.equal(got["a"], full["a"]) and got["a"].dtype == torch.float32
    assert got["a"].untyped_storage().nbytes() == 8  # a copy of its own bytes, not a view of the payload


def _raw(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


F32 = lambda lo, hi, n: {"dtype": "F32", "shape": [n], "data_offsets": [lo, hi]}  # noqa: E731


@pytest.mark.parametrize(
    ("payload", "kwargs", "reason"),
    [
        (_raw({"a": F32(0, 8, 2), "b": F32(12, 16, 1)}, b"\0" * 16), {}, "unparsable"),  # a gap
        (_raw({"a": F32(0, 8, 2), "b": F32(4, 12, 2)}, b"\0" * 12), {}, "unparsable"),  # an overlap
        (_raw({"a": F32(0, 8, 2)}, b"\0" * 12), {}, "unparsable"),  # trailing bytes
        (_raw({"a": F32(0, 8, 2)}, b"\0" * 4), {}, "unparsable"),  # short data
        (comm.encode({"x": torch.tensor([1.0, float("nan")])}), {}, "'x' contains NaN or Inf"),
        (comm.encode({"x": torch.ones(2)}), {"expected": {"x": (3,)}}, "'x' has shape"),
        (comm.encode({"i": torch.arange(3)}), {}, "non-float dtype I64"),
        (comm.encode({"x": torch.ones(2)}), {"max_bytes": 10}, "exceeds the limit"),
    ],
    ids=["gap", "overlap", "trailing", "short", "nan", "shape", "int", "too-big"],
)
def test_decode_keys_rejects_what_the_full_decode_rejects(payload, kwargs, reason):
    with pytest.raises(PayloadError, match=reason):
        comm.decode(payload, **kwargs)
    with pytest.raises(PayloadError, match=reason):
        comm.decode(payload, keys={"x", "a", "b", "i"}, **kwargs)


def test_decode_keys_skips_the_finiteness_of_tensors_it_does_not_return():
    data = comm.encode({"x": torch.ones(2), "r": torch.tensor([float("inf")])})
    with pytest.raises(PayloadError):
        comm.decode(data)
    assert torch.equal(comm.decode(data, keys={"x"})[0]["x"], torch.ones(2))


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_client_start_state_from_the_keys_clients_start_from(name):
    """The in-process transport's start state, decoded with keys = the names a client starts
    from, equals the one decoded in full (the change docs/gpu.md proposes for
    `InProcessTransport._updates`): FedEx's residuals and FLoRA's stacks are never decoded."""
    from fedsb.aggregation import get_strategy

    model = tiny_model([(16, 12), (12, 16)], rank=2, seed=7)
    strategy = get_strategy(name)(seed=7)
    strategy.begin_round(model)
    for update, w in zip(client_uploads(model, 3, seed=8), [1, 2, 3]):
        strategy.add(model, update, w)
    data = comm.encode(strategy.finish(model, 0))
    full = strategy.client_start_state(model, comm.decode(data)[0])
    start_keys = [k for k in strategy.download_state(model) if strategy.downloads_start_value(k)]
    decoded = comm.decode(data, keys=start_keys)[0]
    assert set(decoded) == ({k for k in full if "lora" in k} if name == "fedex" else set())
    some = strategy.client_start_state(model, decoded)
    assert set(some) == set(full) and all(torch.equal(some[k], full[k]) for k in full)
