from __future__ import annotations

import pytest

from layerstream.errors import SettingsError
from layerstream.serving.settings import LayerStreamSettings
from layerstream.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("2GB", 2 * 10**9),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("100", 100),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_percent_needs_a_reference():
    assert parse_size("25%", reference=1000) == 250
    with pytest.raises(ValueError, match="percentage"):
        parse_size("25%")


@pytest.mark.parametrize("bad", ["12XB", "lots", "-5", True])
def test_parse_size_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size():
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 2**30) == "3.0 GiB"


def test_settings_accept_strings_as_seldon_sends_them():
    settings = LayerStreamSettings.from_extra(
        {
            "chunk_store": "./chunks",
            "read_ahead": "3",
            "verify_checksums": "off",
            "memory_budget": "25%",
        }
    )
    assert settings.read_ahead == 3
    assert settings.verify_checksums == "off"
    assert settings.memory_budget == "25%"


def test_settings_reject_unknown_names_and_bad_values():
    with pytest.raises(SettingsError) as err:
        LayerStreamSettings.from_extra(
            {"chunk_store": "x", "memory_budgte": "1GiB", "read_ahead": -1}
        )
    message = str(err.value)
    assert "memory_budgte" in message and "read_ahead" in message
    assert "Known settings" in message and "memory_budget" in message


def test_settings_require_a_chunk_store():
    with pytest.raises(SettingsError, match="chunk_store"):
        LayerStreamSettings.from_extra({})


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("MLSERVER_MODEL_LAYERSTREAM_IO_THREADS", "5")
    assert LayerStreamSettings.from_extra({"chunk_store": "x"}).io_threads == 5


def test_tuning_defaults_follow_the_machine_and_the_plan(monkeypatch):
    from layerstream.engine import sysinfo, tuning

    assert tuning.read_ahead("auto") == 1
    assert tuning.read_ahead(0) == 0
    assert tuning.io_threads("auto", planned_read_ahead=3) == 3
    assert tuning.io_threads("auto", planned_read_ahead=0) == 1  # resident loads still read
    assert tuning.io_threads(4, planned_read_ahead=1) == 4
    monkeypatch.setattr(tuning, "cpu_count", lambda: 3)
    assert tuning.torch_threads("auto") == 3
    assert tuning.torch_threads(1) == 1
    assert 1 <= sysinfo.cpu_count() <= (len(__import__("os").sched_getaffinity(0)))


def test_cpu_quota_from_cgroup_v1_and_v2(tmp_path):
    from layerstream.engine.sysinfo import _cpu_quota

    v2 = tmp_path / "v2"
    (v2 / "pod" / "app").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    (v2 / "pod" / "cpu.max").write_text("250000 100000\n")
    (v2 / "pod" / "app" / "cpu.max").write_text("max 100000\n")
    # the tightest quota on the process's cgroup or an ancestor; 2.5 CPUs round up
    assert _cpu_quota("0::/pod/app\n", v2) == 3
    assert _cpu_quota("0::/\n", v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "job").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cpu_quota("4:cpu,cpuacct:/job\n0::/\n", v1) == 2
    assert _cpu_quota("4:cpu,cpuacct:/\n", v1) is None


def test_memory_limits_come_from_the_process_own_nested_cgroup(tmp_path):
    """The benchmark's cold runs (and systemd slices) put the process in a nested cgroup:
    its limit is in that cgroup's directory, not at the hierarchy's root."""
    from layerstream.engine.sysinfo import cgroup_dirs

    (tmp_path / "memory" / "bench" / "run").mkdir(parents=True)
    dirs, v2 = cgroup_dirs("memory", "9:memory:/bench/run\n0::/\n", tmp_path)
    assert not v2
    assert dirs == [
        tmp_path / "memory" / "bench" / "run",
        tmp_path / "memory" / "bench",
        tmp_path / "memory",
    ]
    # a path from outside our cgroup namespace: only the mount is ours
    dirs, _ = cgroup_dirs("memory", "9:memory:/elsewhere\n", tmp_path)
    assert dirs == [tmp_path / "memory"]
    assert cgroup_dirs("memory", "1:cpu:/\n", tmp_path) == ([], False)


