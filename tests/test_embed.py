"""The embedding API and `python -m moca.embed`: batched equals one-at-a-time, files written whole."""

import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_oracle import random_image
from moca import Processor, load_model
from moca.embed import InputError, embed_items, item_cost, item_costs, main, sample_cost
from moca.image import ImageError
from moca.processor import TruncationError

MARKER = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def tiny():
    model = load_model("tiny")
    model.attn_backend = "torch"
    return model, Processor.from_pretrained("tiny")


def _items():
    return [
        {"text": "a short text"},
        {"text": MARKER + "Represent the given image.\n", "images": [random_image(200, 120, 1)]},
        {"text": "a much longer text " * 30},
        {"text": "two " + MARKER + " images " + MARKER, "images": [random_image(60, 60, 2), random_image(90, 300, 3)]},
        {"text": "x"},
    ]


def test_batched_equals_one_at_a_time(tiny):
    model, proc = tiny
    items = _items()
    # A small budget forces several micro-batches in cost order, not input order.
    batched = embed_items(model, proc, items, batch_tokens=300)
    single = torch.cat([model.embed(proc([it])) for it in items])
    assert batched.shape == (len(items), model.config.hidden_size)
    assert (batched - single).abs().max().item() <= 1e-6
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(items)), atol=1e-6)


def test_workers_and_item_limit_equal_one_at_a_time(tiny, tmp_path):
    model, proc = tiny
    random_image(97, 131, 7).save(tmp_path / "p.png")
    buf = tmp_path / "b.jpg"
    random_image(57, 29, 8).save(buf)
    items = _items() + [
        {"text": MARKER + "a path", "images": [str(tmp_path / "p.png")]},
        {"text": "<image> bytes", "images": [buf.read_bytes()]},
        {"images": [{"path": str(tmp_path / "p.png")}]},
    ]
    single = torch.cat([model.embed(proc([it])) for it in items])
    # DataLoader workers decode and pack; at most 2 inputs per micro-batch
    batched = embed_items(model, proc, items, batch_tokens=700, num_workers=2, max_items=2)
    assert (batched - single).abs().max().item() <= 1e-6


def test_item_cost_matches_the_encoded_sample_without_decoding(tiny, tmp_path):
    model, proc = tiny
    random_image(173, 97, 9).save(tmp_path / "c.png")
    items = _items() + [{"text": "<|image_1|> phi marker", "images": [str(tmp_path / "c.png")]},
                        {"images": [{"bytes": (tmp_path / "c.png").read_bytes()}]}]
    assert [item_cost(proc, it) for it in items] == [sample_cost(proc.encode(it)) for it in items]
    # a missing file is named, with the input, before any pixel is decoded
    with pytest.raises(InputError, match="input 1: image file not found: .*nope.png") as err:
        embed_items(model, proc, [{"text": "fine"}, {"text": MARKER, "images": [str(tmp_path / "nope.png")]}])
    assert isinstance(err.value.__cause__, ImageError)
    with pytest.raises(ValueError, match="names 1 image"):
        item_cost(proc, {"text": MARKER, "images": []})


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_batched_costs_equal_each_encoded_sample(tiny, tmp_path, chunk):
    _, proc = tiny
    random_image(173, 97, 9).save(tmp_path / "c.png")
    items = _items() + [{"text": "<|image_1|> phi marker", "images": [str(tmp_path / "c.png")]},
                        {"text": "héllo wörld, 日本語のテキスト " * 7}]
    assert item_costs(proc, items, chunk=chunk).tolist() == [sample_cost(proc.encode(it)) for it in items]
    # an input that cannot be embedded is named, whichever chunk it falls in
    bad = items[:4] + [{"text": MARKER, "images": [str(tmp_path / "nope.png")]}]
    with pytest.raises(InputError, match="x.jsonl:5: image file not found"):
        item_costs(proc, bad, names=[f"x.jsonl:{i}" for i in range(1, 6)], chunk=chunk)
    with pytest.raises(InputError, match="input 2: 'text' must be a string"):
        item_costs(proc, [{"text": "ok"}, {"text": "ok"}, {"text": 3}], chunk=chunk)


