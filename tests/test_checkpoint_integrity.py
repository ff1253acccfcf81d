"""Checkpoint integrity: everything in a checkpoint that changes an output row is sealed by a hash
and checked against a schema on the driver, so an edited or malformed checkpoint is one line
(CheckpointError) before any output exists, never a wrong row or a crash inside a worker."""
import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load as st_load

from vae_model.checkpoint import compute_model_id, load_checkpoint, save_checkpoint, update_meta
from vae_model.checkpoint_header import calibration_id, inspect_checkpoint, parse_checkpoint
from vae_model.errors import CheckpointError
from vae_model.typicality import ReferenceFormatError, TypicalityReference


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def _edit(data: bytes, meta=None, config=None, reseal: bool = False, **fields) -> bytes:
    """``data`` with its meta / config / raw header fields replaced. ``reseal``: recompute both
    hashes, as a buggy writer would have, so that only the schema can catch the edit."""
    header, body = _split(data)
    md = header["__metadata__"]
    if meta is not None:
        md["vaepipe.meta"] = json.dumps(meta)
    if config is not None:
        md["vaepipe.config"] = json.dumps(config)
    if reseal:
        md["vaepipe.model_id"] = compute_model_id(md["vaepipe.config"], st_load(data))
        md["vaepipe.calibration_id"] = calibration_id(json.loads(md["vaepipe.meta"]))
    md.update(fields)
    return _join(header, body)


@pytest.fixture(scope="module")
def good(tiny_checkpoint) -> tuple[bytes, dict, dict]:
    data = open(tiny_checkpoint, "rb").read()
    md = _split(data)[0]["__metadata__"]
    return data, json.loads(md["vaepipe.meta"]), json.loads(md["vaepipe.config"])


def _refused(data: bytes, match: str) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as info:
        parse_checkpoint(data, "m.safetensors")
    assert "\n" not in str(info.value) and len(str(info.value)) < 600
    return info.value


# -- 1. the calibration hash ---------------------------------------------------------------------


def test_every_write_seals_the_statistics(good, tiny_checkpoint, tmp_path):
    data, meta, _ = good
    info = parse_checkpoint(data)
    header = _split(data)[0]["__metadata__"]
    assert info.calibration_id == header["vaepipe.calibration_id"] == calibration_id(meta) != ""
    assert meta["calibration"]["id"] == info.calibration_id  # the record store_calibration writes
    ckpt = load_checkpoint(tiny_checkpoint)
    url = str(tmp_path / "m.safetensors")
    save_checkpoint(ckpt.model, url, {**ckpt.meta, "score_quantiles_iwae_k": 7})
    assert inspect_checkpoint(url).calibration_id == calibration_id({**ckpt.meta, "score_quantiles_iwae_k": 7})
    update_meta(url, {"note": "x"})
    assert inspect_checkpoint(url).meta["note"] == "x"
    save_checkpoint(ckpt.model, url, {})  # no statistics: an empty id, and accepted
    assert inspect_checkpoint(url).calibration_id == ""


def test_embed_records_the_verified_calibration_id(good, tiny_checkpoint, tmp_path):
    from pipeline.embed import ShardEmbedder
    from pipeline.options import EmbedOptions

    emb = ShardEmbedder(EmbedOptions(tiny_checkpoint, str(tmp_path / "out"), device="cpu"))
    assert emb.file_meta["vaepipe.calibration"] == parse_checkpoint(good[0]).calibration_id


