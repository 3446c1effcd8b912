"""README.md cannot drift from the code: every command in it runs here.

- ```bash blocks: run in order, each in smoke mode (the smoke variant of its config, paths under
  /tmp moved to a temporary folder, evaluation and explanation on a few images); the set-up and
  test commands must be what .ci/run runs.
- ```text blocks (the paper's setting, several hosts: they need ImageNet and ViT-B/16 weights):
  every flag and config field they set must exist.
- ```python blocks: executed as they are.
"""
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
# The config each demo config runs as in smoke mode; a new config in a README command needs one.
SMOKE = {"configs/vit.py": "configs/vit.py:smoke", "configs/vit.py:mnist": "configs/vit.py:smoke",
         "configs/vit.py:smoke": "configs/vit.py:smoke"}
# evaluate.py / explain on a few images, every method still run (later flags win in absl).
SMOKE_EVALUATE = ["--num_examples=6", "--refine_steps=1", "--ig_steps=2", "--rise_masks=8"]


def blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands(language):
  """The commands of README's ```language blocks, continuation lines joined, comments dropped."""
  out = []
  for block in blocks(language):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  #")[0].strip()
      if line:
        out.append(line)
  return out


def _ci_lines():
  text = open(os.path.join(ROOT, ".ci", "run")).read()
  return [" ".join(line.replace("python -m pip", "pip").replace("--quiet ", "").split())
          for line in text.splitlines() if not line.startswith("#")]


def _digit_png(path):
  from PIL import Image

  from l2r_jax import data
  example = data.create("mnist5k", split="test")[0]
  Image.fromarray(np.asarray(example["image"], np.uint8)).save(path)


def _smoke(tokens, tmp):
  """README's command `tokens` as run here, or a test failure when it has no smoke form."""
  out = []
  for token in tokens:
    flag, sep, value = token.partition("=")
    if sep and value.startswith("/tmp/"):
      token = f"{flag}={tmp}{value[4:]}"
    elif token.startswith("/tmp/"):
      token = tmp + token[4:]
    out.append(token)
  program = " ".join(out[:3])
  if out[:2] == ["python", "train.py"]:
    i = out.index("--config") + 1
    if out[i] not in SMOKE:
      pytest.fail(f"README runs {' '.join(tokens)!r}: give its config a smoke form in SMOKE")
    out[i] = SMOKE[out[i]]
  elif out[:2] == ["python", "evaluate.py"]:
    out += SMOKE_EVALUATE
  elif program == "python -m l2r_jax.explain":
    for j, token in enumerate(out):
      if token.endswith((".png", ".jpg", ".jpeg")):
        out[j] = os.path.join(tmp, os.path.basename(token))
        _digit_png(out[j])
  elif out[:2] == ["python", "scripts/readme_assets.py"]:
    out += [f"--readme={tmp}/README.md", f"--figure={tmp}/docs/examples.png"]
  else:
    pytest.fail(f"README runs {' '.join(tokens)!r}, which this test does not know how to run")
  return [sys.executable, *out[1:]]


def test_readme_commands_run(tmp_path):
  tmp = str(tmp_path)
  with open(os.path.join(tmp, "README.md"), "w") as f:
    f.write(README)
  ci = _ci_lines()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user
  env["JAX_PLATFORMS"] = "cpu"
  ran = set()
  for command in commands("bash"):
    if command.startswith(("pip install", "python -m pytest")):
      assert command in ci, f"README's {command!r} is not what .ci/run runs ({ci})"
      continue
    argv = _smoke(shlex.split(command), tmp)
    # The demo in smoke form is README's smoke command: the same run, once.
    key = tuple(a for a in argv if not a.startswith(tmp) and a != "--workdir")
    if argv[1] == "train.py" and key in ran:
      continue
    ran.add(key)
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

  workdir = os.path.join(tmp, "l2r_vit")
  import json
  assert json.load(open(os.path.join(workdir, "eval.json")))["n"] == 16
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert set(results["protocols"]) == {"paper", "black", "blur", "noise"}
  assert results["methods"]["l2r"]["paper"]["deletion"]["n"] == 6
  digit = np.load(os.path.join(tmp, "maps", "my_digit.npy"))
  assert digit.shape == (28, 28) and np.isfinite(digit).all()
  # scripts/readme_assets.py wrote the figure and a table row per method, from results.json.
  assert os.path.getsize(os.path.join(tmp, "docs", "examples.png")) > 0
  table = open(os.path.join(tmp, "README.md")).read()
  assert table != README
  for method, row in results["methods"].items():
    s = row["paper"]["deletion"]
    assert f"| {method} | " in table and f"{s['mean']:.3f} +- {s['se']:.3f}" in table


def _flags(program):
  """The flags a README program defines: absl DEFINE_*("name") and argparse add_argument("--name"
  ); train.py-style programs also take --config.FIELD."""
  text = open(os.path.join(ROOT, program)).read()
  return (set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', text))
          | set(re.findall(r'add_argument\(\s*"--(\w+)"', text)))


