"""Hardening of the ``lumos`` command (issue 11): bad values, odd folders, unwritable output, duplicate methods,
Unicode names, models without maps, warnings and help text.

Most checks run the real command in a subprocess (``python -m lumos.cli``) and look at its output lines, exit code
and that no traceback appears. The models are tiny user models (``--model module:callable``) that touch a marker
file when built, so a test can tell that a mistake was refused *before* any model work.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumos import cli
from lumos.cli import main
from lumos.io import find_images
from lumos.runner import RunReport, _safe

pytestmark = pytest.mark.usefixtures("one_thread")

W, H = 64, 48
MODELS = '''
import logging
import os

import torch
from torch import nn


def _built():
    marker = os.environ.get("LUMOS_TEST_MARKER")
    if marker:
        open(marker, "a").close()


def tiny():
    """Conv + ReLU: 4-D layers, a ReLU."""
    _built()
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5))


def flat():
    """No layer with a 4-D output."""
    _built()
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5))


def tanh():
    """4-D layers but no ReLU-like call: guided backprop warns."""
    _built()
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5))


def chatty():
    """Logs a two-line warning while it is built (seeded: its Grad-CAM map is not blank, which would be a warning)."""
    logging.getLogger("some.user.code").warning("first line\\nsecond line")
    torch.manual_seed(0)
    return tiny()
'''


def _rgb(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), "RGB")


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _open_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


@pytest.fixture
def world() -> Path:
    """A folder every user can read and write (pytest's tmp folders are private to root), with the test models
    module in it. Removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="lumos-hardening-"))
    d.chmod(0o777)
    (d / "lumos_hardening_models.py").write_text(MODELS)
    (d / "lumos_hardening_models.py").chmod(0o644)
    yield d
    for root, dirs, _ in os.walk(d):  # undo chmod 000 so the folder can be removed
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    shutil.rmtree(d, ignore_errors=True)


