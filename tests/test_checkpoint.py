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