def test_readme_templates_name_real_flags_and_fields():
  import importlib

  templates = commands("text")
  assert templates, "README lost its paper-setting commands"
  for command in templates:
    tokens = shlex.split(command)
    assert tokens[0] == "python" and os.path.isfile(os.path.join(ROOT, tokens[1])), command
    flags = _flags(tokens[1])
    options, rest = {}, tokens[2:]
    while rest:  # --name=value, --name value, or a bare --name
      name, sep, value = rest.pop(0)[2:].partition("=")
      if not sep and rest and not rest[0].startswith("--"):
        value = rest.pop(0)
      options[name] = value
    config = None
    if "config" in options:
      file, _, variant = options.pop("config").partition(":")
      module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
      config = module.get_config(variant or None)
    for name, value in options.items():
      if not name.startswith("config."):
        assert name in flags, f"README: {tokens[1]} has no flag --{name} ({command})"
        continue
      assert config is not None, f"README sets {name} without --config ({command})"
      node = config
      for part in name.split(".")[1:]:
        assert part in node, f"README: the config has no field {name} ({command})"
        node = node[part]
      if isinstance(node, (int, float)) and not isinstance(node, bool):
        float(value)  # a number field gets a number
      else:
        assert isinstance(node, str), f"README sets {name}, which is not a path / name field"


def test_readme_python_blocks_run():
  for block in blocks("python"):
    exec(compile(block, "README.md", "exec"), {})


def test_readme_assets_paired_table_picks_the_strongest_baseline():
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  try:
    import readme_assets
  finally:
    sys.path.pop(0)

  def stat(mean, se=0.01):
    return {"mean": mean, "se": se, "n": 10}

  def row(deletion, insertion, d_gap=None, i_gap=None):
    out = {"paper": {"deletion": stat(deletion), "insertion": stat(insertion)},
           "seconds_per_image": 0.5}
    if d_gap is not None:
      out["paper"]["deletion_minus_l2r"] = stat(*d_gap)
      out["paper"]["insertion_minus_l2r"] = stat(*i_gap)
    return out

  results = {"target": "t", "split": "s", "protocols": {"paper": "paper"}, "methods": {
      "l2r": row(0.20, 0.60),
      "l2r_refined": row(0.18, 0.62, (-0.02, 0.005), (0.02, 0.004)),
      "random": row(0.30, 0.30, (0.10, 0.02), (-0.30, 0.03)),
      "rise": row(0.25, 0.65, (0.05, 0.01), (0.05, 0.02))}}
  text = readme_assets.table(results)
  # Insertion: RISE is the strongest baseline (0.65), 0.05 above l2r with s.e. 0.02 -> z +2.5;
  # deletion: RISE again (0.25 < 0.30), 0.05 above with s.e. 0.01 -> z +5.0.
  assert ("| paper | deletion | 0.200 +- 0.010 | -0.020 +- 0.005 (z -4.0) | rise (0.250) | "
          "+0.050 +- 0.010 (z +5.0) |") in text
  assert ("| paper | insertion | 0.600 +- 0.010 | +0.020 +- 0.004 (z +5.0) | rise (0.650) | "
          "+0.050 +- 0.020 (z +2.5) |") in text
  assert "baseline - l2r_refined" not in text  # no per-image scores given
  # With the run's per-image scores, the best baseline against the refined map, paired: RISE's
  # deletion minus the refined map's is (0.02, 0.04, 0.06, 0.08) -> mean 0.05, s.e. of the four
  # (ddof 1) 0.0129 -> z +3.9; its insertion gap (0.01, 0.05, 0.03, 0.03) -> 0.03 +- 0.0082.
  refined = np.array([0.10, 0.20, 0.30, 0.40])
  per_image = {"l2r_refined/paper/deletion": refined,
               "rise/paper/deletion": refined + [0.02, 0.04, 0.06, 0.08],
               "l2r_refined/paper/insertion": refined,
               "rise/paper/insertion": refined + [0.01, 0.05, 0.03, 0.03]}
  for m in results["methods"].values():
    m["paper"]["deletion"]["n"] = m["paper"]["insertion"]["n"] = 4
  text = readme_assets.table(results, per_image)
  assert "| baseline - l2r_refined |" in text
  assert ("| paper | deletion | 0.200 +- 0.010 | -0.020 +- 0.005 (z -4.0) | rise (0.250) | "
          "+0.050 +- 0.010 (z +5.0) | +0.050 +- 0.013 (z +3.9) |") in text
  assert ("| paper | insertion | 0.600 +- 0.010 | +0.020 +- 0.004 (z +5.0) | rise (0.650) | "
          "+0.050 +- 0.020 (z +2.5) | +0.030 +- 0.008 (z +3.7) |") in text
  with pytest.raises(ValueError, match="no paper insertion scores of rise"):
    readme_assets.table(results,
                        {k: v for k, v in per_image.items() if k != "rise/paper/insertion"})
  results["methods"]["rise"]["paper"]["deletion"]["n"] = 5  # scores of another evaluation
  with pytest.raises(ValueError, match="not from the same evaluation"):
    readme_assets.table(results, per_image)
  del results["methods"]["l2r"]
  assert "Paired" not in readme_assets.table(results)
