import fsspec
import pytest
import torch

from vae_model.checkpoint import from_bytes, load_checkpoint, save_checkpoint, to_bytes
from vae_model.config import VAEConfig
from vae_model.errors import CheckpointError
from vae_model.model import VAE


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return VAE(VAEConfig(image_size=16, widths=(4, 8), latent_dim=4, hidden_dim=16)).eval()


@pytest.mark.parametrize("scheme", ["file", "plain", "memory"])
def test_round_trip_gives_identical_outputs(model, tmp_path, scheme):
    url = {"file": f"file://{tmp_path}/m.safetensors", "plain": str(tmp_path / "sub" / "m.safetensors"),
           "memory": f"memory://ckpt-{scheme}/m.safetensors"}[scheme]
    mid = save_checkpoint(model, url, {"data_url": "x", "epochs": 3})
    ckpt = load_checkpoint(url)
    assert ckpt.model_id == mid and ckpt.meta["epochs"] == 3 and ckpt.config == model.cfg
    assert "created_at" in ckpt.meta and "package_version" in ckpt.meta
    x = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    eps = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(model.elbo(x, eps=eps).neg_elbo, ckpt.model.elbo(x, eps=eps).neg_elbo)
        assert torch.equal(model.reconstruct(x), ckpt.model.reconstruct(x))


def test_model_id_is_a_content_hash(model):
    _, a = to_bytes(model, {"note": "one"})
    _, b = to_bytes(model, {"note": "two"})
    assert a == b  # metadata does not change the model identity
    with torch.no_grad():
        model.decoder.out.bias.add_(1.0)
    _, c = to_bytes(model)
    assert c != a


def test_tampered_checkpoint_is_refused(model):
    data, _ = to_bytes(model)
    tampered = bytearray(data)
    tampered[-100] ^= 0x01  # flip one bit in the weights
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        from_bytes(bytes(tampered))


def test_truncated_checkpoint_is_refused(model, tmp_path):
    data, _ = to_bytes(model)
    path = tmp_path / "t.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(str(path))


def test_not_a_checkpoint_and_missing_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"hello world, not a model")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.safetensors"))


def test_loading_never_unpickles(model):
    # The format is safetensors: a JSON header and raw tensor bytes; nothing executable.
    data, _ = to_bytes(model)
    assert b"\x80\x04" not in data[:8 + int.from_bytes(data[:8], "little")]


def test_no_partial_file_at_final_path(model, tmp_path):
    url = str(tmp_path / "m.safetensors")
    save_checkpoint(model, url)
    save_checkpoint(model, url)  # overwrite
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers == ["m.safetensors"]
    fs = fsspec.filesystem("memory")
    del fs


# -- vae_model.checkpoint_header: the same checks without torch ---------------------------------


def test_inspect_agrees_with_a_full_load(model, tmp_path):
    from vae_model.checkpoint_header import inspect_checkpoint

    url = str(tmp_path / "m.safetensors")
    mid = save_checkpoint(model, url, {"epochs": 2, "score_quantiles": {"elbo": {"0.99": 1.5}}})
    info, ckpt = inspect_checkpoint(url), load_checkpoint(url)
    assert (info.model_id, info.config, info.meta) == (mid, ckpt.config, ckpt.meta)
    assert info.score_quantiles == ckpt.score_quantiles == {"elbo": {"0.99": 1.5}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_raw_bytes_hash_equals_the_tensor_hash(dtype):
    """The header module hashes the file's raw bytes; saving hashes tensors: both must agree."""
    import json

    from safetensors.torch import save as st_save

    from vae_model.checkpoint import compute_model_id
    from vae_model.checkpoint_header import parse_checkpoint

    cfg_json = json.dumps(VAEConfig(image_size=16, widths=(4, 8), latent_dim=4, hidden_dim=16).to_dict(),
                          sort_keys=True)
    tensors = {"b": (torch.arange(12).reshape(3, 4) * 3).to(dtype), "a": torch.ones(5).to(dtype),
               "scalar": torch.tensor(7).to(dtype)}
    header = {"vaepipe.format": "1", "vaepipe.config": cfg_json, "vaepipe.model_id": compute_model_id(cfg_json, tensors)}
    info = parse_checkpoint(st_save(tensors, metadata=header))
    assert info.model_id == header["vaepipe.model_id"]


def test_inspect_refuses_what_a_full_load_refuses(model):
    import json

    from vae_model.checkpoint_header import parse_checkpoint

    data, _ = to_bytes(model)
    tampered = bytearray(data)
    tampered[-100] ^= 0x01
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        parse_checkpoint(bytes(tampered))
    with pytest.raises(CheckpointError, match="truncated"):
        parse_checkpoint(data[: len(data) // 2])
    # a header whose byte ranges point past the end of the file
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 10**6]
    raw = json.dumps(header).encode()
    with pytest.raises(CheckpointError, match="does not fit the file"):
        parse_checkpoint(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        parse_checkpoint(b"hello world, not a model")
    from safetensors.torch import save as st_save
    with pytest.raises(CheckpointError, match="not a vaepipe checkpoint"):
        parse_checkpoint(st_save({"w": torch.ones(2)}))
