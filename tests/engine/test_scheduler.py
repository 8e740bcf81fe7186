"""The scheduler on the real engine: batching without cross-talk, cancellation, admission, faults, stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rwkv_gateway.domain.types import Finish, FinishReason, GenerationRequest, SamplingParams, TextDelta
from rwkv_gateway.engine import admission as admission_mod
from rwkv_gateway.engine.backend_batched_v7 import BatchedRwkv7Backend
from rwkv_gateway.engine.backend_rwkv import RwkvPackageBackend
from rwkv_gateway.engine.sampler import Sampler
from rwkv_gateway.engine.scheduler import EngineConfig, Scheduler
from rwkv_gateway.engine.snapshot import StateSnapshot
from rwkv_gateway.engine.states import StateStore
from rwkv_gateway.engine.tokenizer import Tokenizer
from rwkv_gateway.errors import (
    ConfigError,
    InvalidParameter,
    NotReady,
    PromptTooLong,
    ServerBusy,
    StateMismatch,
)

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module", params=["package", "batched"])
def v7_backend(
    request: pytest.FixtureRequest, v7_backend: RwkvPackageBackend, v7_path: Path
) -> RwkvPackageBackend | BatchedRwkv7Backend:
    """Every scheduler test (and the `engine` fixture) runs on both backends: the `rwkv` package's
    loop over the rows (v4-v6, or RWKV_GATEWAY_BACKEND=package) and the batched RWKV-7 backend that
    serves v7 checkpoints in production."""
    if request.param == "package":
        return v7_backend
    return BatchedRwkv7Backend.load(v7_path, "cpu fp32")


PROMPT = "User: Write a short poem about rivers.\n\nAssistant:"


async def run(engine: Scheduler, **kwargs: object) -> tuple[str, Finish]:
    req = GenerationRequest(**{"prompt": PROMPT, "sampling": GREEDY, "max_tokens": 24, **kwargs})  # type: ignore[arg-type]
    stream = await engine.submit(req)
    return await stream.collect()


async def test_concurrent_greedy_requests_match_a_lone_request(engine: Scheduler) -> None:
    alone, fin = await run(engine)
    assert fin.reason is FinishReason.LENGTH and fin.usage.completion_tokens == 24
    assert alone
    results = await asyncio.gather(*(run(engine) for _ in range(8)))
    assert [text for text, _ in results] == [alone] * 8
    assert engine.stats()["active_sequences"] == 0


async def test_mixed_prompts_interleave_without_cross_talk(engine: Scheduler) -> None:
    prompts = [PROMPT, "Q: 1+1=?\n\nA:", "The history of " * 20]
    alone = [await run(engine, prompt=p, max_tokens=10) for p in prompts]
    together = await asyncio.gather(*(run(engine, prompt=p, max_tokens=10) for p in prompts * 2))
    assert [t for t, _ in together] == [t for t, _ in alone] * 2


async def test_stream_events_are_whole_text_and_end_with_finish(engine: Scheduler) -> None:
    stream = await engine.submit(GenerationRequest(prompt=PROMPT, sampling=GREEDY, max_tokens=16))
    events = [e async for e in stream]
    assert isinstance(events[-1], Finish)
    assert all(isinstance(e, TextDelta) for e in events[:-1])
    assert all("\ufffd" not in e.text for e in events[:-1] if isinstance(e, TextDelta))
    assert events[-1].usage.prompt_tokens == stream.prompt_token_count > 0


async def test_cancelled_stream_frees_its_slot(v7_backend: RwkvPackageBackend, tokenizer: Tokenizer) -> None:
    sched = Scheduler(v7_backend, tokenizer, EngineConfig(max_batch_size=1, queue_size=4))
    await sched.start()
    try:
        long = await sched.submit(GenerationRequest(prompt=PROMPT, sampling=GREEDY, max_tokens=4000))
        got = 0
        async for event in long:
            if isinstance(event, TextDelta):
                got += 1
            if got == 3:
                long.cancel()
            if isinstance(event, Finish):
                assert event.reason is FinishReason.CANCELLED
                assert event.usage.completion_tokens < 4000
        # The only slot is free again: a new request runs to completion.
        _, fin = await run(sched, max_tokens=5)
        assert fin.reason is FinishReason.LENGTH
        assert sched.stats()["active_sequences"] == 0
    finally:
        await sched.aclose()


async def test_abandoned_iteration_cancels(engine: Scheduler) -> None:
    stream = await engine.submit(GenerationRequest(prompt=PROMPT, sampling=GREEDY, max_tokens=4000))
    agen = stream.__aiter__()
    await agen.__anext__()
    await agen.aclose()  # what a dropped client's response generator does
    assert stream.cancelled
    for _ in range(200):
        if engine.stats()["active_sequences"] == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats()["active_sequences"] == 0


async def test_full_queue_raises_server_busy(v7_backend: RwkvPackageBackend, tokenizer: Tokenizer) -> None:
    sched = Scheduler(v7_backend, tokenizer, EngineConfig(max_batch_size=1, queue_size=1))
    await sched.start()
    try:
        ids = tokenizer.encode(PROMPT)
        # prompt_tokens needs no tokenizer hop, so both submits run before the scheduler admits anything.
        first = await sched.submit(GenerationRequest(prompt_tokens=ids, sampling=GREEDY, max_tokens=3))
        with pytest.raises(ServerBusy) as busy:
            await sched.submit(GenerationRequest(prompt_tokens=ids, sampling=GREEDY, max_tokens=3))
        assert busy.value.retry_after > 0
        _, fin = await first.collect()
        assert fin.reason is FinishReason.LENGTH
        assert sched.stats()["rejected_busy"] == 1
    finally:
        await sched.aclose()


async def test_a_failing_sampler_fails_alone(engine: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    class FaultySampler(Sampler):
        def sample(self, logits):  # type: ignore[no-untyped-def]
            if self.params.seed == 666:
                raise RuntimeError("injected sampling fault")
            return super().sample(logits)

    monkeypatch.setattr(admission_mod, "Sampler", FaultySampler)
    good = [run(engine) for _ in range(3)]
    bad = run(engine, sampling=SamplingParams(temperature=0, seed=666))
    results = await asyncio.gather(bad, *good)
    assert results[0][1].reason is FinishReason.ERROR
    assert "injected sampling fault" in (results[0][1].error or "")
    assert all(fin.reason is FinishReason.LENGTH for _, fin in results[1:])
    assert len({text for text, _ in results[1:]}) == 1
    _, fin = await run(engine, max_tokens=3)  # the worker keeps serving
    assert fin.reason is FinishReason.LENGTH


async def test_stop_string_is_never_leaked(engine: Scheduler) -> None:
    full, _ = await run(engine, max_tokens=40)
    assert len(full) > 6
    stop = full[4:7]
    text, fin = await run(engine, max_tokens=40, stop=(stop,))
    assert fin.reason is FinishReason.STOP and fin.stop_matched == stop
    assert text == full[: full.index(stop)]
    assert stop not in text


async def test_stop_token_ids_end_the_sequence(engine: Scheduler, tokenizer: Tokenizer) -> None:
    stream = await engine.submit(GenerationRequest(prompt=PROMPT, sampling=GREEDY, max_tokens=20))
    tokens = [t for e in [e async for e in stream] if isinstance(e, TextDelta) for t in e.token_ids]
    third = tokens[2]
    first_hit = tokens.index(third)
    _, fin = await run(engine, max_tokens=20, stop_token_ids=frozenset({third}))
    assert fin.reason is FinishReason.STOP and fin.stop_matched == third
    assert fin.usage.completion_tokens == first_hit + 1


async def test_max_tokens_zero_and_timeout(engine: Scheduler) -> None:
    text, fin = await run(engine, max_tokens=0)
    assert (text, fin.reason, fin.usage.completion_tokens) == ("", FinishReason.LENGTH, 0)
    text, fin = await run(engine, max_tokens=4000, timeout_s=0.3)
    assert fin.reason is FinishReason.TIMEOUT
    assert 0 < fin.usage.completion_tokens < 4000


async def test_bad_requests_are_rejected_at_submit(engine: Scheduler) -> None:
    with pytest.raises(InvalidParameter, match="empty"):
        await engine.submit(GenerationRequest(prompt=""))
    with pytest.raises(InvalidParameter, match="max_tokens"):
        await engine.submit(GenerationRequest(prompt="hi", max_tokens=10**9))
    with pytest.raises(InvalidParameter, match="temperature"):
        await engine.submit(GenerationRequest(prompt="hi", sampling=SamplingParams(temperature=float("nan"))))
    with pytest.raises(InvalidParameter, match="token ids"):
        await engine.submit(GenerationRequest(prompt_tokens=[1, 70000]))
    with pytest.raises(PromptTooLong):
        await engine.submit(GenerationRequest(prompt_tokens=[5] * (engine.config.max_prompt_tokens + 1)))


async def test_final_state_continues_like_one_long_request(engine: Scheduler) -> None:
    # Generate 10 tokens and keep the state, then 10 more from it: same text as 20 in one go.
    whole, _ = await run(engine, max_tokens=20)
    first, fin = await run(engine, max_tokens=10, return_state=True)
    assert isinstance(fin.state, StateSnapshot)
    stream = await engine.submit(
        GenerationRequest(prompt=None, initial_state=fin.state, sampling=GREEDY, max_tokens=10)
    )
    second, fin2 = await stream.collect()
    assert first + second == whole
    assert fin2.usage.prompt_tokens == 0


async def test_prompt_continues_from_a_snapshot(engine: Scheduler, tokenizer: Tokenizer) -> None:
    a, b = "User: hello there\n\n", "Assistant:"
    whole, _ = await run(engine, prompt=a + b, max_tokens=12)
    _, fin = await run(engine, prompt=a, max_tokens=0, return_state=True)
    assert fin.state is not None and fin.state.token_count == len(tokenizer.encode(a))
    text, fin2 = await run(engine, prompt=b, initial_state=fin.state, max_tokens=12)
    assert text == whole
    assert fin2.usage.prompt_tokens == len(tokenizer.encode(b))


async def test_snapshot_of_another_model_is_refused(
    engine: Scheduler, v4_backend: RwkvPackageBackend
) -> None:
    _, states = v4_backend.forward([[1, 2]], [None])
    foreign = v4_backend.capture(states[0], 2)
    with pytest.raises(StateMismatch):
        await engine.submit(GenerationRequest(prompt="x", initial_state=foreign))


async def test_v4_model_generates_through_the_engine(
    v4_backend: RwkvPackageBackend, tokenizer: Tokenizer
) -> None:
    sched = Scheduler(v4_backend, tokenizer, EngineConfig())
    await sched.start()
    try:
        a = await run(sched, max_tokens=8)
        b = await asyncio.gather(run(sched, max_tokens=8), run(sched, max_tokens=8))
        assert a[0] and [t for t, _ in b] == [a[0], a[0]]
    finally:
        await sched.aclose()


async def test_long_prompt_does_not_freeze_decoding(
    v7_backend: RwkvPackageBackend, tokenizer: Tokenizer
) -> None:
    # Without prompt priority, every step runs both (with it, decoding waits at most that long).
    config = EngineConfig(prefill_chunk=8, prefill_budget=8, prefill_priority_s=0)
    sched = Scheduler(v7_backend, tokenizer, config)
    await sched.start()
    try:
        short = await sched.submit(GenerationRequest(prompt="Hi", sampling=GREEDY, max_tokens=30))
        long_ids = tokenizer.encode("lorem ipsum dolor sit amet " * 60)
        long = await sched.submit(GenerationRequest(prompt_tokens=long_ids, sampling=GREEDY, max_tokens=1))
        order: list[str] = []

        async def drain(name: str, stream: object) -> None:
            async for event in stream:  # type: ignore[attr-defined]
                if isinstance(event, Finish):
                    order.append(name)

        await asyncio.gather(drain("short", short), drain("long", long))
        # The long prompt needs ~len/8 steps of prefill; the short one finishes its 30 tokens first.
        assert order == ["short", "long"]
    finally:
        await sched.aclose()


async def test_prompts_go_before_decoding_within_the_priority_window(
    v7_backend: RwkvPackageBackend, tokenizer: Tokenizer
) -> None:
    """With a priority window longer than the whole prompt, a decoding stream waits while a long prompt
    is prefilled (its first token is not held behind decode steps), then resumes unchanged."""
    alone_sched = Scheduler(v7_backend, tokenizer, EngineConfig())
    await alone_sched.start()
    try:
        alone, _ = await (
            await alone_sched.submit(GenerationRequest(prompt="Hi", sampling=GREEDY, max_tokens=30))
        ).collect()
    finally:
        await alone_sched.aclose()
    config = EngineConfig(prefill_chunk=8, prefill_budget=8, prefill_priority_s=60)
    sched = Scheduler(v7_backend, tokenizer, config)
    await sched.start()
    try:
        short = aiter(await sched.submit(GenerationRequest(prompt="Hi", sampling=GREEDY, max_tokens=30)))
        first = await anext(short)
        assert isinstance(first, TextDelta)
        long_ids = tokenizer.encode("lorem ipsum dolor sit amet " * 60)
        long = await sched.submit(GenerationRequest(prompt_tokens=long_ids, sampling=GREEDY, max_tokens=1))
        order: list[str] = []
        parts = [first.text]

        async def drain(name: str, stream: object) -> None:
            async for event in stream:  # type: ignore[attr-defined]
                if isinstance(event, Finish):
                    order.append(name)
                elif name == "short":
                    parts.append(event.text)

        await asyncio.gather(drain("short", short), drain("long", long))
        assert order == ["long", "short"]  # "Hi" was decoding when the prompt came: it waited
        assert "".join(parts) == alone
    finally:
        await sched.aclose()


async def test_a_continuation_from_a_snapshot_gets_its_first_token_before_the_next_forward(
    v7_backend: RwkvPackageBackend, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that starts from a state with logits needs no forward for its first token: it is
    sampled and sent before the step that prefills a prompt admitted with it."""
    sched = Scheduler(v7_backend, tokenizer, EngineConfig(prefill_chunk=8, prefill_budget=8))
    await sched.start()
    try:
        _, fin = await (
            await sched.submit(
                GenerationRequest(prompt=PROMPT, sampling=GREEDY, max_tokens=4, return_state=True)
            )
        ).collect()
        assert isinstance(fin.state, StateSnapshot) and fin.state.logits is not None
        real = v7_backend.forward
        waiting_at_forward: list[int] = []  # events the continuation had received when a forward began

        def watching(*args: object, **kwargs: object) -> object:
            waiting_at_forward.append(cont._queue.qsize())  # type: ignore[attr-defined]
            return real(*args, **kwargs)  # type: ignore[arg-type]

        long_ids = tokenizer.encode("lorem ipsum dolor sit amet " * 20)
        monkeypatch.setattr(v7_backend, "forward", watching)
        long, cont = await sched.submit_many(
            [
                GenerationRequest(prompt_tokens=long_ids, sampling=GREEDY, max_tokens=1),
                GenerationRequest(initial_state=fin.state, sampling=GREEDY, max_tokens=3),
            ]
        )
        await long.collect()
        text, end = await cont.collect()
        assert waiting_at_forward[0] >= 1  # its first token was out before the first prompt chunk ran
        assert end.reason is FinishReason.LENGTH and end.usage.completion_tokens == 3 and text
    finally:
        await sched.aclose()


