"""`sophon-fast protect|attack` on the user's own model and data: a Hugging Face model directory and text files,
image folders and .npz arrays; bad input as one line naming the file; nothing written to --out on failure."""
import json

import numpy as np
import pytest
import torch

from sophon_fast import cli

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _tiny_llama(path):
    """A 1-layer Llama and a byte-level BPE tokenizer trained here, both saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>",
                                               unk_token="<unk>")
    tok.save_pretrained(path)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


@pytest.fixture
def lm_files(tmp_path):
    _tiny_llama(tmp_path / "model")
    (tmp_path / "english.txt").write_text("\n\n".join(
        f"the quick brown fox number {i} jumps over the lazy dog, again and again" for i in range(30)))
    (tmp_path / "python.jsonl").write_text("\n".join(
        json.dumps({"text": f"def f{i}(x):\n    return x * {i} + 1"}) for i in range(30)))
    return tmp_path


def test_hugging_face_round_trip_through_the_command_line(lm_files, capsys):
    """protect --task lm writes a directory from_pretrained loads, equal to the Python API's result."""
    import sophon_fast as sf
    d = lm_files
    assert cli.main(["--threads", "1", "protect", "--task", "lm", "--model", str(d / "model"),
                     "--original", str(d / "english.txt"), "--restricted", str(d / "python.jsonl"),
                     "--out", str(d / "protected"), "--iterations", "2", "--inner-steps", "2", "--block-size", "16",
                     "--seed", "0", "--no-progress"]) == 0
    assert "protected model written" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d / "protected")
    tok = transformers.AutoTokenizer.from_pretrained(d / "protected")
    assert tok.eos_token == "<eos>" and json.loads((d / "protected" / "sophon_fast.json").read_text())["task"] == "lm"

    model = transformers.AutoModelForCausalLM.from_pretrained(d / "model")      # the same settings in Python
    base_tok = transformers.AutoTokenizer.from_pretrained(d / "model")
    english = sf.data.user.text_blocks(str(d / "english.txt"), base_tok, 16)
    python = sf.data.user.text_blocks(str(d / "python.jsonl"), base_tok, 16)
    cfg = sf.recipes.language_model().replace(iterations=2, inner_steps=2, seed=0, progress=False)
    expected = sf.protect(model, english[0], [python[0]], cfg, original_test=english[1]).model

    ids = python[1][0][:2]
    with torch.no_grad():
        got, want = loaded(ids).logits, expected(ids).logits
        before = transformers.AutoModelForCausalLM.from_pretrained(d / "model")(ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got, before)                      # protection changed the weights

    assert cli.main(["--threads", "1", "attack", "--task", "lm", "--model", str(d / "protected"), "--unprotected",
                     str(d / "model"), "--restricted", str(d / "python.jsonl"), "--steps", "2", "--batch-size", "2",
                     "--block-size", "16", "--out", str(d / "attacks")]) == 0
    rows = json.loads((d / "attacks" / "attacks.json").read_text())
    assert {r["method"] for r in rows} == {"full", "lora"} and all(len(r["scratch"]) == 3 for r in rows)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("sophon-fast: error:") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_naming_the_file_and_out_stays_untouched(lm_files, capsys, monkeypatch):
    d = lm_files
    (d / "blank.txt").write_text("\n\n   \n")
    (d / "broken.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    args = ["protect", "--task", "lm", "--restricted", str(d / "python.jsonl"), "--out", str(d / "out"),
            "--iterations", "1", "--block-size", "16", "--no-progress"]
    assert cli.main(args + ["--model", str(d), "--original", str(d / "english.txt")]) == 2
    assert f"{d}: holds no Hugging Face model" in _error(capsys)
    assert cli.main(args + ["--model", str(d / "model"), "--original", str(d / "blank.txt")]) == 2
    assert f"{d / 'blank.txt'}: no text" in _error(capsys)
    assert cli.main(args + ["--model", str(d / "model"), "--original", str(d / "broken.jsonl")]) == 2
    assert f"{d / 'broken.jsonl'} line 2:" in _error(capsys)
    assert not (d / "out").exists()

    (d / "out").mkdir()                          # a failed run leaves an existing --out as it was, and no temporaries
    (d / "out" / "keep").write_text("old")
    def fail(*a, **k):
        raise RuntimeError("simulated failure while saving")
    monkeypatch.setattr(type(transformers.AutoTokenizer.from_pretrained(d / "model")), "save_pretrained", fail)
    assert cli.main(args + ["--model", str(d / "model"), "--original", str(d / "english.txt")]) == 2
    assert "simulated failure" in _error(capsys)
    assert [p.name for p in (d / "out").iterdir()] == ["keep"]
    assert not [p for p in d.iterdir() if p.name.startswith(".out.")]


