"""The docs cannot go stale silently (CPU, a few seconds).

- Every relative link in README.md and docs/*.md reaches a file, and every #anchor a heading of
  the page it names (GitHub's heading ids).
- Every --flag the docs show for pretrain.py, linear_eval.py, finetune.py, distill.py, export.py,
  convert_official.py, bench.py, augment.py and hubconf.py is a flag of that script, and every flag of each
  script appears in the docs for it. A flag is shown for a script by a command that runs it
  (`python SCRIPT.py ... --flag`, `torchrun ... SCRIPT.py ... --flag`, `sbatch tools/pretrain.sbatch
  ... --flag`, in a code block or an inline code span) or by the first column of a table whose
  header cell is "flag" under a heading that names the script.
- Every other `--flag` in code is a flag of one of the scripts, of a tool in tools/, or of a
  launcher the docs use (torchrun, SLURM, docker, pip).
The scripts' flags come from their own argparse parsers, built in this process.
"""
import argparse
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys
import unicodedata

import pytest

from conftest import ROOT, child_env

SCRIPTS = ("pretrain.py", "linear_eval.py", "finetune.py", "distill.py", "export.py", "convert_official.py",
           "bench.py", "augment.py", "hubconf.py")
# Scripts that take a script's flags on its behalf.
WRAPPERS = {"tools/pretrain.sbatch": "pretrain.py"}
# Flags of the launchers and programs the docs show beside ours.
EXTERNAL_FLAGS = {
    "torchrun": {"--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id",
                 "--standalone"},
    "SLURM": {"--nodes", "--ntasks-per-node", "--gpus-per-task", "--cpus-per-task", "--time", "--signal",
              "--kill-on-bad-exit", "--open-mode", "--requeue"},
    "docker": {"--shm-size", "--ipc"},
    "pip": {"--index-url"},
    "the official TensorFlow code (run.py)": {"--fine_tune_after_block", "--num_proj_layers", "--ft_proj_selector",
                                              "--sk_ratio", "--learning_rate"},
}
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
FENCE = re.compile(r"^\s*(```|~~~)")


def doc_files():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def rel(path):
    return os.path.relpath(path, ROOT)


# ----------------------------------------------------------------------------------------------
# Reading markdown: code blocks, inline code, headings, tables

def blocks(text):
    """[(kind, lineno, text)]: kind 'code' for a fenced block (its lines joined), 'line' for any
    other line."""
    out, fence, start = [], None, 0
    for i, line in enumerate(text.splitlines(), 1):
        if fence is not None:
            if FENCE.match(line) and line.strip().startswith(fence):
                out.append(("code", start, "\n".join(body)))
                fence = None
            else:
                body.append(line)
        elif FENCE.match(line):
            fence, start, body = line.strip()[:3], i, []
        else:
            out.append(("line", i, line))
    if fence is not None:
        out.append(("code", start, "\n".join(body)))
    return out


def code_spans(line):
    return re.findall(r"(`+)(.+?)\1", line)


def heading(line):
    m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
    return (len(m.group(1)), m.group(2)) if m else None