async def test_sampling_seed_reproduces(engine: Scheduler) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    a, _ = await run(engine, sampling=params, max_tokens=20)
    b, _ = await run(engine, sampling=params, max_tokens=20)
    c, _ = await run(engine, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=99), max_tokens=20)
    assert a == b
    assert a != c


async def test_close_ends_running_and_waiting_streams(
    v7_backend: RwkvPackageBackend, tokenizer: Tokenizer
) -> None:
    sched = Scheduler(v7_backend, tokenizer, EngineConfig(max_batch_size=1, queue_size=4))
    await sched.start()
    running = await sched.submit(GenerationRequest(prompt=PROMPT, sampling=GREEDY, max_tokens=4000))
    waiting = await sched.submit(GenerationRequest(prompt=PROMPT, sampling=GREEDY, max_tokens=4000))
    agen = running.__aiter__()
    first = await agen.__anext__()  # the first request is being generated
    assert isinstance(first, TextDelta)
    await sched.aclose()
    rest = [e async for e in agen]
    assert isinstance(rest[-1], Finish) and rest[-1].reason is FinishReason.CANCELLED
    _, fin = await waiting.collect()
    assert fin.reason is FinishReason.CANCELLED and fin.usage.completion_tokens == 0
    with pytest.raises(NotReady):
        await sched.submit(GenerationRequest(prompt="hi"))