def test_cli_jsonl_writes_npy_and_safetensors(tiny, tmp_path, capsys):
    model, proc = tiny
    random_image(80, 120, 5).save(tmp_path / "a.png")
    lines = [{"text": "hello world"}, {"text": MARKER + "Represent the given image.", "images": ["a.png"]}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "vec.npy"
    main(["--jsonl", str(tmp_path / "in.jsonl"), "--output", str(out), "--device", "cpu"])
    npy = np.load(out)
    st = load_file(tmp_path / "vec.safetensors")["embeddings"]
    items = [{"text": "hello world"}, {"text": lines[1]["text"], "images": [str(tmp_path / "a.png")]}]
    expected = embed_items(model, proc, items)
    assert np.allclose(npy, expected.numpy(), atol=1e-5) and torch.equal(torch.from_numpy(npy), st)
    table = capsys.readouterr().out
    assert "in.jsonl:1" in table and "1.0000" in table


def test_cli_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(InputError, match="in.jsonl:2: not valid JSON"):
        main(["--jsonl", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "v.npy")])
    assert not (tmp_path / "v.npy").exists()


def _png(path, seed, size=(80, 120)):
    random_image(*size, seed=seed).save(path)
    return path


@pytest.mark.parametrize(
    "lines, message",
    [
        ([b'{"text": "ok"}', b'{"text": "caf\xe9"}'], "in.jsonl:2: not UTF-8 \\(byte 0xe9 at column 14\\)"),
        ([b'{"text": "ok"}', b"", b'{"images": ["nope.png"]}'], "in.jsonl:3: image file not found: .*nope.png"),
        ([b'{"images": ["a.png"]}', b'{"images": ["junk.png"]}'], "in.jsonl:2: cannot decode image .*junk.png"),
        ([b'{"images": ["a.png"]}', b'{"images": ["cut.png"]}'], "in.jsonl:2: cannot decode image .*cut.png"),
        ([b'{"text": "x"}', b'{"text": "%s%s", "images": ["a.png"]}' % (MARKER.encode(), MARKER.encode())],
         "in.jsonl:2: the text names 2 image"),
        ([b'{"text": "<image>", "images": "a.png"}'], "in.jsonl:1: 'images' must be a list"),
        ([b'{"text": 7}'], "in.jsonl:1: 'text' must be a string"),
        ([b'{"text": "<image> a caption", "image": "a.png"}'], "in.jsonl:1: an input's images go in 'images'.*'image'"),
        ([b'[1, 2]'], "in.jsonl:1: an input is a dict"),
    ],
    ids=["not-utf8", "missing-image", "junk-image", "truncated-image", "marker-mismatch", "images-not-list",
         "text-not-str", "image-key", "not-an-object"],
)
def test_cli_bad_input_names_file_and_line(tmp_path, lines, message):
    _png(tmp_path / "a.png", 1)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    good = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])  # header intact: fails only when decoded
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputError, match=message):
        main(["--jsonl", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "v.npy"), "--device", "cpu"])
    assert not list(tmp_path.glob("v.*"))


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n"], ids=["empty", "blank"])
def test_cli_empty_jsonl_is_an_error_not_the_demo(tmp_path, content):
    (tmp_path / "in.jsonl").write_bytes(content)
    with pytest.raises(InputError, match="in.jsonl: no inputs"):
        main(["--jsonl", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "v.npy"), "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("folder, output", [("out", "out"), ("out.npy", "out.npy"), ("out.safetensors", "out.npy")])
def test_cli_output_folder_is_refused_and_nothing_written(tmp_path, folder, output):
    (tmp_path / folder).mkdir()
    with pytest.raises(InputError, match=f"{folder} is a folder"):
        main(["--text", "hello", "--output", str(tmp_path / output), "--device", "cpu"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [folder]


def test_failed_write_leaves_no_temp_files(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from moca.embed import vector_files

    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        with vector_files(str(tmp_path / "v.npy"), 2, 3) as v:
            v.fill_(1.0)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="input 1"):  # an input that fails half-way: nothing written either
        with vector_files(str(tmp_path / "v.npy"), 2, 3) as v:
            v[0] = 1.0
            raise InputError("input 1: bad")
    assert list(tmp_path.iterdir()) == []

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)  # a disk too small: refused before any vector is embedded
    with pytest.raises(OSError, match="No space left"):
        with vector_files(str(tmp_path / "v.npy"), 2, 3):
            pytest.fail("embedded onto a disk that cannot hold the vectors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("platform", ["no fallocate", "EOPNOTSUPP"])
def test_vectors_are_written_where_blocks_cannot_be_allocated_up_front(tmp_path, monkeypatch, platform):
    """macOS has no posix_fallocate and some file systems refuse it: the vectors are written all the same."""
    import errno

    from moca.embed import vector_files

    if platform == "no fallocate":
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    else:
        monkeypatch.setattr(os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "no")))
    with vector_files(str(tmp_path / "v.npy"), 2, 3) as v:
        v.copy_(torch.arange(6.0).view(2, 3))
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), np.arange(6.0).reshape(2, 3))


