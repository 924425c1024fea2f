"""Prefetch by prediction: the next block's experts are guessed from the hidden state at hand
and read ahead; a guess decides only which bytes are read early, never what is computed.

As in test_experts.py, expert slices that were not read are NaN, so an exact output proves
no guess (right or wrong) ever stood in for a routed expert.
"""

from __future__ import annotations

import threading

import pytest
import torch
from architectures import PROMPT, compare_generation, reference_model
from test_architectures import streaming_budget
from test_experts import MOE, expert_engine

from layerstream.engine.expert_reader import ExpertLease
from layerstream.engine.prediction import ExpertPredictor, find_router

STEPS = 6


def _generate(engine, steps: int = STEPS) -> None:
    with engine.request():
        engine.model.generate(
            torch.tensor([PROMPT]), max_new_tokens=steps, do_sample=False, pad_token_id=0
        )


@pytest.mark.parametrize("name", MOE)
def test_guesses_are_read_ahead_and_the_output_stays_exact(moe_models, name):
    """Every MoE row: a router is found beside each experts module, guesses are made and
    mostly used, and ids and every step's logits stay from_pretrained's."""
    source, store = moe_models(name)
    engine = expert_engine(store, streaming_budget(store))
    try:
        predictor = engine.streamer.predictor
        assert predictor is not None and predictor.routers == len(engine.parts)
        generation = compare_generation(engine, reference_model(source), STEPS)
        assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
        _generate(engine)  # the last install of the request above is released by this one
        stats = engine.streamer.stats
        assert 0 < stats.experts_predicted_used <= stats.experts_predicted
        assert stats.experts_predicted_used <= stats.experts_routed_predicted
    finally:
        engine.close()


def test_the_router_is_the_module_that_chooses(moe_models):
    """The router found is the module whose output holds the indices the experts module
    receives (checked by running the block)."""
    _, store = moe_models("qwen3_moe")
    engine = expert_engine(store, "100%", expert_streaming="off")
    try:
        model = engine.model
        (first, *_) = engine.experts.values()
        router = find_router(model, first)
        assert router is not None
        seen: dict[str, torch.Tensor] = {}

        def chose(module, args, output) -> None:
            seen.setdefault("router", output[-1])

        def received(module, args) -> None:
            seen.setdefault("experts", args[1])

        hooks = [
            model.get_submodule(router.name).register_forward_hook(chose),
            model.get_submodule(first.name).register_forward_pre_hook(received),
        ]
        try:
            with torch.inference_mode():
                model(torch.tensor([PROMPT]))
        finally:
            for hook in hooks:
                hook.remove()
        assert torch.equal(seen["router"], seen["experts"])
    finally:
        engine.close()


def test_wrong_guesses_cost_bytes_never_correctness(moe_models, monkeypatch):
    """Guesses replaced by every expert the router would not choose: nothing guessed is
    used, more is read, and the output is still exact."""
    source, store = moe_models("olmoe")
    right = ExpertPredictor.predict

    def wrong(self, j, group, k, hidden):
        guess = right(self, j, group, k, hidden)
        if guess is None:
            return None
        target, experts = guess
        count = self._routers[k][target].experts.count
        return target, [e for e in range(count) if e not in experts]

    plain = expert_engine(store, streaming_budget(store), expert_prefetch=False)
    try:
        _generate(plain)
        plain_read = plain.streamer.stats.experts_read
    finally:
        plain.close()
    monkeypatch.setattr(ExpertPredictor, "predict", wrong)
    engine = expert_engine(store, streaming_budget(store))
    try:
        generation = compare_generation(engine, reference_model(source), STEPS)
        assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
        _generate(engine)
        stats = engine.streamer.stats
        assert stats.experts_predicted > 0
        assert stats.experts_read > plain_read
    finally:
        engine.close()


def test_without_prefetch_nothing_is_guessed(moe_models):
    _, store = moe_models("mixtral")
    engine = expert_engine(store, streaming_budget(store), expert_prefetch=False)
    try:
        assert engine.streamer.predictor is None
        _generate(engine)
        _generate(engine)
        assert engine.streamer.stats.experts_predicted == 0
    finally:
        engine.close()


def test_a_lease_is_given_back_only_after_its_prefetch_ends(moe_models, monkeypatch):
    """The buffer a guess is being read into is not handed to another block until that
    read has ended (else the read would write into the next block's weights)."""
    _, store = moe_models("qwen3_moe")
    engine = expert_engine(store, streaming_budget(store), read_ahead=0)
    engine.wait_pinned()  # the fill's own buffer use over before the one watched here
    order: list[str] = []
    given_back = threading.Event()
    reader = engine.streamer._reader
    real_release = reader.pool.release
    real_read = reader.read_experts

    def release(buffer):
        order.append("buffer given back")
        given_back.set()
        real_release(buffer)

    def slow_read(lease, data, group, experts):
        # a bug would give the buffer back meanwhile; the fix makes this wait time out
        given_back.wait(timeout=2)
        real_read(lease, data, group, experts)
        order.append("prefetch read done")

    monkeypatch.setattr(reader.pool, "release", release)
    try:
        j = engine.plan.streamed[0]
        lease = engine.streamer.acquire(j)
        assert isinstance(lease, ExpertLease)
        monkeypatch.setattr(reader, "read_experts", slow_read)
        lease.prefetch(0, [0, 1])
        lease.release()
        assert order == ["prefetch read done", "buffer given back"]
    finally:
        monkeypatch.setattr(reader, "read_experts", real_read)
        engine.close()


def test_a_failed_guess_read_is_read_again_by_the_block_that_needs_it(moe_models, monkeypatch):
    """A prefetch whose read fails leaves its experts unread: the block's own request reads
    them (a fresh read, which succeeds) and the output is exact."""
    source, store = moe_models("mixtral")
    engine = expert_engine(store, streaming_budget(store))
    real = ExpertLease._read
    failed: list[int] = []

    def flaky(self, group, experts, future):
        if threading.current_thread().name.startswith("layerstream-prefetch") and not failed:
            failed.append(self.index)
            self._settle(group, experts, future, OSError("connection reset"))
            raise OSError("connection reset")
        return real(self, group, experts, future)

    monkeypatch.setattr(ExpertLease, "_read", flaky)
    try:
        generation = compare_generation(engine, reference_model(source), STEPS)
        assert failed, "no guess was read ahead"
        assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
    finally:
        engine.close()