async def test_an_idle_queue_takes_a_whole_group(
    v7_backend: RwkvPackageBackend, tokenizer: Tokenizer
) -> None:
    # One client call that fans out (n choices, many embedding inputs) is admitted whole by an idle
    # server, whatever the queue size; with requests already waiting, the bound applies again.
    sched = Scheduler(v7_backend, tokenizer, EngineConfig(max_batch_size=2, queue_size=1))
    await sched.start()
    try:
        group = [GenerationRequest(prompt_tokens=[1, 2, 3], sampling=GREEDY, max_tokens=2) for _ in range(5)]
        streams = await sched.submit_many(group)
        with pytest.raises(ServerBusy):
            await sched.submit_many(group[:2])
        results = [await s.collect() for s in streams]
        assert len({text for text, _ in results}) == 1
        assert all(fin.reason is FinishReason.LENGTH for _, fin in results)
        vectors = await sched.embed(["a", "b", "c", "a"])
        assert vectors[0] == vectors[3] and vectors[0] != vectors[1]
        assert all(abs(sum(x * x for x in v) - 1.0) < 1e-5 for v, _ in vectors)
    finally:
        await sched.aclose()


async def test_concurrent_identical_prefixes_are_prefilled_once(
    v7_backend: RwkvPackageBackend, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    store = StateStore(tmp_path, budget_bytes=1 << 30, model_id=v7_backend.info.model_id)
    sched = Scheduler(v7_backend, tokenizer, EngineConfig(prefill_chunk=16, prefill_budget=64), states=store)
    await sched.start()
    try:
        system = "System: " + "a shared and rather long instruction block " * 12 + "\n\n"
        requests = [
            GenerationRequest(
                prompt_segments=(system, f"User: question {i}\n\n", "Assistant:"),
                sampling=GREEDY,
                max_tokens=3,
            )
            for i in range(4)
        ]
        results = await asyncio.gather(*(s.collect() for s in await sched.submit_many(requests)))
        shared = len(tokenizer.encode(system))
        cached = sorted(fin.usage.cached_tokens for _, fin in results)
        assert cached == [0, shared, shared, shared]
        total_prompt = sum(fin.usage.prompt_tokens for _, fin in results)
        assert sched.stats()["prompt_tokens"] == total_prompt - 3 * shared
        # The same answers as without the cache.
        plain = Scheduler(v7_backend, tokenizer, EngineConfig(prefix_cache=False), states=None)
        await plain.start()
        try:
            for (text, _), req in zip(results, requests, strict=True):
                alone, _ = await (await plain.submit(req)).collect()
                assert text == alone
        finally:
            await plain.aclose()
    finally:
        await sched.aclose()


async def test_a_reply_follow_up_gives_its_slot_to_a_waiting_request(
    v7_backend: RwkvPackageBackend, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """The prefill of a reply for the next turn's cache is background work: with every slot taken, a
    new request gets the follow-up's slot instead of waiting for it to finish."""
    store = StateStore(tmp_path, budget_bytes=1 << 30, model_id=v7_backend.info.model_id)
    config = EngineConfig(max_batch_size=1, prefill_chunk=8, prefill_budget=8)
    sched = Scheduler(v7_backend, tokenizer, config, states=store)
    await sched.start()
    try:
        long_followup = GenerationRequest(
            prompt_segments=("User: hello\n\n", "Assistant:"),
            sampling=GREEDY,
            max_tokens=4,
            reply_followup=lambda reply: f" {reply} " + "and so on " * 400,
        )
        _, first = await (await sched.submit(long_followup)).collect()
        assert first.reason is FinishReason.LENGTH
        text, second = await run(sched, max_tokens=4)
        assert second.reason is FinishReason.LENGTH and text
        stats = sched.stats()
        assert stats["followups_dropped"] == 1
        assert stats["followup_tokens"] < len(tokenizer.encode("and so on " * 400))
    finally:
        await sched.aclose()


async def test_live_state_budget_limits_running_sequences(
    v7_backend: RwkvPackageBackend, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_state = v7_backend.state_nbytes
    config = EngineConfig(max_batch_size=8, queue_size=16, live_state_bytes=2 * 2 * per_state + 1)
    sched = Scheduler(v7_backend, tokenizer, config)
    assert sched.max_active == 2
    widths: list[int] = []
    real_step = Scheduler._step

    def step(self: Scheduler, batch: list[object], first_tokens: bool = False) -> None:
        widths.append(len(batch))
        real_step(self, batch, first_tokens)  # type: ignore[arg-type]

    monkeypatch.setattr(Scheduler, "_step", step)
    await sched.start()
    try:
        alone, _ = await run(sched, max_tokens=6)
        results = await asyncio.gather(*(run(sched, max_tokens=6) for _ in range(5)))
        assert [text for text, _ in results] == [alone] * 5  # the others waited, none was refused
        assert max(widths) == 2
        assert sched.stats()["max_active"] == 2
    finally:
        await sched.aclose()
    with pytest.raises(ConfigError, match="holds no sequence"):
        Scheduler(v7_backend, tokenizer, EngineConfig(live_state_bytes=per_state))


async def test_text_deltas_carry_every_sampled_token(engine: Scheduler, tokenizer: Tokenizer) -> None:
    stream = await engine.submit(GenerationRequest(prompt=PROMPT, sampling=GREEDY, max_tokens=40))
    ids: list[int] = []
    text = ""
    async for event in stream:
        if isinstance(event, TextDelta):
            ids += event.token_ids
            text += event.text
            assert tokenizer.decode(list(event.token_ids)) == event.text
        else:
            assert event.usage.completion_tokens == len(ids)
    assert tokenizer.decode(ids) == text
