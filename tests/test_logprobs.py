"""Log probabilities of generated tokens (inference/logprobs.py): each is ``log_softmax`` of
the scores transformers chose the token from, after every processor and warper, equal to
what ``from_pretrained``'s own ``generate(output_scores=True)`` gives, bit for bit, and asking
for them changes no token."""

from __future__ import annotations

import pytest
import torch

from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import InvalidRequest
from layerstream.inference.generation import run_generation
from layerstream.inference.logprobs import warp_here
from layerstream.inference.request import Request
from layerstream.stores import open_store

IDS = [5, 17, 99, 3, 250, 7, 42, 130]
STEPS = 8
TOP = 5
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3}


def reference_scores(model, **kwargs) -> tuple[list[int], list[torch.Tensor]]:
    """``from_pretrained``'s ids and the scores it chose each from (its warpers applied)."""
    seed = kwargs.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    prompt = torch.tensor([IDS])
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=STEPS,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences[0, len(IDS) :].tolist(), [s[0] for s in out.scores]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("sampling", [{"do_sample": False}, SAMPLING], ids=["greedy", "sampled"])
def test_logprobs_are_those_of_the_scores_transformers_chose_from(model_factory, name, sampling):
    model = model_factory(name)
    expected_ids, scores = reference_scores(model.resident(), **sampling)
    engine = Engine(open_store(str(model.store)), EngineOptions("25%", read_ahead=1))
    try:
        request = Request(mode="tokens", max_new_tokens=STEPS, logprobs=TOP, **sampling)
        events: list = []
        run_generation(engine, request, IDS, events.append, lambda: False)
        plain: list = []
        run_generation(
            engine,
            Request(mode="tokens", max_new_tokens=STEPS, **sampling),
            IDS,
            plain.append,
            lambda: False,
        )
    finally:
        engine.close()
    assert [e.token_id for e in events] == [e.token_id for e in plain]  # asking changes nothing
    assert [e.token_id for e in events][: len(expected_ids)] == expected_ids
    for event, row in zip(events, scores, strict=False):
        logprobs = torch.log_softmax(row.float(), dim=-1)
        assert event.logprob == float(logprobs[event.token_id])
        values, ids = torch.topk(logprobs, TOP)
        assert event.top_logprobs == tuple(zip(ids.tolist(), values.tolist(), strict=True))
    if sampling["do_sample"]:  # top-p and top-k left most tokens out: -inf, never chosen
        assert all(e.logprob > float("-inf") for e in events)


def test_no_top_logprobs_gives_the_chosen_token_only(model_factory):
    model = model_factory("llama")
    engine = Engine(open_store(str(model.store)), EngineOptions("100%"))
    try:
        events: list = []
        request = Request(mode="tokens", max_new_tokens=3, logprobs=0, do_sample=False)
        run_generation(engine, request, IDS, events.append, lambda: False)
    finally:
        engine.close()
    assert all(e.logprob is not None and e.logprob <= 0 and e.top_logprobs == () for e in events)


def test_a_watermarking_config_is_refused():
    from transformers import GenerationConfig, LogitsProcessorList
    from transformers.generation import WatermarkingConfig

    config = GenerationConfig(watermarking_config=WatermarkingConfig())
    with pytest.raises(InvalidRequest, match="watermarking"):
        warp_here(config, LogitsProcessorList())
