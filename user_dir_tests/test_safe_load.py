"""Checkpoints load with torch's safe unpickler on; a code-running pickle is refused."""

import argparse
import os
import pickle

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.dataclass.configs import FairseqConfig
from omegaconf import OmegaConf

import fairseq_fastseq  # noqa: F401  (allow-lists the checkpoint globals)


@pytest.fixture(autouse=True)
def no_unsafe_override(monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)


@pytest.mark.parametrize("model", ["transformer", "bart", "transformer_lm"])
def test_fixture_checkpoints_load_with_weights_only(toy_models, model):
    state = torch.load(toy_models[model].checkpoint, weights_only=True)
    assert "model" in state and "cfg" in state


def test_legacy_args_and_dictconfig_checkpoints_load(toy_models, tmp_path):
    """Older fairseq saved ``args`` (a Namespace) or ``cfg`` as a DictConfig."""
    state = checkpoint_utils.load_checkpoint_to_cpu(str(toy_models["transformer"].checkpoint))
    cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(FairseqConfig), enum_to_str=True))
    legacy = {"args": argparse.Namespace(arch="transformer", beam=5), "cfg": cfg, "model": state["model"]}
    path = tmp_path / "legacy.pt"
    torch.save(legacy, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["args"].arch == "transformer"
    assert loaded["cfg"].common.seed == cfg.common.seed


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_code_running_checkpoint_is_refused_and_payload_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "args": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="unsupported GLOBAL posix.system"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert not (tmp_path / "PWNED").exists()
