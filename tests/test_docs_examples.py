"""Claims in the docs that drift when the code changes: command options, method lists and counts, the
``--model`` spec form, top-k file names and ``--set`` examples (docs/cli.md, README.md, docs/methods.md,
docs/attention.md, docs/transformers.md, docs/pixel_methods.md)."""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import typer
from PIL import Image

import lumos
from lumos.cli import DEMO_METHODS, app, main
from lumos.cli_common import parse_methods
from lumos.method_settings import parse_settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/cli.md", "docs/attention.md", "docs/methods.md", "docs/transformers.md",
        "docs/pixel_methods.md"]
OPTION = r"(?<![\w-])--[a-z][a-z-]*"


def _text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


@cache
def _options() -> dict[str, set[str]]:
    """Each ``lumos`` command's options, as its --help lists them."""
    group = typer.main.get_command(app)
    return {name: {o for p in cmd.params if not getattr(p, "hidden", False) for o in p.opts + p.secondary_opts}
            | {"--help"} for name, cmd in group.commands.items()}


def _code(text: str) -> list[str]:
    """Code-block lines (comments cut) and inline code spans."""
    lines = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        lines += [re.sub(r"(^|\s)#.*", "", line) for line in block.splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def _invocations(text: str) -> list[tuple[str, str]]:
    """``(command, the rest up to the next lumos command)`` for every ``lumos COMMAND ...`` written in code."""
    found = []
    for line in _code(text):
        for m in re.finditer(r"(?<![\w.$/-])lumos ([a-z][\w-]*)(.*?)(?=(?<![\w.])lumos |$)", line):
            found.append((m.group(1), m.group(2)))
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_every_option_written_after_a_command_is_one_of_its_options(doc):
    invocations = _invocations(_text(doc))
    assert invocations or doc in ("docs/methods.md",)
    for command, rest in invocations:
        assert command in _options(), f"{doc}: `lumos {command}` is not a command"
        unknown = sorted(set(re.findall(OPTION, rest)) - _options()[command])
        assert not unknown, f"{doc}: `lumos {command}{rest}` uses {unknown}, not options of `lumos {command}`"


def _sections(text: str) -> list[tuple[list[str], str]]:
    """docs/cli.md's ``## `lumos X` `` sections: (their commands, their text)."""
    parts = re.split(r"^## (.*)$", text, flags=re.M)
    return [(re.findall(r"`lumos ([a-z-]+)`", head), body) for head, body in zip(parts[1::2], parts[2::2], strict=True)]


def test_cli_md_sections_list_only_options_their_commands_take():
    sections = [(cmds, body) for cmds, body in _sections(_text("docs/cli.md")) if cmds]
    assert {c for cmds, _ in sections for c in cmds} >= {"explain", "demo", "layers", "features"}
    for cmds, body in sections:
        for said in re.findall(r"Takes ((?:`--[\w-]+`[,\s]*(?:and\s+)?)+)", body):
            for option in re.findall(OPTION, said):
                assert all(option in _options()[c] for c in cmds), f"`lumos {cmds[0]}` does not take {option}"


def test_cli_md_explain_table_is_explains_options():
    body = dict((tuple(c), b) for c, b in _sections(_text("docs/cli.md")))[("explain",)]
    rows = re.findall(r"^\| ([^|]*`--[^|]*) \|", body, flags=re.M)
    listed = {o for row in rows for o in re.findall(OPTION, row)}
    takes = {o for o in _options()["explain"] if o.startswith("--") and not o.startswith("--no-")} - {"--help"}
    assert listed <= takes, f"not options of lumos explain: {sorted(listed - takes)}"
    assert takes <= listed, f"lumos explain options missing from the table in docs/cli.md: {sorted(takes - listed)}"


def test_cli_md_says_which_commands_take_an_option():
    text = _text("docs/cli.md")
    claims = re.findall(r"((?:`[a-z-]+`(?:,\s*|\s+and\s+)?)+)\)?\s+takes?\s+`(--[\w-]+)`", text)
    assert len(claims) >= 2  # --method and --device
    for names, option in claims:
        for command in re.findall(r"`([a-z-]+)`", names):
            assert option in _options()[command], f"docs/cli.md: `lumos {command}` does not take {option}"
    assert not re.search(r"every command takes `--", text, flags=re.I)
    # `all`: every method except the ones named
    named = re.search(r"`all` for every method of `lumos methods` except the attention methods `(\w+)` and `(\w+)`",
                      re.sub(r"\s+", " ", text))
    assert named, "docs/cli.md no longer says what --method all leaves out"
    assert set(named.groups()) == set(lumos.methods()) - set(lumos.methods(general=True))


def test_cli_md_demo_default_methods():
    m = re.search(r"default: (\d+) methods,\s*`([\w+,]+)`", _text("docs/cli.md"))
    assert m and m.group(2) == DEMO_METHODS and int(m.group(1)) == len(DEMO_METHODS.split(","))


def test_readme_method_list_is_lumos_methods():
    text = _text("README.md")
    m = re.search(r"lumos\.methods\(\)\s+#\s*(\[.*?\])\n```", text, re.S)
    assert m, "README no longer shows lumos.methods()"
    shown = re.findall(r"'([^']+)'", m.group(1))
    assert "..." not in m.group(1) and shown == lumos.methods()


def _table_names(doc: str, header: str) -> list[str]:
    text = _text(doc)
    table = text[text.index(header):].split("\n\n")[0]
    return re.findall(r"^\| `([\w+]+)` \|", table, flags=re.M)


def test_methods_md_counts_the_methods():
    text = _text("docs/methods.md")
    m = re.search(r"lumos\.methods\(\)\s+#\s*(\d+) names: the (\d+) CAM methods below, (\d+) pixel-space"
                  r"(.*?)```", text, re.S)
    assert m, "docs/methods.md no longer counts lumos.methods()"
    total, cams, pixel, rest = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
    cam_names = _table_names("docs/methods.md", "| name | paper | raw map")
    pixel_names = _table_names("docs/pixel_methods.md", "| name | paper | raw |")
    others = [n for n in lumos.methods() if re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", rest)]
    assert (len(cam_names), len(pixel_names)) == (cams, pixel)
    assert total == len(lumos.methods()) == len(cam_names) + len(pixel_names) + len(others)
    assert set(cam_names) | set(pixel_names) | set(others) == set(lumos.methods())


def test_no_file_path_model_specs():
    """``--model my_vit.py:build`` is refused (the spec is ``module:callable``)."""
    for doc in [*DOCS, *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md")))]:
        bad = re.findall(r"--model[ =]\S+\.py:\w+", _text(doc))
        assert not bad, f"{doc}: {bad}; write --model module:callable"


def test_set_examples_parse():
    """Every ``--set`` in a documented explain/evaluate command is accepted for its methods."""
    checked = 0
    for doc in DOCS:
        for command, rest in _invocations(_text(doc)):
            if command not in ("explain", "evaluate") or "--set" not in rest:
                continue
            args = shlex.split(rest)
            method = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--method", "--methods")), "gradcam")
            vit = "--benchmark" in args and "vit" in args
            items = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
            parse_settings(items, parse_methods(method, transformer=vit))
            checked += 1
    assert checked >= 3


def test_top_k_file_names_are_as_documented(tmp_path, capsys):
    pattern = "STEM_METHOD_top1_CLASS.png"
    assert pattern in _text("docs/cli.md")
    Image.new("RGB", (32, 32), (90, 60, 30)).save(tmp_path / "cat.png")
    assert main(["explain", str(tmp_path / "cat.png"), "--target", "topk:2", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert len(names) == 2 and all(re.fullmatch(rf"cat_gradcam_top{k}_[^_./][^/]*\.png", n)
                                   for k, n in zip((1, 2), names, strict=True)), names