def slug(title):
    """GitHub's id of a heading (github-slugger): the text as rendered (no markup), lower case,
    punctuation and symbols removed except '-' and '_', each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)          # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")            # html tags, code marks
    text = re.sub(r"(\*\*|__|\*|~~)", "", text)                     # emphasis (underscores in words stay)
    out = []
    for ch in text.lower():
        if ch in "-_ " or ch.isalnum():
            out.append("-" if ch == " " else ch)
        elif ord(ch) > 127 and not unicodedata.category(ch).startswith(("P", "S", "C")):
            out.append(ch)
    return "".join(out)


def anchors(text):
    """Every id a page offers: its headings' (with GitHub's -1, -2 for repeats) and <a id/name>."""
    seen, ids = {}, set()
    for kind, _, line in blocks(text):
        h = heading(line) if kind == "line" else None
        if h:
            base = slug(h[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            ids.add(base if n == 0 else f"{base}-{n}")
        if kind == "line":
            ids.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return ids


def links(text):
    """[(lineno, target)] of every markdown link and image outside code."""
    out = []
    for kind, lineno, line in blocks(text):
        if kind != "line":
            continue
        prose = re.sub(r"(`+).+?\1", "", line)
        for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose):
            out.append((lineno, m.group(1)))
    return out


def table_rows(lines):
    return [[c.strip() for c in row.strip().strip("|").split("|")] for row in lines]


# ----------------------------------------------------------------------------------------------
# Commands and flag tables: which flags the docs show for which script

def command_flags(command):
    """{script: [flags]} of one shell command line (continuations joined): the --flags after
    SCRIPT in `python SCRIPT ...`, `torchrun ... SCRIPT ...` or a wrapper, up to && ; or |."""
    found = {}
    for segment in re.split(r"&&|\|\||;|\|", command):
        try:
            tokens = shlex.split(segment, comments=True)
        except ValueError:                              # an unbalanced quote: read it plainly
            tokens = segment.split("#")[0].split()
        for i, token in enumerate(tokens):
            script = None
            for name in SCRIPTS:
                if token == name or token.endswith("/" + name):
                    launched = any(os.path.basename(t).startswith(("python", "torchrun")) or t == "torch.distributed.run"
                                   for t in tokens[:i])
                    script = name if launched else None
            for wrapper, name in WRAPPERS.items():
                if token == wrapper or token.endswith("/" + wrapper):
                    script = name
            if script:
                flags = [t.split("=")[0] for t in tokens[i + 1:] if FLAG.fullmatch(t.split("=")[0])]
                found.setdefault(script, []).extend(flags)
                break
    return found


def shown_flags(path):
    """{script: {flag: [where]}} for one markdown file, and [(where, flag)] of every --flag in its
    code (blocks and spans), for the check that none is made up."""
    text = open(path, encoding="utf-8").read()
    shown, every = {}, []
    title, table_script, table_header = None, None, None

    def add(script, flags, where):
        for flag in flags:
            shown.setdefault(script, {}).setdefault(flag, []).append(where)

    for kind, lineno, line in blocks(text):
        where = f"{rel(path)}:{lineno}"
        if kind == "code":
            joined = re.sub(r"\\\n\s*", " ", line)
            for command in joined.splitlines():
                for script, flags in command_flags(command).items():
                    add(script, flags, where)
            every += [(where, f) for f in FLAG.findall(line)]
            continue
        h = heading(line)
        if h:
            title, table_header = h[1], None
            continue
        spans = [s for _, s in code_spans(line)]
        for span in spans:
            for script, flags in command_flags(span).items():
                add(script, flags, where)
            every += [(where, f) for f in FLAG.findall(span)]
        if line.lstrip().startswith("|"):
            cells = table_rows([line])[0]
            if table_header is None:
                table_header = cells[0].strip("`* ").lower()
                if table_header in ("flag", "flags"):
                    named = [s for s in SCRIPTS if s in (title or "")]
                    assert len(named) == 1, (f"{where}: a flag table must sit under a heading that names one "
                                             f"script of {SCRIPTS}; this one is under {title!r}")
                    table_script = named[0]
                else:
                    table_script = None
            elif table_script and not set(cells[0]) <= set("-: "):
                add(table_script, FLAG.findall(cells[0]), where)
        else:
            table_header = table_script = None
    return shown, every


# ----------------------------------------------------------------------------------------------
# The scripts' own flags

class _Parser(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def parser_flags(script):
    """Every option string of SCRIPT's parser (--help included): its get_args (main for augment.py, _main for hubconf.py)
    is run in this process with parsing stopped, so nothing else of the script runs. A script
    whose parser cannot be caught so is asked for --help in a child process instead."""
    module = importlib.import_module(script[:-3])
    entry = getattr(module, "get_args", None) or getattr(module, "main", None) or getattr(module, "_main")

    def stop(self, *args, **kwargs):
        raise _Parser(self)

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = stop
    sys.argv = [script]
    try:
        entry()
    except _Parser as caught:
        return {s for a in caught.parser._actions for s in a.option_strings if s.startswith("--")}
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv = saved
    return help_flags(script)


def help_flags(script):
    """The --flags `python SCRIPT --help` lists among its options (not those its description names)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    options = [line for line in out.stdout.splitlines() if re.match(r"^\s{2}(-\w[ ,]+)?--\w", line)]
    return {f for line in options for f in FLAG.findall(line.strip().split("  ")[0])}


@pytest.fixture(scope="module")
def script_flags():
    return {s: parser_flags(s) for s in SCRIPTS}


@pytest.fixture(scope="module")
def docs_flags():
    shown, every = {}, []
    for path in doc_files():
        s, e = shown_flags(path)
        for script, flags in s.items():
            for flag, where in flags.items():
                shown.setdefault(script, {}).setdefault(flag, []).extend(where)
        every += e
    return shown, every


def tool_flags():
    """The --flags the tools (tools/, and the generators of tests/fixtures and tests/reference)
    define or pass: their sources, read as text."""
    found = set()
    for path in [p for d in ("tools", "tests/fixtures", "tests/reference") for p in glob.glob(os.path.join(ROOT, d, "*"))]:
        if os.path.isfile(path):
            found.update(FLAG.findall(open(path, encoding="utf-8", errors="replace").read()))
    return found


# ----------------------------------------------------------------------------------------------
# The tests

def broken_links(path):
    text = open(path, encoding="utf-8").read()
    broken = []
    for lineno, target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):             # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        where = f"{rel(path)}:{lineno}: {target}"
        if not os.path.exists(dest):
            broken.append(f"{where}: no file {rel(dest)}")
        elif anchor and dest.endswith(".md") and anchor not in anchors(open(dest, encoding="utf-8").read()):
            broken.append(f"{where}: no heading #{anchor} in {rel(dest)}")
    return broken


