"""A hub id without network fails at once with what to do, instead of a minute of retries."""
from __future__ import annotations

import socket
import time

import pytest

from activations import model_loading
from activations.model_loading import hub_load_options, hub_reachable, load_model


@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def refuse(address, timeout=None, *args, **kwargs):
        calls.append((address, timeout))
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_unreachable_hub_and_no_cache_fails_fast_with_a_hint(no_network, monkeypatch) -> None:
    monkeypatch.setattr(model_loading, "_is_cached", lambda repo: False)
    began = time.perf_counter()
    with pytest.raises(ValueError) as info:
        load_model("gpt2")
    message = str(info.value)
    assert time.perf_counter() - began < 5.0
    assert "cannot load model 'gpt2'" in message and "hub cannot be reached" in message
    assert "local model folder" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message
    assert no_network and no_network[0][1] <= 5.0  # one short connection attempt


def test_unreachable_hub_with_a_cached_model_loads_from_the_cache(no_network, monkeypatch) -> None:
    monkeypatch.setattr(model_loading, "_is_cached", lambda repo: True)
    assert hub_load_options("gpt2", "gpt2") == {"local_files_only": True}


def test_offline_mode_without_the_model_names_the_cache(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_loading, "_is_cached", lambda repo: False)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache; "
                                         "pass a local model folder"):
        load_model("gpt2")


def test_local_folders_never_touch_the_network(no_network, tmp_path) -> None:
    assert hub_load_options(str(tmp_path), str(tmp_path)) == {} and not no_network


def test_reachability_goes_through_the_proxy_when_one_is_set(no_network, monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub_reachable(timeout=0.5) is False
    assert no_network[-1] == (("proxy.example", 3128), 0.5)