def test_auto_knobs_are_the_settings_defaults():
    settings = LayerStreamSettings.from_extra({"chunk_store": "x"})
    assert (settings.read_ahead, settings.io_threads, settings.torch_threads) == ("auto",) * 3
    with pytest.raises(SettingsError, match=r"read_ahead: .* or Input should be 'auto'"):
        LayerStreamSettings.from_extra({"chunk_store": "x", "read_ahead": "many"})


def test_streamed_chunks_leave_the_page_cache_only_when_it_cannot_hold_them(
    model_factory, monkeypatch
):
    from layerstream.engine import tuning
    from layerstream.engine.plan import plan_residency
    from layerstream.format.manifest import Manifest

    store = model_factory("llama").store
    manifest = Manifest.from_json((store / "manifest.json").read_text())
    streaming = plan_residency(manifest, manifest.total_bytes // 4, read_ahead=1)
    resident = plan_residency(manifest, manifest.total_bytes, read_ahead=1)
    monkeypatch.setattr(tuning, "resident_set", lambda: 100 << 20)
    monkeypatch.setattr(tuning, "memory_limit", lambda: 64 << 30)  # a roomy machine
    assert not tuning.evict_after_use(manifest, streaming)
    monkeypatch.setattr(tuning, "memory_limit", lambda: (100 << 20) + manifest.total_bytes // 2)
    assert tuning.evict_after_use(manifest, streaming)  # a box smaller than the model
    assert not tuning.evict_after_use(manifest, resident)  # nothing streams


def test_remote_store_settings_as_seldon_sends_them(monkeypatch):
    monkeypatch.setenv("MLSERVER_MODEL_LAYERSTREAM_HTTP_BEARER_TOKEN", "t0ken")
    settings = LayerStreamSettings.from_extra(
        {
            "chunk_store": "https://models.example/llama",
            "store_deadline_s": "12.5",
            "store_max_concurrency": "16",
            "store_part_size": "4MiB",
            "http_headers": '{"X-Team": "serving"}',
            "http_verify_tls": "true",
            "cache_dir": "/var/cache/layerstream",
            "cache_size": "20GiB",
        }
    )
    options = settings.store_options()
    assert options.deadline_s == 12.5 and options.max_concurrency == 16
    assert options.part_bytes == 4 << 20 and options.cache_bytes == 20 << 30
    assert options.headers == {"X-Team": "serving"} and options.bearer_token == "t0ken"
    # the token never shows in a repr or a log line of the settings or the options
    assert "t0ken" not in repr(settings) and "t0ken" not in repr(options)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"http_headers": "{not json"}, ["http_headers", "not a JSON object"]),
        ({"store_part_size": "25%"}, ["store_part_size", "percentage"]),
        ({"store_deadline_s": "0"}, ["store_deadline_s"]),
        ({"s3_addressing_style": "sideways"}, ["s3_addressing_style", "path", "virtual"]),
        ({"verify_checksums": "off"}, ["verify_checksums='off' is for local stores only"]),
    ],
)
def test_bad_remote_store_settings_are_refused(extra, words):
    with pytest.raises(SettingsError) as err:
        LayerStreamSettings.from_extra({"chunk_store": "s3://bucket/model"} | extra)
    for word in words:
        assert word in str(err.value)


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_retry_policy_backs_off_with_jitter_until_the_deadline():
    from layerstream.errors import ChunkStoreError
    from layerstream.stores.ranged import RetryPolicy, Transient

    fake = FakeClock()
    policy = RetryPolicy(deadline_s=10.0, base_delay_s=0.1, max_delay_s=2.0)
    policy.clock, policy.sleep = fake.clock, fake.sleep
    calls = []

    def flaky():
        calls.append(fake.now)
        fake.now += 0.5  # each attempt takes half a second
        raise Transient("HTTP 503")

    with pytest.raises(ChunkStoreError, match=r"x: gave up after \d+ attempt\(s\).*HTTP 503"):
        policy.run(flaky, "x")
    assert fake.now <= 10.0 + 0.5  # never sleeps past the deadline
    assert all(0 <= s <= 2.0 for s in fake.sleeps)  # capped
    assert len(calls) >= 5