def test_every_relative_link_reaches_a_file_and_heading():
    assert os.path.isdir(os.path.join(ROOT, "docs")) and len(doc_files()) > 1
    broken = [b for path in doc_files() for b in broken_links(path)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_docs_pages_named_in_the_code_exist():
    """--help texts and docstrings point to docs pages: each page they name is there."""
    missing = []
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tools", "*.py")):
        for page, anchor in re.findall(r"\bdocs/([\w-]+\.md)(?:#([\w-]+))?", open(path, encoding="utf-8").read()):
            dest = os.path.join(ROOT, "docs", page)
            if not os.path.exists(dest):
                missing.append(f"{rel(path)}: docs/{page}")
            elif anchor and anchor not in anchors(open(dest, encoding="utf-8").read()):
                missing.append(f"{rel(path)}: docs/{page}#{anchor}")
    assert not missing, "pages or headings named in the code but missing:\n" + "\n".join(missing)


def test_every_flag_the_docs_show_for_a_script_is_one_of_its_flags(script_flags, docs_flags):
    shown, _ = docs_flags
    assert set(shown) == set(SCRIPTS), f"no command or flag table in the docs for {set(SCRIPTS) - set(shown)}"
    unknown = [f"{where[0]}: {script} {flag}" for script, flags in shown.items() for flag, where in flags.items()
               if flag not in script_flags[script]]
    assert not unknown, "flags the docs show that the script does not have:\n" + "\n".join(sorted(unknown))


def test_every_flag_of_a_script_appears_in_its_docs(script_flags, docs_flags):
    shown, _ = docs_flags
    missing = [f"{script} {flag}" for script, flags in script_flags.items() for flag in sorted(flags - {"--help"})
               if flag not in shown.get(script, {})]
    assert not missing, ("flags in --help that no command or flag table of README.md or docs/ shows:\n"
                         + "\n".join(missing))


def test_no_flag_in_the_docs_code_is_made_up(script_flags, docs_flags):
    _, every = docs_flags
    known = set().union(*script_flags.values(), *EXTERNAL_FLAGS.values(), tool_flags())
    unknown = sorted({f"{where}: {flag}" for where, flag in every if flag not in known})
    assert not unknown, "flags that no script, tool or launcher has:\n" + "\n".join(unknown)


# ----------------------------------------------------------------------------------------------
# The checks themselves catch what they are for

def test_the_checks_catch_a_made_up_flag_a_misplaced_flag_and_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Résumé: *what* it does (1/2)\n\n## The `pretrain.py` flags\n\n"
                    "| flag | meaning |\n|---|---|\n| `--epochs`, `--no-such-flag` | ... |\n\n"
                    "```bash\ntorchrun --nproc_per_node=8 pretrain.py --batch-size 4096 \\\n"
                    "    --made-up 1 && python linear_eval.py x.pt --knn  # --not-this\n```\n\n"
                    "Run `python finetune.py x.pt --label-fraction 0.1`. "
                    "[ok](#résumé-what-it-does-12) [gone](missing.md) [bad anchor](#nowhere) "
                    "[up](../README.md#top) `[not a link](nowhere.md)`\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("# Top\n", encoding="utf-8")
    shown, every = shown_flags(str(page))
    assert set(shown["pretrain.py"]) == {"--epochs", "--no-such-flag", "--batch-size", "--made-up"}
    assert set(shown["linear_eval.py"]) == {"--knn"} and set(shown["finetune.py"]) == {"--label-fraction"}
    assert "--nproc_per_node" in {f for _, f in every} and "--not-this" in {f for _, f in every}
    targets = [t for _, t in links(page.read_text(encoding="utf-8"))]
    assert "nowhere.md" not in targets
    text = page.read_text(encoding="utf-8")
    assert "résumé-what-it-does-12" in anchors(text) and "the-pretrainpy-flags" in anchors(text)
    broken = broken_links(str(page))
    assert len(broken) == 2 and "missing.md" in broken[0] and "#nowhere" in broken[1], broken


def test_slugs_follow_github():
    assert slug("Flags of `pretrain.py`") == "flags-of-pretrainpy"
    assert slug("GPUs: precision, launchers, what runs in float32") == "gpus-precision-launchers-what-runs-in-float32"
    assert slug("Memory: batch 4096 on 40 GB GPUs") == "memory-batch-4096-on-40-gb-gpus"
    assert slug("A [link](x.md) & the_flag") == "a-link--the_flag"
    text = "# Results\n## Results\n```\n# Results\n```\n## Results\n"
    assert anchors(text) == {"results", "results-1", "results-2"}


def test_ci_runs_exactly_the_readme_test_command():
    """README.md's test command (the one with pytest in the first code block) is what .ci/run runs."""
    first_block = next(text for kind, _, text in blocks(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())
                       if kind == "code")
    command = [line for line in first_block.splitlines() if "pytest" in line and not line.lstrip().startswith("#")]
    assert len(command) == 1, "README.md's first code block should hold one test command"
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8")]
    assert command[0].strip() in ci, f".ci/run does not run README.md's test command: {command[0].strip()}"
