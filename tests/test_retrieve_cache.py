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


def test_a_repeated_retrieve_reads_no_image_and_a_bad_one_is_named_when_embedding(
    tiny_trained_run, tmp_path, capsys, monkeypatch
):
    """`cmpagl retrieve` checks only that the split's files exist: a cache hit decodes no image
    (decoding the whole dataset on every call cost more than the query), and an image that
    cannot be read is named when the split is embedded again."""
    from cmpagl.cli import main
    from cmpagl.data import validation

    run = tmp_path / "run"
    shutil.copytree(tiny_trained_run, run)
    _, cfg, ds, _, _ = _setup(run, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(cfg.data.root, data)
    args = ["retrieve", "--checkpoint", str(run), "--text", "a red car"]
    args += ["--set", f"data.root={data}"]
    assert main(args) == 0
    assert "computed and cached" in capsys.readouterr().out

    reads = []
    real = validation.read_image
    monkeypatch.setattr(
        validation, "read_image", lambda *a, **k: reads.append(a[0]) or real(*a, **k)
    )
    assert main(args) == 0
    assert "read from .embeddings_best_test.pt" in capsys.readouterr().out
    assert reads == []

    bad = data / "images" / ds.filenames[3]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated: a new mtime, so embedded again
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ds.filenames[3] in err[0] and "cannot read image" in err[0], err

    (data / "images" / ds.filenames[5]).unlink()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "1 of" in err and "missing" in err and ds.filenames[5] in err, err


def test_interactive_retrieve_answers_each_line_with_the_model_loaded_once(
    tiny_trained_run, tmp_path
):
    """Queries on standard input: text, an image path, an unreadable image (one error line, the
    loop goes on), then the end of input. Each answer prints its time; the model loads once."""
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(tiny_trained_run, run)
    _, cfg, ds, _, _ = _setup(run, tmp_path)
    image = ds.image_dir / ds.filenames[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    queries = f"a red car\n{image}\n{broken}\ntwo planes\n{tmp_path / 'missing.jpg'}\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmpagl.cli",
            "retrieve",
            "--checkpoint",
            str(run),
            "--top",
            "2",
            "--interactive",
        ],
        input=queries,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    ).stdout
    assert out.count("split embeddings") == 1  # loaded and embedded once
    assert "images of the test split for: 'a red car'" in out
    assert f"captions of the test split for image {image}" in out
    assert "images of the test split for: 'two planes'" in out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0]
    times = [
        float(ln[1:-3]) for ln in out.splitlines() if ln.startswith("(") and ln.endswith(" s)")
    ]
    assert len(times) == 5 and max(times) < 1  # each query, the model already loaded
    assert out.count("\n  1. ") == 4
    assert f"note: there is no file {tmp_path / 'missing.jpg'}; searching for it as text" in out


def test_retrieve_needs_exactly_one_kind_of_query(tiny_trained_run, capsys):
    from cmpagl.cli import main

    for args in ([], ["--text", "x", "--interactive"], ["--interactive", "--gallery", "g.png"]):
        assert main(["retrieve", "--checkpoint", str(tiny_trained_run), *args]) == 2
    err = capsys.readouterr().err
    assert "give exactly one of --text, --image or --interactive" in err
    assert "--gallery draws one query's results" in err