def test_retry_policy_does_not_retry_permanent_errors_and_returns_successes():
    from layerstream.stores.ranged import Permanent, RetryPolicy, Transient

    fake = FakeClock()
    policy = RetryPolicy(deadline_s=10.0)
    policy.clock, policy.sleep = fake.clock, fake.sleep
    with pytest.raises(Permanent, match="missing"):
        policy.run(lambda: (_ for _ in ()).throw(Permanent("missing")), "x")
    assert fake.sleeps == []
    outcomes = iter([Transient("reset"), Transient("reset"), "ok"])

    def twice_then_ok():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert policy.run(twice_then_ok, "x") == "ok" and len(fake.sleeps) == 2


def test_content_range_parsing():
    from layerstream.stores.ranged import Transient, parse_content_range

    assert parse_content_range("bytes 0-99/1000", "x") == (0, 99, 1000)
    with pytest.raises(Transient):
        parse_content_range("bytes */1000", "x")
    with pytest.raises(Transient):
        parse_content_range(None, "x")


def test_request_deadline_and_prompt_limit_settings():
    default = LayerStreamSettings.from_extra({"chunk_store": "x"})
    assert default.request_timeout_s == 600.0  # bounds abandoned unary work by default
    assert default.max_prompt_bytes == "auto"
    seldon = LayerStreamSettings.from_extra(
        {"chunk_store": "x", "request_timeout_s": "30", "max_prompt_bytes": "4096"}
    )
    assert (seldon.request_timeout_s, seldon.max_prompt_bytes) == (30.0, 4096)
    for bad in ({"request_timeout_s": 0}, {"request_timeout_s": "never"}, {"max_prompt_bytes": 0}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            LayerStreamSettings.from_extra({"chunk_store": "x", **bad})


def test_prompt_limit_is_a_bound_for_a_byte_level_tokenizer(model_factory):
    """A prompt over the limit cannot fit the context: every token of a byte-level BPE
    stands for at most the longest token's bytes."""
    import random

    from transformers import AutoTokenizer

    from layerstream.inference.prompts import longest_token_bytes, prompt_byte_limit

    tokenizer = AutoTokenizer.from_pretrained(model_factory("gpt2").store)
    context = 128
    limit = prompt_byte_limit(tokenizer, context, "auto")
    assert limit.max_bytes == (context + 1) * longest_token_bytes(tokenizer)
    assert "context of 128 tokens" in limit.reason
    rng = random.Random(0)
    vocab = [t for t in tokenizer.get_vocab() if t.isascii() and t.isalpha()]
    for _ in range(5):  # the most favourable text: the longest tokens, back to back
        text = "".join(rng.choice(sorted(vocab, key=len)[-20:]) for _ in range(limit.max_bytes))
        text = text[: limit.max_bytes + 1]
        assert len(tokenizer(text)["input_ids"]) > context
    assert prompt_byte_limit(tokenizer, None, "auto").max_bytes == 2**20
    assert prompt_byte_limit(tokenizer, context, 500).max_bytes == 500
    assert prompt_byte_limit(None, context, "auto") is None


def test_the_client_knows_the_servers_parameters_and_error_kinds():
    """The client package cannot import the runtime (it has no torch): its copies of the
    request parameters and the error kinds are tied to the server's here."""
    from layerstream.errors import ERROR_TYPES
    from layerstream.serving.parameters import KNOWN_PARAMETERS
    from layerstream_client import events

    assert set(events._PARAMS) == set(KNOWN_PARAMETERS)
    assert events.ERROR_TYPES == ERROR_TYPES
