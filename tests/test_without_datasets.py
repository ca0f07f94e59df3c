"""The engine without the `datasets` package (as on machines where it is not installed): every
module imports, digits trains from the command line, the original MNIST and CIFAR files and token
shards load and train, and what does need the package (the dataset hub, a datasets save, preparing
shards from text) says so in one line with a non-zero exit instead of a traceback.

Each case runs in a fresh process with the package hidden (tests/hidden_packages.py)."""
import json

from hidden_packages import ROOT, run_without

IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
import noprop_fast
names = sorted(m.name for m in pkgutil.walk_packages(noprop_fast.__path__, "noprop_fast."))
for name in names:
    importlib.import_module(name)
assert "datasets" not in sys.modules
print(len(names))
"""


def test_every_module_imports_without_datasets():
    result = run_without({"datasets"}, IMPORT_EVERYTHING)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) > 20  # the walk found the package's modules


RUNS = """
import json, sys
sys.path.insert(0, "tests")
from pathlib import Path
import numpy as np
from original_files import make_cifar, make_mnist
from noprop_fast.data import load_image_dataset
from noprop_fast.data.shards import TokenData, write_shard
from noprop_fast.data.tokenizer import ByteTokenizer
from noprop_fast.train import main

out = Path(sys.argv[1])
tiny = ["--num-blocks", "2", "--batch-size", "256", "--no-progress", "--epochs", "1"]
codes = {"digits": main([*tiny, "--dataset", "digits", "--out", str(out / "digits")])}
make_mnist(out / "mnist")
mnist = load_image_dataset("mnist", str(out / "mnist"))
make_cifar(out / "cifar")
cifar = load_image_dataset("cifar10", str(out / "cifar"))
codes["mnist"] = main([*tiny, "--dataset", "mnist", "--data-dir", str(out / "mnist"),
                       "--out", str(out / "mnist-run")])

text = ByteTokenizer().encode("noprop blocks train alone " * 120)
(out / "shards").mkdir()
write_shard(out / "shards" / "demo_val_000000.bin", text[:600], tokenizer="byte")
write_shard(out / "shards" / "demo_train_000001.bin", text[600:], tokenizer="byte")
tokens = TokenData.load(out / "shards")
codes["lm"] = main(["--task", "lm", "--width", "32", "--heads", "2", "--embed-dim", "8",
                    "--num-blocks", "2", "--seq-len", "16", "--batch-size", "4",
                    "--eval-tokens", "64", "--eval-chains", "2", "--sample-tokens", "0",
                    "--no-progress", "--device", "cpu", "--max-steps", "2", "--eval-every", "2",
                    "--data-dir", str(out / "shards"), "--out", str(out / "lm")])
assert "datasets" not in sys.modules
print(json.dumps({"codes": codes, "mnist": list(mnist.train_x.shape), "cifar": list(cifar.train_x.shape),
                  "tokens": [len(tokens.train[0]), len(tokens.val[0])], "vocab": tokens.vocab_size}))
"""


def test_digits_original_files_and_shards_train_without_datasets(tmp_path):
    result = run_without({"datasets"}, RUNS, str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["codes"] == {"digits": 0, "mnist": 0, "lm": 0}, result.stderr[-3000:]
    assert out["mnist"] == [20, 1, 28, 28] and out["cifar"][1:] == [3, 32, 32]
    assert out["tokens"] == [len("noprop blocks train alone " * 120) - 600, 600] and out["vocab"] == 257
    assert (tmp_path / "digits").is_dir() and (tmp_path / "lm").is_dir()


NEEDS_DATASETS = """
import sys
from pathlib import Path
from noprop_fast.train import main
from noprop_fast.data.prepare import main as prepare

out = Path(sys.argv[1])
(out / "save").mkdir()
(out / "save" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
(out / "a.jsonl").write_text('{"text": "some text"}\\n')
tiny = ["--num-blocks", "2", "--no-progress", "--epochs", "1"]
print("hub", main([*tiny, "--dataset", "mnist", "--out", str(out / "r1")]), file=sys.stderr)
print("save", main([*tiny, "--dataset", "cifar10", "--data-dir", str(out / "save"),
                    "--out", str(out / "r2")]), file=sys.stderr)
print("prepare", prepare(["--out", str(out / "shards"), "--input", str(out / "a.jsonl"),
                          "--tokenizer", "byte"]), file=sys.stderr)
"""


def test_what_needs_datasets_says_so_in_one_line(tmp_path):
    result = run_without({"datasets"}, NEEDS_DATASETS, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    # each failure: its one error line, then the exit code the test printed
    assert [l.split()[0] for l in lines] == ["error:", "hub", "error:", "save", "error:", "prepare"], lines
    assert lines[1] == "hub 2" and lines[3] == "save 2" and lines[5] == "prepare 2"
    hub, save, prepare = lines[0], lines[2], lines[4]
    for line in (hub, save, prepare):
        assert "needs the `datasets` package, which is not installed" in line, line
    assert "ylecun/mnist" in hub or "mnist" in hub.lower()
    assert "--data-dir" in hub and str(tmp_path / "save") in save and "text" in prepare


PLAIN_TEXT = """
import sys
from pathlib import Path
import numpy as np
from noprop_fast.data.prepare import main as prepare
from noprop_fast.data.shards import TokenData

out = Path(sys.argv[1])
(out / "a.txt").write_bytes("A held-out book,\\r\\nits first page: caf\\u00e9.\\n".encode())
(out / "b.md").write_text("# Notes\\n\\n" + "plain prose " * 50)
code = prepare(["--out", str(out / "shards"), "--input", str(out / "a.txt"), str(out / "b.md"),
                "--tokenizer", "byte", "--val-tokens", "10", "--no-progress"])
data = TokenData.load(out / "shards")
assert "datasets" not in sys.modules
print(code, bytes(np.asarray(data.val[0]).astype(np.uint8)).hex(), data.num_tokens("train"))
"""


def test_plain_text_prepares_without_datasets(tmp_path):
    """.txt and .md input needs neither `datasets` nor a network: each file is one document, read
    as UTF-8 with universal newlines (what the `datasets` text loader did)."""
    result = run_without({"datasets"}, PLAIN_TEXT, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    code, val, train = result.stdout.split()[-3:]
    assert code == "0", result.stderr[-3000:]
    first = "A held-out book,\nits first page: caf\u00e9.\n".encode()  # CRLF read as LF
    assert bytes.fromhex(val) == b"\x00" + first  # EOT (256) first, as a uint8 0
    assert int(train) == 1 + len("# Notes\n\n" + "plain prose " * 50)
