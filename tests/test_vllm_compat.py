"""The supported vLLM releases, checked at start-up (`hybrid_kv.vllm.compat`)."""

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (CI installs it)")

from hybrid_kv.vllm.compat import ENV_ALLOW, SUPPORTED, check_vllm_version


def test_supported_release_and_local_build_tags():
    import vllm

    assert check_vllm_version() == vllm.__version__  # the release the tests run on is supported
    assert check_vllm_version("0.32.0+cpu", environ={}) == "0.32.0+cpu"


@pytest.mark.parametrize("version", ["0.34.0", "0.33.0", "0.31.2", "0.32.1"])
def test_other_releases_refused_naming_both(version):
    with pytest.raises(RuntimeError, match=rf"support vLLM {SUPPORTED[0]}; this is vLLM {version}, .*{ENV_ALLOW}=1"):
        check_vllm_version(version, environ={})
    with pytest.raises(RuntimeError):
        check_vllm_version(version, environ={ENV_ALLOW: "0"})


def test_operator_may_accept_the_risk(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="vllm.hybrid_kv"):
        assert check_vllm_version("0.34.0", environ={ENV_ALLOW: "1"}) == "0.34.0"
    assert "vLLM 0.34.0 is not a supported release (0.32.0); running anyway" in caplog.text
    with pytest.raises(ValueError, match=rf"{ENV_ALLOW}='yes' \(accepted: 1"):
        check_vllm_version("0.34.0", environ={ENV_ALLOW: "yes"})


def test_connector_refuses_an_unsupported_release_at_startup(monkeypatch):
    """Before any agent or worker: the connector's first start-up check."""
    import vllm

    from hybrid_kv.vllm import HybridKVConnector, HybridKVPushConnector

    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    monkeypatch.delenv(ENV_ALLOW, raising=False)
    for cls in (HybridKVConnector, HybridKVPushConnector):
        with pytest.raises(RuntimeError, match=r"this is vLLM 0\.34\.0"):
            cls(None, None, None)  # refused before the config is even read