def test_edited_quantiles_are_refused_before_any_output(good, fashion_shards, tmp_path):
    """The case of issue 10: quantiles rewritten to -1e9 kept the model_id and flagged every image."""
    from pipeline.options import EmbedOptions
    from pipeline.run import run_embed

    data, meta, _ = good
    edited = json.loads(json.dumps(meta))
    edited["score_quantiles"]["elbo"] = {k: (v if k == "n" else -1e9) for k, v in meta["score_quantiles"]["elbo"].items()}
    bad = _edit(data, meta=edited)
    _refused(bad, r"calibration hash mismatch .*modified; run `vaepipe calibrate")
    ck = tmp_path / "edited.safetensors"
    ck.write_bytes(bad)
    with pytest.raises(CheckpointError, match="calibration hash mismatch"):
        load_checkpoint(str(ck))
    with pytest.raises(CheckpointError, match="calibration hash mismatch"):
        run_embed(str(fashion_shards), EmbedOptions(str(ck), str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    # The typicality reference and iwae_k are sealed too.
    for key, value in (("score_quantiles_iwae_k", 99),
                       ("typicality", {**meta["typicality"], "latent": {**meta["typicality"]["latent"], "dim": 0.5}})):
        _refused(_edit(data, meta={**meta, key: value}), "calibration hash mismatch")


def test_unsealed_statistics_are_refused_and_calibrate_reseals_them(good, mnist_shards, tmp_path):
    """Older checkpoints carry statistics without a calibration_id; deleting the field must not
    pass an edit, so they are refused with the fix (recalibrate), which works on them."""
    from jobs.calibrate import calibrate

    data, meta, _ = good
    header, body = _split(data)
    del header["__metadata__"]["vaepipe.calibration_id"]
    old = _join(header, body)
    _refused(old, r"without a vaepipe.calibration_id .*run `vaepipe calibrate CHECKPOINT HELDOUT_DATA_URL`")
    ck = tmp_path / "old.safetensors"
    ck.write_bytes(old)
    with pytest.raises(CheckpointError, match="calibration_id"):
        update_meta(str(ck), {"note": "x"})  # an update that keeps unverified statistics is refused
    rec = calibrate(str(ck), str(mnist_shards), limit=64, iwae_k=2)
    info = inspect_checkpoint(str(ck))
    assert info.calibration_id == rec["id"] == calibration_id(info.meta) != ""
    assert info.model_id == parse_checkpoint(data).model_id and info.meta["calibration"]["images"] == 64
    # A checkpoint whose statistics were edited is recalibrated the same way.
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(_edit(data, meta={**meta, "score_quantiles_iwae_k": 99}))
    assert calibrate(str(edited), str(mnist_shards), limit=64, iwae_k=2)["id"] == inspect_checkpoint(
        str(edited)).calibration_id


# -- 2. the header schema -------------------------------------------------------------------------


def _ref(meta, **changes):
    ref = json.loads(json.dumps(meta["typicality"]))
    for path, value in changes.items():
        part, key = path.split("__")
        if value is None:
            del ref[part][key]
        else:
            ref[part][key] = value
    return ref


@pytest.mark.parametrize("case, match", [
    ("config_int", "config must be a JSON object"),
    ("image_size_float", r"image_size=28\.0: must be an integer"),
    ("widths_str", "widths='a': must be a list of integers"),
    ("channels_bool", "channels=True: must be an integer"),
    ("beta_str", "beta='1': must be a finite number"),
    ("quantiles_oops", "score_quantiles.elbo must be a JSON object"),
    ("quantile_value", r"score_quantiles.elbo.0.99='x' must be a finite number"),
    ("quantile_key", "score_quantiles.elbo: key 'p99' is not a quantile"),
    ("quantiles_list", "score_quantiles must be a JSON object"),
    ("iwae_k_str", "score_quantiles_iwae_k='16' must be an integer"),
    ("typicality_missing", "typicality reference: kde.whiten is missing"),
    ("typicality_shape", r"typicality reference: kde.whiten \(3, 3\) and kde.points \(\d+, 2\) do not fit"),
    ("typicality_latent_dim", "latent.points are 3-d, the model's latent is 4-d"),
    ("typicality_nan", "latent.points has non-finite values"),
    ("typicality_kind", "kind 'magic' is not one this vaepipe reads"),
    ("typicality_list", "typicality reference: it must be a JSON object"),
    ("meta_list", "vaepipe.meta is a list"),
    ("calibration_str", "calibration must be a JSON object"),
])
def test_malformed_metadata_is_one_line_naming_the_field(good, case, match):
    data, meta, config = good
    m, c = dict(meta), dict(config)
    q = json.loads(json.dumps(meta["score_quantiles"]))
    if case == "config_int":
        c = 3
    elif case == "image_size_float":
        c["image_size"] = 28.0
    elif case == "widths_str":
        c["widths"] = "a"
    elif case == "channels_bool":
        c["channels"] = True
    elif case == "beta_str":
        c["beta"] = "1"
    elif case == "quantiles_oops":
        m["score_quantiles"] = {**q, "elbo": "oops"}
    elif case == "quantile_value":
        q["elbo"]["0.99"] = "x"
        m["score_quantiles"] = q
    elif case == "quantile_key":
        q["elbo"]["p99"] = 1.0
        m["score_quantiles"] = q
    elif case == "quantiles_list":
        m["score_quantiles"] = [1, 2]
    elif case == "iwae_k_str":
        m["score_quantiles_iwae_k"] = "16"
    elif case == "typicality_missing":
        m["typicality"] = _ref(meta, kde__whiten=None)
    elif case == "typicality_shape":
        m["typicality"] = _ref(meta, kde__whiten=[[1.0, 2.0, 3.0]] * 3)
    elif case == "typicality_latent_dim":
        m["typicality"] = _ref(meta, latent__points=[[0.0, 1.0, 2.0]] * 20)
    elif case == "typicality_nan":
        pts = meta["typicality"]["latent"]["points"]
        m["typicality"] = _ref(meta, latent__points=[[float("nan")] * len(pts[0])] + pts[1:])
    elif case == "typicality_kind":
        m["typicality"] = {**meta["typicality"], "kind": "magic"}
    elif case == "typicality_list":
        m["typicality"] = [1, 2, 3]
    elif case == "meta_list":
        m = [1, 2]
    elif case == "calibration_str":
        m["calibration"] = "yesterday"
    if case == "meta_list":
        header, body = _split(data)
        header["__metadata__"]["vaepipe.meta"] = "[1, 2]"
        bad = _join(header, body)
    else:
        bad = _edit(data, meta=m, config=c, reseal=True)  # sealed: only the schema can refuse it
    err = _refused(bad, match)
    assert str(err).startswith("m.safetensors: ")


@pytest.mark.parametrize("case, match", [
    ("metadata_list", "__metadata__ is a list, not a JSON object"),
    ("value_not_string", "__metadata__ value 'vaepipe.meta' must be a string, not dict"),
    ("value_number", "__metadata__ value 'vaepipe.format' must be a string, not int"),
])
def test_malformed_metadata_block_is_refused(good, case, match):
    data = good[0]
    header, body = _split(data)
    md = header["__metadata__"]
    if case == "metadata_list":
        header["__metadata__"] = list(md.items())
    elif case == "value_not_string":
        md["vaepipe.meta"] = json.loads(md["vaepipe.meta"])
    else:
        md["vaepipe.format"] = 1
    _refused(_join(header, body), match)


def test_header_size_is_capped(good):
    """A 100 MB meta string is refused from the header's length alone (the cap is 64 MB)."""
    data, meta, _ = good
    bad = _edit(data, meta={**meta, "note": "x" * (100 << 20)}, reseal=True)
    _refused(bad, r"checkpoint header is 100 MB, over the 64 MB limit")


def test_the_reference_has_one_validating_parser(good):
    """TypicalityReference.from_dict is what scoring and the header check use: a clear
    ConfigError (a ValueError) naming the field, for check_score_supported / ScoreOptions too."""
    from vae_model.errors import ConfigError
    from vae_model.scoring import ScoreOptions

    ref = good[1]["typicality"]
    parsed = TypicalityReference.from_dict(ref, latent_dim=4)
    assert parsed.latent.points.shape[1] == 4 and np.isfinite(parsed.kde.points).all()
    broken = _ref(good[1], latent__dim="many")
    with pytest.raises(ReferenceFormatError, match=r"latent.dim='many' must be a finite number > 0"):
        TypicalityReference.from_dict(broken)
    with pytest.raises(ConfigError, match="latent.dim"):
        ScoreOptions("typicality", reference=broken)
    assert issubclass(ReferenceFormatError, ValueError)


def test_recalibration_refuses_degenerate_images_and_writes_nothing(tiny_checkpoint, tmp_path):
    """A typicality reference fitted on copies of one image had an intrinsic dimension of ~1e12
    (scores of ~-1e13); calibration now refuses such images and leaves the checkpoint as it was."""
    import torch

    from jobs.calibrate import store_calibration
    from vae_model.errors import ConfigError

    ck = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ck)
    before = ck.read_bytes()
    same = torch.full((40, 1, 28, 28), 7, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="distinct latents"):
        store_calibration(str(ck), same, "copies", iwae_k=2)
    assert ck.read_bytes() == before