def test_vectors_stream_into_the_memory_mapped_output(tiny, tmp_path):
    """The CLI's vectors are embed_items' own, written row by row into the .npy that becomes the output (no copy
    in host memory), with the same values in the .safetensors beside it."""
    from moca.embed import vector_files

    model, proc = tiny
    items = [{"text": f"item {i} " * (1 + i % 5)} for i in range(7)]
    expected = embed_items(model, proc, items, batch_tokens=40)
    with vector_files(str(tmp_path / "v"), len(items), model.config.hidden_size) as out:
        got = embed_items(model, proc, items, batch_tokens=40, out=out)
        assert got is out
        assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npy.tmp"]  # the rows land in the file itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npy", "v.safetensors"]
    assert (tmp_path / "v.safetensors").stat().st_mode == (tmp_path / "v.npy").stat().st_mode
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), expected.numpy())
    torch.testing.assert_close(load_file(tmp_path / "v.safetensors")["embeddings"], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out must be a \\(7, "):
        embed_items(model, proc, items, out=torch.empty(6, model.config.hidden_size))


def test_truncation_never_merges_two_images(tiny, tmp_path, capsys):
    """Two different 112x112 images, each 16 pads + vision_start/end = 18 tokens (tiny preset)."""
    model, proc = tiny
    red, blue = _png(tmp_path / "red.png", 3, (112, 112)), _png(tmp_path / "blue.png", 4, (112, 112))
    with pytest.raises(InputError, match="image: red.png: the input's 1 image\\(s\\) take 18 tokens") as err:
        main(["--max-length", "16", "--image", str(red), "--image", str(blue), "--output", str(tmp_path / "v.npy")])
    assert isinstance(err.value.__cause__, TruncationError)
    assert not list(tmp_path.glob("v.*"))
    # with room for the images but not the text: text is cut, the images stay whole and different
    limited = Processor.from_pretrained("tiny", max_length=21)
    items = [{"text": MARKER + " a caption long enough to be cut here", "images": [str(p)]} for p in (red, blue)]
    vectors = embed_items(model, limited, items)
    expected = []
    for it in items:
        full = proc.encode(it)
        ids = full.input_ids.tolist()
        assert ids[:18].count(151655) == 16 and len(ids) > 21
        sample = type(full)(full.input_ids[:21], full.patches, full.grids)  # the image first: the tail is text
        expected.append(model.embed(proc.pack([sample]))[0])
    assert (vectors - torch.stack(expected)).abs().max().item() <= 1e-6
    assert float(vectors[0] @ vectors[1]) < 0.999


@pytest.mark.gpu
def test_cuda_bf16_pinned_workers_path_matches_fp32():
    """The CUDA path (bf16, Triton attention, pinned non-blocking copies, workers) against fp32 one at a time."""
    proc = Processor.from_pretrained("tiny")
    ref_model = load_model("tiny", device="cuda", dtype=torch.float32)
    model = load_model("tiny", device="cuda", dtype=torch.bfloat16)
    items = _items() * 7  # many micro-batches, so the one-batch-late copy-back is exercised
    with torch.no_grad():
        ref = torch.cat([ref_model.embed(proc([it]).to("cuda")).cpu() for it in items])
        single = torch.cat([model.embed(proc([it]).to("cuda")).cpu() for it in items])
    batched = embed_items(model, proc, items, batch_tokens=300, num_workers=2)
    err_single = (single - ref).abs().max().item()
    assert (batched - ref).abs().max().item() <= 2 * err_single + 1e-3
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(items)), atol=1e-5)


