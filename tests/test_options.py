"""pipeline.options: a run is validated, described and shipped to workers without torch."""
import json
import subprocess
import sys
import textwrap

import pytest

from pipeline.options import EmbedOptions, check_score_supported
from vae_model.checkpoint_header import inspect_checkpoint
from vae_model.errors import ConfigError

DRIVER = textwrap.dedent("""
    import json, sys
    import jobs.cli, pipeline.run
    from apache_beam.internal import pickler
    from pipeline.options import EmbedOptions, check_score_supported
    from pipeline.transforms import EmbedShardFn
    from vae_model.checkpoint_header import inspect_checkpoint

    ck, out = sys.argv[1], sys.argv[2]
    opts = EmbedOptions(checkpoint=ck, out_url=out, score="typicality")
    info = inspect_checkpoint(ck)
    check_score_supported(opts, info)
    blob = pickler.dumps(EmbedShardFn(opts))  # what Beam ships to the workers
    print(json.dumps({"torch": "torch" in sys.modules, "model_id": info.model_id, "pickled": len(blob)}))
""")


def test_the_driver_side_never_imports_torch(tiny_checkpoint, tmp_path):
    """The Beam driver checks the checkpoint and pickles the DoFn without a torch import (~1 s of
    every run's start-up, before any worker exists); the workers import it to load the model."""
    out = subprocess.run([sys.executable, "-c", DRIVER, tiny_checkpoint, str(tmp_path / "out")],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["torch"] is False and r["pickled"] > 0
    from vae_model.checkpoint import load_checkpoint

    assert r["model_id"] == load_checkpoint(tiny_checkpoint).model_id


def test_score_support_is_checked_from_the_header(tiny_checkpoint, tmp_path):
    info = inspect_checkpoint(tiny_checkpoint)
    assert check_score_supported(EmbedOptions(checkpoint=tiny_checkpoint, out_url=str(tmp_path), score="typicality"),
                                 info) == info.meta["typicality"]
    info.meta.pop("typicality")
    with pytest.raises(ConfigError, match="no typicality reference"):
        check_score_supported(EmbedOptions(checkpoint=tiny_checkpoint, out_url=str(tmp_path), score="typicality"),
                              info)
    assert check_score_supported(EmbedOptions(checkpoint=tiny_checkpoint, out_url=str(tmp_path)), info) is None


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "--batch-size"), ({"score": "magic"}, "--score magic"), ({"iwae_k": 0}, "--iwae-k"),
    ({"threshold_quantile": 1.0}, "--threshold-quantile"), ({"device": "tpu"}, "--device"),
    ({"run_date": "28/11/2026"}, "YYYY-MM-DD"),
])
def test_bad_options_are_one_line_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EmbedOptions(checkpoint="m.safetensors", out_url="out", **kwargs)


def test_partition_and_error_urls():
    o = EmbedOptions(checkpoint="m", out_url="s3://b/latents/", run_date="2026-11-28")
    assert (o.partition_url, o.errors_url) == ("s3://b/latents/dt=2026-11-28", "s3://b/latents/errors/dt=2026-11-28")
