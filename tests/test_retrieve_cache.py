"""The split embeddings that `cmpagl retrieve` caches beside the checkpoint: reused for a
repeated query, computed again when the images, the captions, the checkpoint or the reading
settings change, and never trusted when unreadable."""

from __future__ import annotations

import os
import shutil

import torch

from cmpagl.checkpoint import find_checkpoint, load_checkpoint
from cmpagl.data.build import dataset_from_config, transforms_from_config
from cmpagl.retrieval import cached_embeddings, embed_split, split_fingerprint


def _setup(run, tmp_path):
    model, cfg, _ = load_checkpoint(run, prefer="best")
    ds = dataset_from_config(cfg.data).split("test")
    _, transform = transforms_from_config(cfg.data)
    return model.eval(), cfg, ds, transform, find_checkpoint(run, prefer="best")


def test_a_repeated_query_reads_the_cache_and_a_change_invalidates_it(tiny_trained_run, tmp_path):
    model, cfg, ds, transform, folder = _setup(tiny_trained_run, tmp_path)
    cache = tmp_path / "emb.pt"
    key = split_fingerprint(ds, folder, cfg.data)
    first, cached = cached_embeddings(model, ds, transform, cache, key)
    assert not cached and cache.is_file()
    again, cached = cached_embeddings(model, ds, transform, cache, key)
    assert cached
    assert torch.equal(again.image_embed, first.image_embed)
    assert torch.equal(again.text_embed, first.text_embed)
    fresh = embed_split(model, ds, transform, keep_fusion=False)  # what the cache stands for
    assert torch.equal(fresh.image_embed, first.image_embed)

    # an image replaced (new modification time) changes the key: computed again
    image = ds.image_dir / ds.filenames[0]
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    key2 = split_fingerprint(ds, folder, cfg.data)
    assert key2 != key
    assert not cached_embeddings(model, ds, transform, cache, key2)[1]
    assert cached_embeddings(model, ds, transform, cache, key2)[1]

    # another checkpoint (last/ here), other reading settings, other captions: other keys
    assert split_fingerprint(ds, folder.parent / "last", cfg.data) != key2
    assert split_fingerprint(ds, folder, ("other", cfg.data)) != key2
    val = dataset_from_config(cfg.data).split("val")
    assert split_fingerprint(val, folder, cfg.data) != key2

    # an unreadable cache is recomputed, not an error
    cache.write_bytes(b"not a torch file")
    assert not cached_embeddings(model, ds, transform, cache, key2)[1]


def test_cmpagl_retrieve_caches_beside_the_checkpoint(tiny_trained_run, tmp_path, capsys):
    from cmpagl.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_trained_run, run)
    args = ["retrieve", "--checkpoint", str(run), "--text", "a red car", "--top", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "computed and cached in .embeddings_best_test.pt" in out
    assert (run / ".embeddings_best_test.pt").is_file()
    assert main(args) == 0
    second = capsys.readouterr().out
    assert "read from .embeddings_best_test.pt" in second
    assert second.splitlines()[1:] == out.splitlines()[1:]  # the same ranking