def _images(root, classes, n=10, size=20, seed=0):
    from PIL import Image
    rng = np.random.RandomState(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((rng.rand(size, size) * 255).astype(np.uint8)).save(root / c / f"{i}.png")


def test_image_folders_and_npz_arrays(tmp_path, capsys):
    import sophon_fast as sf
    sf.save_model(sf.models.build("cnn_small", num_classes=2, seed=0), tmp_path / "cnn.safetensors")
    _images(tmp_path / "original", ["cat", "dog"])
    _images(tmp_path / "restricted", ["cat", "dog"], seed=1)
    _images(tmp_path / "one_class", ["cat"], seed=2)
    rng = np.random.RandomState(0)
    np.savez(tmp_path / "original.npz", x=(rng.rand(40, 28, 28) * 255).astype(np.uint8), y=np.arange(40) % 2)
    np.savez(tmp_path / "restricted.npz", images=rng.rand(40, 28, 28, 1).astype(np.float32), labels=np.arange(40) % 2)
    base = ["--threads", "1", "protect", "--model", str(tmp_path / "cnn.safetensors"), "--iterations", "1",
            "--inner-steps", "2", "--no-progress"]
    for kind, (o, r) in {"folder": ("original", "restricted"), "npz": ("original.npz", "restricted.npz")}.items():
        out = tmp_path / f"{kind}.safetensors"
        assert cli.main(base + ["--original", str(tmp_path / o), "--restricted", str(tmp_path / r),
                                "--out", str(out)]) == 0
        assert sf.load_model(out).sophon_arch["kwargs"]["num_classes"] == 2
    capsys.readouterr()
    assert cli.main(base + ["--original", str(tmp_path / "original"), "--restricted", str(tmp_path / "one_class"),
                            "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert f"{tmp_path / 'one_class'}: class 'dog' of the original data" in _error(capsys)
    assert not (tmp_path / "bad.safetensors").exists()
    np.savez(tmp_path / "three.npz", x=np.zeros((6, 28, 28), np.uint8), y=np.arange(6) % 3)
    assert cli.main(base + ["--original", str(tmp_path / "original.npz"), "--restricted", str(tmp_path / "three.npz"),
                            "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert f"{tmp_path / 'three.npz'}: label 2, but the model has 2 classes" in _error(capsys)
    assert cli.main(base + ["--original", str(tmp_path / "original.npz"), "--restricted", str(tmp_path),
                            "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert f"{tmp_path / 'one_class'}: no image files" in _error(capsys)


def test_a_datasets_directory(tmp_path):
    """Hugging Face datasets directories (save_to_disk): a text column, and image/label columns with a test split."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from sophon_fast.data.user import read_images, read_texts
    datasets.Dataset.from_dict({"text": [f"line {i} of text" for i in range(12)]}).save_to_disk(tmp_path / "text")
    assert read_texts(str(tmp_path / "text"))[:2] == ["line 0 of text", "line 1 of text"]
    rng = np.random.RandomState(0)
    split = {n: datasets.Dataset.from_dict({"image": [Image.fromarray((rng.rand(20, 20) * 255).astype(np.uint8))
                                                      for _ in range(k)], "label": [i % 2 for i in range(k)]})
             for n, k in (("train", 10), ("test", 4))}
    datasets.DatasetDict(split).save_to_disk(tmp_path / "images")
    got = read_images(str(tmp_path / "images"), channels=1, size=28)
    assert got.train[0].shape == (10, 1, 28, 28) and got.test[0].shape == (4, 1, 28, 28) and got.classes == ["0", "1"]
    assert -1 <= float(got.train[0].min()) and float(got.train[0].max()) <= 1
    datasets.Dataset.from_dict({"txt": ["a"]}).save_to_disk(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"bad: no 'text' column"):
        read_texts(str(tmp_path / "bad"))
