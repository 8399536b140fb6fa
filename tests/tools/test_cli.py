"""The `ic` CLI as a new user meets it: one-line errors naming the input and the fix (exit code 2),
outputs checked before the work, --model specs (cwd factories, strict checkpoints), --help."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ic_compile.cli import main
from ic_compile import dsa_model
from ic_compile.tools.models import ModelSpecError, load_checkpoint, load_model

REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ic ARGV` run in this process (argparse errors exit via SystemExit)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err  # no traceback, no bar
    assert lines[0].startswith(f"ic {command}: error: ")
    return lines[0]


# ------------------------------------------------------------------ outputs are checked before the work
@pytest.mark.parametrize("argv, flag", [
    (["search", "--model", "dsa:tiny", "--data", str(REPO / "README.md"), "--num-full", "1",
      "--out", "/proc/ic-test/out"], "--out /proc/ic-test/out"),
    (["export", "--model", "dsa:tiny", "--out", "/proc/ic-test.onnx"], "--out /proc/ic-test.onnx"),
    (["overlap", "--model", "dsa:tiny", "--out", "/proc/ic-test"], "--out /proc/ic-test"),
    (["diff", "--model", "dsa:tiny", "--plan", "FSSF", "--html", "/proc/ic-test.html"], "--html /proc/ic-test.html"),
])
def test_unwritable_output_fails_before_any_work(capsys, argv, flag):
    """/proc takes no files, even for root (os.access says it does): a search (minutes) or an export
    (20-100 s) must not run first. The model is not even built: this takes well under a second."""
    start = time.perf_counter()
    code, out, err = run_cli(capsys, *argv)
    elapsed = time.perf_counter() - start
    line = one_error_line(err, argv[0])
    assert code == 2 and out == ""
    assert f"{flag}: cannot write there" in line and "give a writable" in line
    assert elapsed < 3, f"took {elapsed:.1f} s: the output was checked after the work"


def test_output_that_is_a_file_or_directory_or_in_a_missing_folder(capsys, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    code, _, err = run_cli(capsys, "search", "--data", str(a_file), "--out", str(a_file))
    assert code == 2 and f"--out {a_file}: exists and is not a directory" in one_error_line(err, "search")
    code, _, err = run_cli(capsys, "export", "--out", str(tmp_path))
    assert code == 2 and f"--out {tmp_path}: is a directory; give a file name inside it" in one_error_line(err, "export")
    code, _, err = run_cli(capsys, "export", "--out", str(tmp_path / "missing" / "m.onnx"))
    assert code == 2 and f"directory '{tmp_path / 'missing'}' does not exist; create it first" in err
    assert not (tmp_path / "missing").exists()


def test_missing_calibration_data_fails_before_the_model_is_built(capsys, tmp_path):
    for command in ("search", "overlap"):
        code, _, err = run_cli(capsys, command, "--model", "nosuch", "--data", "/nonexistent.txt",
                               "--out", str(tmp_path / command))
        # the data error, not the (later) model error: checked first
        assert code == 2 and ("--data /nonexistent.txt: does not exist; give text files or directories"
                              in one_error_line(err, command))


# ------------------------------------------------------------------ --model specs
@pytest.mark.parametrize("spec, message", [
    ("nosuch", "--model 'nosuch' is not a model spec: use one of dsa:NAME, hf:CONFIG.json, "
               "hf-tiny:glm_moe_dsa, ckpt:DIR, MODULE:FUNCTION (e.g. --model dsa:tiny)"),
    ("hf:/nonexistent/config.json", "--model hf:/nonexistent/config.json: '/nonexistent/config.json' does not "
                                    "exist; give the path of an HF config.json"),
    ("nosuch_module_xyz:build", "--model nosuch_module_xyz:build: no module named 'nosuch_module_xyz' (looked in "
                                "the working directory"),
    ("dsa:huge", "--model dsa:huge: unknown model name 'huge'; known: ['glm4.7-flash-dsa', 'small', 'tiny']"),
    ("hf-tiny:llama", "--model hf-tiny:llama: unknown type; known types are ['deepseek_v32', 'glm_moe_dsa']"),
    ("ckpt:/nonexistent", "--model ckpt:/nonexistent: '/nonexistent/config.json' does not exist"),
])
def test_bad_model_spec_is_one_line(capsys, spec, message):
    code, out, err = run_cli(capsys, "explain", "--model", spec)
    assert code == 2 and out == ""
    assert message in one_error_line(err, "explain")


def test_hf_config_that_transformers_cannot_read(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    code, _, err = run_cli(capsys, "explain", "--model", f"hf:{tmp_path}")
    line = one_error_line(err, "explain")
    assert code == 2 and f"--model hf:{tmp_path}: transformers cannot build a causal LM from" in line


FACTORY = '''
import torch
from ic_compile import dsa_model

def build():  # the form models.py documents: (model, example_inputs)
    model = dsa_model.init_weights(dsa_model.Transformer(dsa_model.ModelArgs.tiny()), 0)
    return model, {{"idx": torch.zeros(1, 16, dtype=torch.long)}}

def not_a_model():
    return "a string"


class BrokenInTwo(dsa_model.Transformer):  # a graph break inside the layer stack (MoE dispatch, a print)
    def forward(self, idx, input_pos=None):
        positions = torch.arange(idx.shape[1])
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x, topk = self.tok_embeddings(idx), None
        for i, layer in enumerate(self.layers):
            if i == 2:
                torch._dynamo.graph_break()
            x, topk = layer(x, cos, sin, positions, topk, False)
        return self.output(self.norm(x))


def broken():
    return dsa_model.init_weights(BrokenInTwo(dsa_model.ModelArgs.tiny()), 0)
'''


@pytest.fixture
def factory_in_cwd(tmp_path, monkeypatch):
    """A user's my_models.py in the working directory; sys.path restored afterwards."""
    name = "ic_test_user_models"
    (tmp_path / f"{name}.py").write_text(FACTORY.format(examples=str(REPO / "examples")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def test_factory_in_working_directory_returning_model_and_inputs(capsys, factory_in_cwd, tmp_path):
    code, out, err = run_cli(capsys, "explain", "--model", f"{factory_in_cwd}:build", "--plan", "FSSF", "--seq", "16")
    assert code == 0, err
    assert "indexcache plan FSSF: 2 of 4 indexer layers kept" in out
    # appended, never prepended: a folder in the working directory must not shadow an installed package
    assert sys.path[-1] == str(tmp_path) and sys.path.index(str(tmp_path)) > sys.path.index(
        str(Path(torch.__file__).parent.parent))


def test_explain_and_diff_on_a_graph_broken_factory_model(capsys, factory_in_cwd, tmp_path):
    """Graph breaks are reported, not refused: per fragment, then summed over the model."""
    code, out, err = run_cli(capsys, "explain", "--model", f"{factory_in_cwd}:broken", "--plan", "FSSF", "--seq", "16")
    assert code == 0, err
    assert out.startswith("indexcache plan FSSF: 2 of 4 indexer layers kept") and "graph breaks: the model" in out
    html = tmp_path / "diff.html"
    code, out, err = run_cli(capsys, "diff", "--model", f"{factory_in_cwd}:broken", "--plan", "FSSF", "--seq", "16",
                             "--json", "--html", str(html))
    assert code == 0, err
    data = json.loads(out)
    assert [(l["layer"], l["role"], l["source"]) for l in data["layers"]] == [(0, "F", 0), (1, "S", 0), (2, "S", 0),
                                                                             (3, "F", 3)]
    assert sorted(l for f in data["fragments"] for l in f["layers"]) == [0, 1, 2, 3]
    assert data["totals"]["flops_removed"] > 0 and "data-layer='2'" in html.read_text()


def test_factory_errors_name_the_fix(capsys, factory_in_cwd):
    code, _, err = run_cli(capsys, "explain", "--model", f"{factory_in_cwd}:missing")
    assert code == 2 and (f"module '{factory_in_cwd}' has no function 'missing'; it defines "
                          "['BrokenInTwo', 'broken', 'build', 'not_a_model']") in one_error_line(err, "explain")
    code, _, err = run_cli(capsys, "explain", "--model", f"{factory_in_cwd}:not_a_model")
    assert code == 2 and ("the factory returned str, not a torch.nn.Module; return the model or "
                          "(model, example_inputs)") in one_error_line(err, "explain")


# ------------------------------------------------------------------ --seq and friends
@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_bad_seq_is_rejected_by_the_parser(capsys, value):
    code, _, err = run_cli(capsys, "explain", "--seq", value)
    assert code == 2
    assert "ic explain: error: argument --seq: " in err and value in err.splitlines()[-1]
    assert "Traceback" not in err and "Dynamo" not in err


def test_seq_longer_than_the_model_is_one_line(capsys):
    code, _, err = run_cli(capsys, "explain", "--model", "dsa:tiny", "--seq", "1000")
    assert code == 2 and ("--seq 1000 is longer than the model's 256 positions (--model dsa:tiny); use --seq 256 "
                          "or less") in one_error_line(err, "explain")


def test_help_shows_defaults_and_examples(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option: the asserted texts are not wrapped
    for command, default, example in [("search", "(default: 256)", "ic search --model dsa:tiny --data"),
                                      ("export", "(default: onnx)", "ic export --model dsa:tiny --plan FSSF"),
                                      ("diff", "(default: dsa:tiny)", "ic diff --model dsa:tiny --plan FSSF"),
                                      ("overlap", "(default: 32)", "ic overlap --model dsa:tiny"),
                                      ("explain", "(default: 0)", "ic explain --model dsa:tiny --plan FSSF")]:
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0 and default in out and "examples:" in out and example in out, out
        assert "(default: None)" not in out and "(default: False)" not in out
    code, out, _ = run_cli(capsys, "search", "--help")
    assert "sequences per forward pass (default: 8)" in out and "torch device for the model" in out


def test_console_script_prints_one_line_without_traceback():
    """The installed `ic` (a console script: the working directory is not on sys.path)."""
    ic = Path(sys.executable).parent / "ic"
    run = subprocess.run([str(ic), "explain", "--model", "nosuch"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "ic explain: error: --model 'nosuch' is not a model spec: use one of dsa:NAME, hf:CONFIG.json, "
        "hf-tiny:glm_moe_dsa, ckpt:DIR, MODULE:FUNCTION (e.g. --model dsa:tiny)"]


# ------------------------------------------------------------------ checkpoints load strictly
def save_checkpoint(folder: Path, drop: str | None = None, extra: str | None = None) -> torch.nn.Module:
    from safetensors.torch import save_file
    dsa = dsa_model
    model = dsa.init_weights(dsa.Transformer(dsa.ModelArgs.tiny()), 0)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if drop:
        del state[drop]
    if extra:
        state[extra] = torch.zeros(3)
    import dataclasses
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_args": dataclasses.asdict(model.args)}))
    save_file(state, str(folder / "model.safetensors"))
    return model


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = save_checkpoint(tmp_path)
    loaded = load_checkpoint(str(tmp_path))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_checkpoint_missing_a_tensor_names_it(tmp_path, capsys):
    missing = "layers.2.attn.indexer.wk.weight"
    save_checkpoint(tmp_path, drop=missing)
    with pytest.raises(ModelSpecError, match=rf"missing tensors \['{missing}'\]"):
        load_checkpoint(str(tmp_path))
    code, _, err = run_cli(capsys, "explain", "--model", f"ckpt:{tmp_path}")
    line = one_error_line(err, "explain")
    assert code == 2 and f"--model ckpt:{tmp_path}: the weights do not match the model built from config.json" in line
    assert missing in line


def test_checkpoint_with_an_unexpected_tensor_names_it(tmp_path):
    save_checkpoint(tmp_path, extra="layers.9.attn.indexer.wk.weight")
    with pytest.raises(ModelSpecError, match=r"unexpected tensors \['layers.9.attn.indexer.wk.weight'\]"):
        load_model(f"ckpt:{tmp_path}")


# ------------------------------------------------------------------ README
def test_readme_first_snippet_runs(tmp_path):
    """The README's first Python block runs as is (it once used undefined `config` and `input_ids`) and
    prints the max difference to HF's own plan."""
    readme = (REPO / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "snippet.py").write_text(code)
    run = subprocess.run([sys.executable, str(tmp_path / "snippet.py")], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = run.stdout.strip().splitlines()[-1]
    assert float(printed.removeprefix("tensor(").removesuffix(")")) < 1e-5
