"""vae_model.device: the one device and precision policy (train, calibrate, evaluate, generate, embed)."""
import json
import subprocess
import sys

import pytest
import torch

from vae_model import device as dev
from vae_model.errors import ConfigError


def test_pick_device_auto_cpu_and_unknown():
    assert dev.pick_device("cpu") == torch.device("cpu")
    assert dev.pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="--device tpu: choose one of auto, cpu, cuda"):
        dev.pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA device is available here"):
        dev.pick_device("cuda")


def test_scoring_rule_fp32_on_cpu_bf16_on_cuda_with_support():
    rule = dev.scoring_precision_for
    assert rule("auto", "cpu") == "fp32"
    assert rule("auto", "cuda") == "bf16"
    assert rule("auto", "cuda", bf16_supported=False) == "fp32"
    assert rule("bf16", "cpu") == "bf16" and rule("fp32", "cuda") == "fp32"  # an explicit choice is kept
    assert dev.scoring_precision("auto", torch.device("cpu")) == "fp32"
    assert dev.scoring_precision("bf16", torch.device("cpu")) == "bf16"


def test_the_drivers_guess_follows_the_same_rule():
    assert dev.expected_device_type("auto", gpu_present=True) == "cuda"
    assert dev.expected_device_type("auto", gpu_present=False) == "cpu"
    assert dev.expected_device_type("cpu", gpu_present=True) == "cpu"
    assert dev.expected_device_type("cuda", gpu_present=False) == "cuda"
    assert dev.expected_precision("auto", "auto", gpu_present=True) == "bf16"
    assert dev.expected_precision("auto", "cpu", gpu_present=True) == "fp32"
    assert dev.expected_precision("auto", "auto", gpu_present=False) == "fp32"
    assert dev.expected_precision("fp32", "cuda", gpu_present=True) == "fp32"


def test_training_rule_bf16_where_the_cpu_has_fast_bf16(monkeypatch):
    cpu = torch.device("cpu")
    assert dev.training_precision("fp32", cpu) == "fp32" and dev.training_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert dev.training_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert dev.training_precision("auto", cpu) == "bf16"
    # Scoring keeps fp32 on that same CPU: rows must not depend on bf16 rounding.
    assert dev.scoring_precision("auto", cpu) == "fp32"


def test_autocast_only_for_bf16():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    cpu = torch.device("cpu")
    with dev.autocast(cpu, "fp32"):
        assert (a @ b).dtype == torch.float32
    with dev.autocast(cpu, "bf16"):
        assert (a @ b).dtype == torch.bfloat16


def test_every_user_derives_from_this_module():
    from pipeline import embed, options

    assert options.resolved_precision is dev.scoring_precision_for
    assert embed.resolve_device is dev.pick_device and embed.resolve_precision is dev.scoring_precision
    assert options.PRECISIONS is dev.PRECISIONS


def test_the_drivers_guess_imports_no_torch():
    script = ("import json, sys; from vae_model.device import expected_precision; "
              "p = expected_precision('auto', 'auto', gpu_present=True); "
              "print(json.dumps({'p': p, 'torch': 'torch' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"p": "bf16", "torch": False}


def test_the_driver_keys_outputs_by_the_precision_its_workers_will_use(monkeypatch):
    from pipeline import run
    from pipeline.options import EmbedOptions

    opts = EmbedOptions(checkpoint="m.safetensors", out_url="out/")
    monkeypatch.setattr(run, "gpu_present", lambda: True)
    assert run._driver_precision(opts) == "bf16"
    monkeypatch.setattr(run, "gpu_present", lambda: False)
    assert run._driver_precision(opts) == "fp32"
