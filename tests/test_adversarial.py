"""Images in = rows out + dead letters: every adversarial shard (tests/adversarial.py) through the embedder and the CLI."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pandas as pd
import pytest
from click.testing import CliRunner

import adversarial
import pipeline.embed as embed_module
from jobs.cli import cli
from pipeline.embed import ShardEmbedder
from pipeline.manifest import build_manifest
from pipeline.options import EmbedOptions
from pipeline.shards import expand_shards, iter_members, unescape_key


def _name(shard: str) -> str:
    name = shard.rstrip("/").rsplit("/", 1)[-1]
    return "folder" if name.startswith("images-") else name


def _outputs(out) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = pd.concat([pd.read_parquet(p) for p in out.glob("*.parquet")])
    errors = pd.concat([pd.read_parquet(p) for p in (out / "errors").glob("*.parquet")])
    return rows, errors


def _context(out, specs) -> dict:
    return {"started_at": dt.datetime.now(dt.timezone.utc).isoformat(), "partition_url": str(out),
            "inputs": [s.name for s in specs]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("adversarial") / "in"
    return root, adversarial.write_all(root)


def test_every_adversarial_shard_is_rows_plus_dead_letters(shards, tiny_checkpoint, tmp_path):
    root, expected = shards
    out = tmp_path / "out"
    opts = EmbedOptions(tiny_checkpoint, str(out), batch_size=4, device="cpu",
                        max_member_bytes=adversarial.LIMITS.max_member_bytes,
                        max_sidecar_bytes=adversarial.LIMITS.max_sidecar_bytes)
    embedder = ShardEmbedder(opts)
    specs = expand_shards(str(root))
    summaries = [embedder.process(spec) for spec in specs]
    assert sorted(_name(s["shard"]) for s in summaries) == sorted(expected)
    for s in summaries:
        assert s["members"] == expected[_name(s["shard"])], s
        assert s["rows"] + s["errors"] == s["members"], s
    assert build_manifest(summaries, _context(out, specs))["reconciled"]

    rows, errors = _outputs(out)
    keys = list(rows["key"]) + list(errors["key"])
    assert len(keys) == len(set(keys)) == sum(expected.values())
    for key in keys + list(rows["shard"]) + list(errors["shard"]) + list(errors["message"]):
        key.encode("utf-8")  # valid UTF-8 (no surrogates): Parquet could store it
    assert rows["meta"].dropna().map(json.loads).map(type).eq(dict).all()  # strict JSON only

    kinds = dict(zip(errors["key"].map(lambda k: k.split("/in/", 1)[1]), errors["error_type"]))
    assert {k: kinds[k] for k in ["odd.tar/canvas", "odd.tar/huge", "odd.tar/meta", "odd.tar/nan",
                                  "label.tar/big", "dups.tar/a#1", "links.tar/c", "links.tar/d", "links.tar/e",
                                  "rows.parquet/big-label", "hf.parquet/00000000", "images-00000/folder/huge",
                                  "images-00000/folder/dangling"]} == {
        "odd.tar/canvas": "ImageTooLarge", "odd.tar/huge": "MemberTooLarge", "odd.tar/meta": "MemberTooLarge",
        "odd.tar/nan": "BadMeta", "label.tar/big": "BadLabel", "dups.tar/a#1": "DuplicateKey",
        "links.tar/c": "UnresolvedLink", "links.tar/d": "NotARegularFile", "links.tar/e": "NotARegularFile",
        "rows.parquet/big-label": "BadLabel", "hf.parquet/00000000": "ImageTooLarge",
        "images-00000/folder/huge": "MemberTooLarge", "images-00000/folder/dangling": "FileNotFound"}
    assert "--max-pixels" in errors.loc[errors["error_type"] == "ImageTooLarge", "message"].iloc[0]
    got = {k.split("/in/", 1)[1] for k in rows["key"]}
    assert {"latin1.tar/caf%E9", "images-00000/folder/caf%E9", "links.tar/b", "links.tar.gz/b", "odd.tar/UPPER",
            "images-00000/folder/sub/%FF%FE", "odd.tar/pct%2541", "images-00000/folder/anim",
            "images-00000/folder/scan", "images-00000/folder/linked"} <= got
    assert unescape_key("caf%E9") == adversarial.LATIN1.encode("latin-1").decode("utf-8", "surrogateescape")


def test_dropped_member_is_not_reconciled(shards, tiny_checkpoint, tmp_path, monkeypatch):
    """A reader that loses a member (here: drops the second) must turn reconciliation false."""
    root, _ = shards

    def lossy(*args, **kwargs):
        for i, m in enumerate(iter_members(*args, **kwargs)):
            if i != 1:
                yield m

    monkeypatch.setattr(embed_module, "iter_members", lossy)
    out = tmp_path / "out"
    embedder = ShardEmbedder(EmbedOptions(tiny_checkpoint, str(out), device="cpu"))
    specs = [s for s in expand_shards(str(root)) if _name(s.name) in ("dups.tar", "rows.parquet")]
    summaries = [embedder.process(spec) for spec in specs]
    assert all(s["rows"] + s["errors"] == s["members"] - 1 for s in summaries)
    assert not build_manifest(summaries, _context(out, specs))["reconciled"]
    # the count survives in the file metadata, so a skipped rerun reports the same
    again = ShardEmbedder(dataclasses.replace(embedder.opts))
    monkeypatch.setattr(embed_module, "iter_members", iter_members)
    skipped = [again.existing(spec) for spec in specs]
    assert [s["members"] for s in skipped] == [s["members"] for s in summaries]


def test_cli_embed_adversarial_shards(shards, tiny_checkpoint, tmp_path):
    root, expected = shards
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["embed", str(root), "--checkpoint", tiny_checkpoint, "--out", str(out),
                                   "--device", "cpu", "--direct_num_workers=1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads([line for line in res.output.splitlines() if line.startswith("{")][-1])
    assert summary["reconciled"] is True
    t = summary["totals"]
    assert t["rows"] + t["errors"] == sum(expected.values()) and t["shards"] == len(expected)
    rows, errors = _outputs(out)
    keys = list(rows["key"]) + list(errors["key"])
    assert len(keys) == len(set(keys)) == sum(expected.values())


def test_evaluate_counts_every_adversarial_member(shards, tiny_checkpoint):
    """vaepipe evaluate reads through the same reader: the images it scored plus those it skipped
    (each with a warning) are every member."""
    from jobs.evaluate import EvalOptions, evaluate

    root, expected = shards
    ev = evaluate(str(root), tiny_checkpoint, EvalOptions(iwae_k=2, batch_size=16))
    assert ev["images"] > 0 and ev["skipped"] > 0
    assert ev["images"] + ev["skipped"] == sum(expected.values())