def _lumos(*args, cwd: Path, world: Path, prefix: list[str] | None = None, prelude: str | None = None,
           env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``lumos ARGS`` in a subprocess; ``prelude`` is Python run first in that process (used only to simulate
    what root cannot be refused), ``prefix`` a command that runs it as another user."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONIOENCODING": "utf-8",
                "PYTHONPATH": os.pathsep.join([str(world), os.environ.get("PYTHONPATH", "")]),
                "MPLCONFIGDIR": str(_open_dir(world / "mpl")), "LUMOS_TEST_MARKER": str(world / "model-was-built"),
                **(env or {})}
    full_env.pop("FORCE_COLOR", None)
    if prelude is None:
        command = [sys.executable, "-m", "lumos.cli"]
    else:
        run = "import sys\nfrom lumos.cli import main\nsys.exit(main(sys.argv[1:]))"
        command = [sys.executable, "-c", f"{prelude}\n{run}"]
    proc = subprocess.run([*(prefix or []), *command, *map(str, args)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, encoding="utf-8", timeout=300)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


SEP = "\x1e"  # starts each command's share of stdout and stderr in _lumos_each


def _lumos_each(commands: list[list], *, cwd: Path, world: Path) -> list[tuple[int, str, str, bool]]:
    """Run several ``lumos`` command lines one after another in ONE subprocess (a fresh Python per command costs
    seconds); per command: exit code, stdout, stderr, and whether the model was built."""
    script = (
        "import os, sys\nfrom lumos.cli import main\nmarker = os.environ['LUMOS_TEST_MARKER']\n"
        f"for argv in {[[str(a) for a in c] for c in commands]!r}:\n"
        f"    print({SEP!r}, end='', flush=True)\n"
        f"    print({SEP!r}, end='', file=sys.stderr, flush=True)\n"
        "    code = main(argv)\n"
        "    built = os.path.exists(marker)\n"
        "    if built:\n"
        "        os.remove(marker)\n"
        "    print(f'{code} {built}', flush=True)\n"
        "sys.exit(0)\n"
    )
    code, out, err = _lumos(cwd=cwd, world=world, prelude=script)
    assert code == 0, err
    results = []
    for page, errors in zip(out.split(SEP)[1:], err.split(SEP)[1:], strict=True):
        *lines, status = page.rstrip("\n").split("\n")
        rc, built = status.split()
        results.append((int(rc), "\n".join(lines), errors, built == "True"))
    assert len(results) == len(commands)
    return results


def _model_built(world: Path) -> bool:
    return (world / "model-was-built").exists()


TINY = ["--model", "lumos_hardening_models:tiny", "--size", "16"]


@pytest.fixture
def image(world) -> Path:
    path = world / "one.png"
    _rgb(1).save(path)
    path.chmod(0o644)
    return path


_UNPRIVILEGED: list[str] | None = None


def _unprivileged() -> list[str] | None:
    """A command prefix under which file permissions are really enforced: none needed when not root, ``setpriv``
    to the ``nobody`` user when root; None when neither works (then the tests simulate the refusal)."""
    global _UNPRIVILEGED
    if os.geteuid() != 0:
        return []
    if _UNPRIVILEGED is None:
        _UNPRIVILEGED = []
        setpriv = shutil.which("setpriv")
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            nobody = None
        if setpriv and nobody:
            prefix = [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
            if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
                _UNPRIVILEGED = prefix
    return _UNPRIVILEGED or None


# ---------------------------------------------------------------------------------------------- 4: values


BAD_VALUES = [
    (["explain", "--set", "relu=maybe"], ["relu takes true or false", "'maybe'"]),
    (["explain", "--method", "scorecam", "--set", "batch_size=2.5"], ["batch_size needs an integer", "2.5"]),
    (["explain", "--method", "integrated_gradients", "--set", "batch_size=2.5"], ["batch_size needs an integer"]),
    (["explain", "--method", "smoothgrad", "--set", "base=integrated_gradients", "--set", "steps=1.5"],
     ["steps needs an integer"]),
    (["explain", "--batch-size", "-3"], ["--batch-size must be a positive integer, got -3"]),
    (["explain", "--batch-size", "0"], ["--batch-size must be a positive integer, got 0"]),
    (["features", "--n", "0"], ["--n must be a positive integer, got 0"]),
    (["features", "--n", "-5"], ["--n must be a positive integer, got -5"]),
    (["explain", "--colormap", "nosuchmap"], ["nosuchmap", "--colormap", "viridis"]),
    (["explain", "--colormap", "Viridis"], ["Did you mean: viridis"]),
]


def test_bad_values_are_one_line_errors_before_the_model_loads(world, image):
    """All cases in one process (see _lumos_each); each is refused with one line and without building the model."""
    commands = [[command, image, *TINY, *options, "--out", world / "o"] for (command, *options), _ in BAD_VALUES]
    for (args, expected), (code, out, err, built) in zip(BAD_VALUES, _lumos_each(commands, cwd=world, world=world),
                                                         strict=True):
        assert code == 2, (args, out, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)
        for text in expected:
            assert text in err, (args, err)
        assert not built, args
    assert not (world / "o").exists()


def test_good_setting_values_still_pass(world, image):
    code, out, err = _lumos("explain", image, *TINY, "--method", "gradcam,scorecam", "--set", "relu=false",
                            "--set", "max_channels=none", "--set", "scorecam.batch_size=2", "--out", world / "o",
                            cwd=world, world=world)
    assert code == 0, err
    assert sorted(p.name for p in (world / "o").iterdir()) == ["one_gradcam.png", "one_scorecam.png"]


# ---------------------------------------------------------------------------------------------- 5: folders


def _tree(root: Path) -> Path:
    """photos/a.png, photos/sub/b.png, photos/sub/up -> photos (a loop), photos/self.png -> itself (a loop),
    photos/linked -> elsewhere (c.png), photos/linked_again -> elsewhere too, photos/broken.png -> missing."""
    photos, elsewhere = root / "photos", root / "elsewhere"
    (photos / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    _rgb(1).save(photos / "a.png")
    _rgb(2).save(photos / "sub" / "b.png")
    _rgb(3).save(elsewhere / "c.png")
    (photos / "sub" / "up").symlink_to("..")
    (photos / "self.png").symlink_to("self.png")
    (photos / "linked").symlink_to(elsewhere)
    (photos / "linked_again").symlink_to(elsewhere)
    (photos / "broken.png").symlink_to("missing.png")
    return photos


def test_find_images_follows_linked_folders_once_and_reports_loops(tmp_path):
    photos = _tree(tmp_path)
    found, problems = find_images([photos])
    assert [p.relative_to(photos).as_posix() for p in found] == ["a.png", "linked/c.png", "sub/b.png"]
    reasons = {p.relative_to(photos).as_posix(): why for p, why in problems}
    assert sorted(reasons) == ["broken.png", "self.png", "sub/up"]
    assert "loop" in reasons["self.png"] and "loop" in reasons["sub/up"] and "broken" in reasons["broken.png"]


def test_find_images_names_an_unreadable_folder(tmp_path, monkeypatch):
    """Root reads any folder, so when run as root the refusal is simulated: os.scandir raises PermissionError
    for that one folder, as the kernel does for other users."""
    (tmp_path / "locked").mkdir()
    _rgb(1).save(tmp_path / "a.png")
    _rgb(2).save(tmp_path / "locked" / "hidden_from_us.png")
    if os.geteuid() == 0:
        real_scandir = os.scandir

        def scandir(path="."):
            if Path(path) == tmp_path / "locked":
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    else:
        (tmp_path / "locked").chmod(0)
    try:
        found, problems = find_images([tmp_path])
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert found == [tmp_path / "a.png"]
    assert len(problems) == 1 and problems[0][0] == tmp_path / "locked"
    assert "cannot read this folder (permission denied)" in problems[0][1]


def test_explain_on_a_folder_with_links_and_loops(world):
    photos = _tree(world)
    code, out, err = _lumos("explain", photos, *TINY, "--out", world / "o", cwd=world, world=world)
    assert code == 1  # the loops and the broken link are failures, one line each
    errors = _errors(err)
    assert len(errors) == 3, err
    assert sum("self.png" in e and "loop" in e for e in errors) == 1
    assert sum(str(Path("sub") / "up") in e and "loop" in e for e in errors) == 1
    assert sum("broken.png" in e for e in errors) == 1
    assert sorted(p.name for p in (world / "o").iterdir()) == ["a_gradcam.png", "b_gradcam.png", "c_gradcam.png"]
    assert out.splitlines()[-1].startswith("Explained 3 image(s)")


def test_explain_names_an_unreadable_folder(world):
    """Really unreadable when the command can run as an unprivileged user (chmod 000 then holds); otherwise (root
    without setpriv) os.scandir is made to raise PermissionError for that folder inside the lumos process."""
    photos = _open_dir(world / "photos")
    _rgb(1).save(photos / "a.png")
    (photos / "locked").mkdir()
    _rgb(2).save(photos / "locked" / "b.png")
    for f in (photos / "a.png", photos / "locked" / "b.png"):
        f.chmod(0o644)
    (photos / "locked").chmod(0)
    out_dir = _open_dir(world / "w") / "o"
    prefix, prelude = _unprivileged(), None
    if prefix is None:
        prelude = (f"import os, errno\n_real = os.scandir\nLOCKED = {str(photos / 'locked')!r}\n"
                   "def _scandir(path='.'):\n"
                   "    if os.fspath(path) == LOCKED:\n"
                   "        raise PermissionError(errno.EACCES, 'Permission denied', LOCKED)\n"
                   "    return _real(path)\n"
                   "os.scandir = _scandir")
    code, out, err = _lumos("explain", photos, *TINY, "--out", out_dir, cwd=world, world=world, prefix=prefix,
                            prelude=prelude)
    assert code == 1
    assert _errors(err) == [f"error: {photos / 'locked'}: cannot read this folder (permission denied); its images "
                            "were skipped"], err
    assert sorted(p.name for p in out_dir.iterdir()) == ["a_gradcam.png"]


# --------------------------------------------------------------------------------------------- 6: output


@pytest.mark.parametrize("command", ["explain", "features"])
def test_out_under_a_file_is_one_line_before_the_model_loads(world, image, command):
    (world / "file.txt").write_text("not a folder")
    code, _, err = _lumos(command, image, *TINY, "--out", world / "file.txt" / "out", cwd=world, world=world)
    assert code == 2
    assert err.strip() == (f"error: The output directory {world / 'file.txt' / 'out'} (--out) cannot be created: "
                           f"{world / 'file.txt'} is a file, not a directory.")
    assert not _model_built(world)


@pytest.mark.parametrize("command", ["explain", "features"])
def test_unwritable_out_is_one_line_before_the_model_loads(world, image, command):
    """A real read-only folder when the command can run unprivileged; otherwise (root without setpriv) creating
    files in that folder is refused inside the lumos process by a wrapped os.open."""
    locked = world / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    prefix, prelude = _unprivileged(), None
    if prefix is None:
        prelude = (f"import os, errno\n_real = os.open\nLOCKED = {str(locked)!r}\n"
                   "def _open(path, flags, *args, **kwargs):\n"
                   "    if os.path.dirname(os.fspath(path)) == LOCKED and flags & os.O_CREAT:\n"
                   "        raise PermissionError(errno.EACCES, 'Permission denied', os.fspath(path))\n"
                   "    return _real(path, flags, *args, **kwargs)\n"
                   "os.open = _open")
    code, _, err = _lumos(command, image, *TINY, "--out", locked, cwd=world, world=world, prefix=prefix,
                          prelude=prelude)
    assert code == 2
    assert err.strip() == f"error: Cannot write to the output directory {locked} (--out): permission denied."
    assert not _model_built(world)
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("command", ["explain", "features"])
def test_a_failed_write_during_the_run_is_one_line(capsys, monkeypatch, tmp_path, command):
    """The disk fills up after the checks: the write error is one line, not a traceback."""
    _rgb(1).save(tmp_path / "one.png")

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", full)
    code = main([command, str(tmp_path / "one.png"), "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 2
    errors = _errors(err)
    assert len(errors) == 1 and "no space left on device" in errors[0] and str(tmp_path / "o") in errors[0], err
    assert "Traceback" not in out + err


# ---------------------------------------------------------------------------------------- 7: duplicates


def test_duplicate_methods_run_once_with_a_note(world, image):
    code, out, err = _lumos("explain", image, *TINY, "--method", "gradcam,gradcam,Grad-CAM", "--gallery",
                            "--out", world / "o", cwd=world, world=world)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "gradcam" in notes[0], err
    assert sorted(p.name for p in (world / "o").iterdir()) == ["gallery.png", "one_gradcam.png"]
    assert "with 1 method(s): 2 file(s)" in out


# --------------------------------------------------------------------------------------------- 8: names


def test_unicode_file_names_are_kept_and_unique(world):
    for rel in ("猫.jpg", "кот.jpg", "b/猫.png"):
        (world / rel).parent.mkdir(exist_ok=True)
        _rgb(len(rel)).save(world / rel)
    inputs = [world / "猫.jpg", world / "кот.jpg", world / "b" / "猫.png"]
    code, out, err = _lumos("explain", *inputs, *TINY, "--out", world / "o", cwd=world, world=world)
    assert code == 0, err
    assert sorted(p.name for p in (world / "o").iterdir()) == sorted(
        ["猫_gradcam.png", "кот_gradcam.png", "猫_2_gradcam.png"])
    assert f"{world / '猫.jpg'}: " in out


@pytest.mark.parametrize(("name", "stem"), [
    ("猫", "猫"), ("кот", "кот"), ("Ünïcödé name", "Ünïcödé name"), ("a:b?c*d", "a_b_c_d"), ('x<y>"z"|', "x_y_z"),
    ("tab\there\nnewline", "tab_here_newline"), ("back\\slash", "back_slash"), ("..", "x"), ("", "x"),
    ("gradcam++", "gradcam++"), ("\udcff\udcfeok", "ok"),
])
def test_safe_keeps_letters_and_replaces_only_unsafe_characters(name, stem):
    assert _safe(name) == stem


def test_stems_are_unique_ignoring_case_and_short_enough():
    report = RunReport()
    assert [report.stem(n) for n in ["a/猫.jpg", "b/猫.jpg", "Cat.png", "cat.png"]] == ["猫", "猫_2", "Cat", "cat_2"]
    long = report.stem("猫" * 200 + ".png")
    assert len(long.encode("utf-8")) <= 150 and set(long) == {"猫"}


# ---------------------------------------------------------------------------------------------- 15: layers


def test_layers_of_a_model_without_maps(world):
    flat = ["--model", "lumos_hardening_models:flat", "--size", "16"]
    code, out, err = _lumos("layers", *flat, "--all", cwd=world, world=world)
    assert code == 0, err
    assert [line.split()[:2] for line in out.splitlines()] == [["0", "Flatten"], ["1", "Linear"]]
    code, out, err = _lumos("layers", *flat, cwd=world, world=world)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1 and "--all" in out and "4-D" in out


def test_cli_messages_name_the_option_not_the_python_argument(world, image):
    code, _, err = _lumos("explain", image, "--model", "lumos_hardening_models:flat", "--size", "16", "--out",
                          world / "o", cwd=world, world=world)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--layer" in err and "layer=" not in err, err


def test_features_checks_the_layer_once(world):
    images = []
    for k in range(2):
        images.append(world / f"img{k}.png")
        _rgb(k).save(images[-1])
    code, out, err = _lumos("features", *images, *TINY, "--layer", "nope", "--out", world / "o", cwd=world,
                            world=world)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "No layer named 'nope'" in err, err
    assert not (world / "o").exists()


# ------------------------------------------------------------------------------------- 17: warnings, help


def test_python_warnings_are_one_clean_line(world, image):
    code, _, err = _lumos("explain", image, "--model", "lumos_hardening_models:tanh", "--size", "16", "--method",
                          "guided_backprop", "--out", world / "o", cwd=world, world=world)
    assert code == 0, err
    warning_lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning_lines) == 1 and "no ReLU-like call" in warning_lines[0], err
    assert len(err.strip().splitlines()) == 1, err  # no "UserWarning", file name or source line


def test_logging_warnings_are_one_clean_line(world, image):
    code, _, err = _lumos("explain", image, "--model", "lumos_hardening_models:chatty", "--size", "16", "--out",
                          world / "o", cwd=world, world=world)
    assert code == 0, err
    assert err.strip().splitlines() == ["warning: first line second line"]


HELP_COMMANDS = ([], ["explain"], ["features"], ["evaluate"], ["layers"], ["demo"], ["app"])


@pytest.mark.parametrize("rich", ["1", "0"])
def test_help_reads_like_a_person_wrote_it(world, rich):
    """Every command's --help, with Typer's rich help and without (TYPER_USE_RICH=0), in one process each."""
    show_all = ("import sys\nfrom lumos.cli import main\n"
                f"for command in {HELP_COMMANDS!r}:\n"
                "    print('=' * 20, *command, flush=True)\n"
                "    assert main([*command, '--help']) == 0\n"
                "sys.exit(0)\n")
    code, out, err = _lumos(cwd=world, world=world, prelude=show_all, env={"TYPER_USE_RICH": rich})
    assert code == 0, err
    pages = dict(zip([" ".join(c) for c in HELP_COMMANDS], out.split("=" * 20)[1:], strict=True))
    for command, page in pages.items():
        assert "Usage:" in page and "--help" in page, (command, page)
        for noise in ("<list[", "<bool>", "<str>", "<int>", "<float>", "<path>", "{images}", "{IMAGES"):
            assert noise not in page, (command, noise, page)
    for command in ("explain", "features"):
        assert re.search(rf"{command} \[OPTIONS\] IMAGES\.\.\.\s", pages[command]), pages[command]
        assert re.search(r"--out\s+DIR\s", pages[command]), pages[command]
    assert re.search(r"evaluate \[OPTIONS\] \[IMAGES\.\.\.\]", pages["evaluate"])


def test_help_tidying_does_not_change_parsing(capsys, tmp_path):
    """The help display swaps in metavars; the options still parse (a flag, a repeated option, an argument)."""
    _rgb(1).save(tmp_path / "one.png")
    code = main(["explain", str(tmp_path / "one.png"), "--set", "relu=true", "--gallery", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr()
    assert (tmp_path / "o" / "gallery.png").is_file()
    assert cli.app.registered_commands and all(info.cls is cli.TidyCommand for info in cli.app.registered_commands)