def test_cli_rows_follow_the_command_line_order(tiny, tmp_path):
    model, proc = tiny
    image = _png(tmp_path / "a.png", 2)
    vectors = main(["--text", "A", "--image", str(image), "--text", "B", "--output", str(tmp_path / "v"),
                    "--device", "cpu", "--show", "0"])
    expected = embed_items(model, proc, [{"text": "A"}, {"text": MARKER, "images": [str(image)]}, {"text": "B"}])
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("output, npy, st", [("v.safetensors", "v.npy", "v.safetensors"),
                                             ("v.NPY", "v.NPY", "v.safetensors"), ("v", "v.npy", "v.safetensors")])
def test_output_suffix_is_either_format(tmp_path, output, npy, st):
    from moca.embed import vector_paths

    assert vector_paths(str(tmp_path / output)) == (str(tmp_path / npy), str(tmp_path / st))


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path):
    import subprocess
    import sys

    (tmp_path / "in.jsonl").write_text("\n")
    run = subprocess.run([sys.executable, "-m", "moca.embed", "--jsonl", str(tmp_path / "in.jsonl"), "--output",
                          str(tmp_path / "v.npy")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().endswith("moca.embed: " + str(tmp_path / "in.jsonl") + ": no inputs (the file is empty "
                                       "or holds only blank lines)")


@pytest.mark.parametrize("item, message", [({"text": MARKER, "images": "a.png"}, "'images' must be a list"),
                                           ({"text": 7}, "'text' must be a string"),
                                           ({"text": "a photo", "image": ["a.png"]}, "an input's images go in 'images'"),
                                           ({"images": [None]}, "cannot load an image from NoneType"),
                                           ({"images": [np.zeros((4, 4, 3), np.uint8)]}, "cannot load an image from ndarray")])
def test_api_bad_item_types_are_named(tiny, item, message):
    """One path alone is not split into characters (the old error named an image file '.')."""
    model, proc = tiny
    with pytest.raises(InputError, match=f"input 1: {message}"):
        embed_items(model, proc, [{"text": "fine"}, item])
    with pytest.raises(TypeError, match=message):
        proc.encode(item)


def test_worker_decode_error_is_one_line(tiny, tmp_path):
    """An image whose header reads but whose pixels do not fails in a DataLoader worker: the error names
    the input, without the worker's traceback."""
    model, proc = tiny
    good = _png(tmp_path / "a.png", 1).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    items = [{"text": "fine"}, {"images": [str(tmp_path / "cut.png")]}]
    with pytest.raises(InputError) as err:
        embed_items(model, proc, items, num_workers=1)
    assert str(err.value).startswith("input 1: ") and "Traceback" not in str(err.value)


@pytest.mark.parametrize("args, message", [
    (["--jsonl", "{tmp}/none.jsonl"], "{tmp}/none.jsonl: No such file or directory"),
    (["--model", "{tmp}/no-model", "--text", "hi"], "'{tmp}/no-model' is neither a checkpoint directory nor a preset "
                                                     "(tiny, 3b, 7b)"),
    (["--text", "hi", "--output", "{tmp}/afile/v.npy"], "--output {tmp}/afile/v.npy: {tmp}/afile is a file, not a folder"),
], ids=["missing-jsonl", "bad-model", "output-under-a-file"])
def test_cli_user_errors_are_one_line(tmp_path, args, message):
    import subprocess
    import sys

    (tmp_path / "afile").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    run = subprocess.run([sys.executable, "-m", "moca.embed", *args], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.splitlines() == ["moca.embed: " + message.format(tmp=tmp_path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("output, message", [("afile/v.npy", "afile is a file, not a folder"),
                                             ("afile/sub/v.npy", r"cannot write in .*afile/sub \(Not a directory\)")])
def test_cli_bad_output_fails_before_the_model_loads(tmp_path, monkeypatch, output, message):
    import moca.embed

    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(moca.embed, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking --output"))
    with pytest.raises(OSError, match=message):
        main(["--text", "hello", "--output", str(tmp_path / output), "--device", "cpu"])
    assert [p.name for p in tmp_path.rglob("*")] == ["afile"] and (tmp_path / "afile").read_text() == ""


@pytest.mark.parametrize("cli, flags, message", [
    ("moca.embed", ["--batch-tokens", "0"], "--batch-tokens: must be >= 1, got 0"),
    ("moca.embed", ["--num-workers", "-1"], "--num-workers: must be >= 0, got -1"),
    ("moca.embed", ["--max-length", "0"], "--max-length: must be >= 1"),
    ("moca.serve", ["--max-queue", "0"], "--max-queue: must be >= 1"),
    ("moca.serve", ["--port", "65536"], r"--port: must be in \[0, 65535\]"),
    ("moca.serve", ["--body-timeout", "nan"], "--body-timeout: must be > 0.0"),
    ("moca.serve", ["--api-key", ""], "--api-key: a key is one word, without spaces"),
    ("moca.serve", ["--api-key", "two words"], "--api-key: a key is one word, without spaces"),
    ("engine.evaluate", ["mmeb", "--data", "d", "--images", "i", "--output", "o", "--batch-tokens", "x"],
     "--batch-tokens: not an integer: 'x'"),
])
def test_cli_flag_values_are_checked_when_parsed(tmp_path, monkeypatch, capsys, cli, flags, message):
    """A nonsense number is a usage error (status 2) naming the flag, before a model loads or a file is written."""
    import importlib

    import moca.checkpoint
    import moca.embed

    def parsed(name):  # each CLI's first step after parsing: a flag let through fails here, fast
        raise AssertionError(f"{flags} parsed")

    monkeypatch.setattr(moca.checkpoint, "check_model_name", parsed)
    monkeypatch.setattr(moca.embed, "check_model_name", parsed)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(cli).main([*flags, "--output", "out.npy"] if cli == "moca.embed" else flags)
    assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cli", ["moca.embed", "moca.serve", "engine.train"])
@pytest.mark.parametrize("device, built, gpus, message", [
    ("foo", False, 0, "foo: expected cpu, cuda or cuda:N"),
    ("cuda", False, 0, r"cuda: torch here has no CUDA \(a CPU-only build\)"),
    ("cuda", True, 0, r"cuda: torch sees no CUDA device here \(driver, CUDA_VISIBLE_DEVICES\)"),
    ("cuda:2", True, 2, r"cuda:2: torch sees 2 CUDA device\(s\) here, cuda:0 to cuda:1"),
])
def test_device_is_checked_when_parsed(tmp_path, monkeypatch, capsys, cli, device, built, gpus, message):
    """One check for every CLI, whatever this machine has (the CUDA queries are faked), before any work."""
    import importlib

    import engine.parallel
    import moca.checkpoint
    import moca.embed

    def parsed(*args):  # each CLI's first step after parsing
        raise AssertionError(f"--device {device} parsed")

    for module, name in ((moca.checkpoint, "check_model_name"), (moca.embed, "check_model_name"),
                         (engine.parallel, "init_distributed")):
        monkeypatch.setattr(module, name, parsed)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.chdir(tmp_path)
    if cli == "engine.train" and device == "cuda:2":  # a rank's GPU is cuda:LOCAL_RANK: an index is refused
        message = (r"cuda:2: a training process runs on cuda:LOCAL_RANK \(cuda:0 without torchrun\): give cuda, and "
                   "choose the GPUs with CUDA_VISIBLE_DEVICES")
    argv = {"moca.embed": ["--output", "out.npy"], "moca.serve": [], "engine.train": ["cpt"]}[cli]
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(cli).main([*argv, "--device", device])
    assert exit_.value.code == 2 and re.search(f"error: argument --device: {message}$", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_cli_output_ending_in_a_slash_is_refused_before_anything_is_made(tmp_path, monkeypatch):
    import moca.embed

    monkeypatch.setattr(moca.embed, "load_model", lambda *a, **k: pytest.fail("loaded the model before --output"))
    output = str(tmp_path / "o3" / "dir") + os.sep
    with pytest.raises(InputError, match=re.escape(f"--output {output}: {output} is a folder; give a file path such as "
                                                   f"{output}embeddings.npy")):
        main(["--text", "hello", "--output", output, "--device", "cpu"])
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_one_line_status_130_and_leaves_no_temp_file(tmp_path):
    """SIGINT while embedding: the real signal, raised inside `vector_files` as a user's Ctrl-C would be."""
    import subprocess
    import sys

    script = ("import os, signal, sys\n"
              "import moca.embed\n"
              "moca.embed.embed_items = lambda *a, **k: os.kill(os.getpid(), signal.SIGINT)\n"
              "sys.argv[1:] = ['--text', 'hi', '--output', 'v.npy', '--device', 'cpu']\n"
              "moca.embed.run_cli(moca.embed.main, 'moca.embed')\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 130 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == "moca.embed: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_ends_a_cli_with_one_line_other_os_errors_keep_their_traceback():
    import errno

    from moca.embed import run_cli

    def fails(error):
        def main():
            raise error
        return main

    for code in (errno.ENOSPC, errno.EDQUOT):
        with pytest.raises(SystemExit) as done:
            run_cli(fails(OSError(code, os.strerror(code), "/data/v.npy.tmp")), "moca.embed")
        assert done.value.code == f"moca.embed: /data/v.npy.tmp: {os.strerror(code)}"
    with pytest.raises(SystemExit, match="^moca.embed: nope.jsonl: No such file"):
        run_cli(fails(FileNotFoundError(errno.ENOENT, "No such file or directory", "nope.jsonl")), "moca.embed")
    with pytest.raises(OSError, match="I/O error"):  # not the user's doing: a traceback
        run_cli(fails(OSError(errno.EIO, "I/O error")), "moca.embed")
    with pytest.raises(SystemExit, match="^moca.embed: input 3: bad$"):
        run_cli(fails(InputError("input 3: bad")), "moca.embed")


def test_an_undecodable_header_reads_as_the_decoder_says_it(tmp_path):
    """The cost pass reads image headers only (`image_size`); its error for bytes that are no image names the input
    as the decoder's does, not PIL's BytesIO object."""
    from moca.embed import image_size
    from moca.image import load_image

    (tmp_path / "junk.png").write_bytes(b"not an image")
    for src, name in ((b"not an image", "<bytes>"), ({"bytes": b"not an image"}, "<bytes>"),
                      (str(tmp_path / "junk.png"), str(tmp_path / "junk.png"))):
        message = f"cannot decode image {name}: not an image format PIL reads"
        for read in (image_size, load_image):
            with pytest.raises(ImageError, match=f"^{re.escape(message)}$"):
                read(src)
