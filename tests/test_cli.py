"""The vaepipe CLI on tiny real data: help, the quickstart chain, and one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from model_fixtures import FASHION
from PIL import Image

from jobs.cli import cli

COMMANDS = sorted(cli.commands)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_expected_commands_exist():
    assert {"shards", "train", "generate", "evaluate", "embed", "info", "calibrate"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_with_an_example(name):
    res = invoke(name, "--help")
    assert res.exit_code == 0
    assert "Example" in res.output and "vaepipe " + name in res.output


def test_quickstart_chain(tmp_path):
    shards = tmp_path / "shards"
    res = invoke("shards", FASHION, shards, "--shard-size", 100, "--limit", 300)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"shards": 3, "images": 300, "out": str(shards)}
    ckpt = tmp_path / "m.safetensors"
    res = invoke("train", shards, "--out", ckpt, "--epochs", 1, "--batch-size", 32, "--latent-dim", 4,
                 "--widths", "8,16", "--hidden-dim", 32, "--val-fraction", 0.2, "--quiet")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 1 and summary["checkpoint"] == str(ckpt)

    res = invoke("generate", ckpt, "--out", tmp_path / "s.png", "--n", 16)
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "s.png").size == (4 * 30 + 2, 4 * 30 + 2)
    res = invoke("generate", ckpt, "--out", tmp_path / "s3.png", "--n", 4, "--scale", 3)
    assert res.exit_code == 0 and Image.open(tmp_path / "s3.png").size == (2 * 86 + 2, 2 * 86 + 2)  # 3 x 28 px tiles
    res = invoke("generate", ckpt, "--out", tmp_path / "r.png", "--reconstruct", shards, "--n", 8)
    assert res.exit_code == 0 and Image.open(tmp_path / "r.png").size[1] == 2 * 30 + 2
    res = invoke("generate", ckpt, "--out", tmp_path / "i.png", "--interpolate", "--data", shards, "--n", 2,
                 "--steps", 5)
    assert res.exit_code == 0 and Image.open(tmp_path / "i.png").size == (5 * 30 + 2, 2 * 30 + 2)
    res = invoke("generate", ckpt, "--out", tmp_path / "p.png", "--interpolate", "--n", 3)
    assert res.exit_code == 0

    res = invoke("evaluate", shards, "--checkpoint", ckpt, "--iwae-k", 8, "--limit", 64)
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert ev["images"] == 64 and ev["iwae_k"] == 8 and ev["skipped"] == 0
    assert ev["iwae_nll"] <= ev["mean_neg_elbo"] + 1.0  # the IWAE bound is tighter
    assert ev["bits_per_dim"] == pytest.approx(ev["iwae_nll"] / (784 * 0.6931471805599453))

    res = invoke("info", ckpt)
    assert res.exit_code == 0 and json.loads(res.stdout)["config"]["latent_dim"] == 4

    res = invoke("calibrate", ckpt, shards, "--limit", 120, "--iwae-k", 2)
    assert res.exit_code == 0, res.output
    cal = json.loads(res.stdout)
    assert cal["images"] == 120 and cal["data_url"] == str(shards) and len(cal["id"]) == 16

    res = invoke("embed", shards, "--checkpoint", ckpt, "--out", tmp_path / "out", "--direct_num_workers=1")
    assert res.exit_code == 0, res.output
    emb = json.loads(res.stdout.strip().splitlines()[-1])
    assert emb["totals"]["rows"] == 300 and emb["reconciled"]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "jobs", *map(str, args)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)


@pytest.mark.parametrize("case", ["missing_ckpt", "tampered_ckpt", "no_shards", "bad_config", "bad_json",
                                  "calibrate_too_few"])
def test_bad_input_gives_one_line_error_and_nonzero_exit(case, tmp_path, tiny_checkpoint, fashion_shards):
    if case == "missing_ckpt":
        args = ["embed", fashion_shards, "--checkpoint", tmp_path / "nope.safetensors", "--out", tmp_path / "o"]
    elif case == "tampered_ckpt":
        data = bytearray(Path(tiny_checkpoint).read_bytes())
        data[-7] ^= 0xFF
        (tmp_path / "t.safetensors").write_bytes(bytes(data))
        args = ["info", tmp_path / "t.safetensors"]
    elif case == "no_shards":
        args = ["train", tmp_path / "empty", "--out", tmp_path / "m.safetensors"]
        (tmp_path / "empty").mkdir()
    elif case == "bad_config":
        args = ["train", fashion_shards, "--out", tmp_path / "m.safetensors", "--image-size", 8]
    elif case == "calibrate_too_few":
        import shutil
        shutil.copy(tiny_checkpoint, tmp_path / "c.safetensors")
        args = ["calibrate", tmp_path / "c.safetensors", fashion_shards, "--limit", 10]
    else:
        args = ["evaluate", fashion_shards, "--checkpoint", tiny_checkpoint, "--storage-options", "{nope"]
    res = _run(*args)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_python_dash_m_jobs_works():
    res = _run("--version")
    assert res.returncode == 0 and res.stdout.startswith("vaepipe ")


def test_embed_uses_the_local_cores_by_default(fashion_shards, tiny_checkpoint, tmp_path):
    """Without --direct_* flags the DirectRunner gets one worker process per core (up to the
    number of shards), not Beam's single process."""
    import os

    from pipeline.runner_args import cores as _cores
    from pipeline.runner_args import gpu_present as _gpu_present

    if _gpu_present():
        pytest.skip("a GPU machine scores in one process by default")
    res = invoke("embed", fashion_shards, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["totals"]["rows"] == 600 and manifest["reconciled"]
    workers = min(_cores(), 3)  # 3 shards
    assert manifest["worker_processes"] == workers
    if workers > 1:
        assert os.getpid() not in {s["pid"] for s in manifest["shards"]}


def test_calibrate_takes_the_typicality_rule_and_statistics(tiny_checkpoint, mnist_shards, tmp_path):
    import shutil

    from vae_model.checkpoint_header import inspect_checkpoint

    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    res = invoke("calibrate", ckpt, mnist_shards, "--iwae-k", 2, "--rule", "copula", "--statistics", "nll_bits,kde,knn")
    assert res.exit_code == 0, res.output
    ref = inspect_checkpoint(str(ckpt)).meta["typicality"]
    assert ref["rule"] == "copula" and ref["uses"] == ["nll_bits", "kde", "knn"] and len(ref["copula"]["corr"]) == 4
    bad = invoke("calibrate", ckpt, mnist_shards, "--statistics", "kde,pixels")
    assert bad.exit_code == 2 and "name some of nll_bits" in bad.output


def test_calibrate_rule_choices_are_the_library_rules():
    """The CLI lists the rules literally (it does not import numpy to parse flags): they must stay the library's."""
    from vae_model.combine import RULES

    rule = next(p for p in cli.commands["calibrate"].params if p.name == "rule")
    assert tuple(rule.type.choices) == RULES
