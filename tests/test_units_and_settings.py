from __future__ import annotations

import pytest

from layerstream.errors import SettingsError
from layerstream.settings import LayerStreamSettings
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
