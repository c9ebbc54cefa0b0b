"""scripts/check_readme.py: the matcher that compares README tables with what their commands print."""
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import check_readme as cr  # noqa: E402


def test_excerpt_matching_exempts_only_timings_and_ratios():
    out = ["noise", "method      acc   train", "MemVP     51.70   41.2s  1.93x", "",
           "input     48.60   80.1s", "end"]
    assert cr.find_excerpt(["MemVP     51.70   12.0s  2.50x", "input     48.60   3.3s"], out)
    assert not cr.find_excerpt(["MemVP     51.71   41.2s  1.93x"], out)     # a metric must be identical
    assert not cr.find_excerpt(["MemVP     51.70   41.2   1.93x"], out)     # a bare number is not a timing
    assert not cr.find_excerpt(["input     48.60   80.1s", "MemVP     51.70   41.2s  1.93x"], out)  # order


def test_quoted_blocks_are_parsed(tmp_path):
    md = tmp_path / "R.md"
    md.write_text("x\n```text\n$ python rlp.py --seeds 1,2,3\nHM  84.1 ± 0.3\n\n```\n```bash\n$ ls\n```\n")
    assert cr.quoted_blocks([md]) == [("R.md", "python rlp.py --seeds 1,2,3", ["HM  84.1 ± 0.3"])]


def test_commands_run_with_this_python_and_a_failed_command_fails_its_block(tmp_path, monkeypatch, capsys):
    """Each block's command runs with sys.executable (no `python` on PATH here); a block whose command exits
    non-zero fails even when its lines were printed; a block marked `# needs:` is listed as skipped."""
    md = tmp_path / "R.md"
    md.write_text("```text\n$ python -c \"import sys; print('ran', sys.executable)\"\n"
                  f"ran {sys.executable}\n```\n\n"
                  "```text\n$ python -c \"import sys; print('acc 51.70'); sys.exit(3)\"\nacc 51.70\n```\n\n"
                  "```text\n$ python memvp.py --model /tmp/smollm2  # needs: the SmolLM2 weights\n"
                  "acc 1\n```\n")
    assert cr.needs(cr.quoted_blocks([md])[2][1]) == "the SmolLM2 weights"
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    (tmp_path / "work").mkdir()
    monkeypatch.setattr(cr, "scratch_copy", lambda: tmp_path / "work")  # the commands need no project file
    assert cr.main([str(md), "--logs", str(tmp_path / "logs")]) == 1
    out = capsys.readouterr().out
    assert "ok   R.md: $ python -c \"import sys; print('ran', sys.executable)\"" in out
    assert "FAIL R.md: $ python -c" in out and "exited with code 3" in out
    assert "skip R.md: $ python memvp.py --model /tmp/smollm2  # needs: the SmolLM2 weights" in out
    assert "1/2 quoted results reproduced, 1 skipped" in out
    assert len(list((tmp_path / "logs").iterdir())) == 2  # the skipped command never ran
    assert cr.main([str(md), "--logs", str(tmp_path / "logs"), "--reuse"]) == 1  # the exit code is in the log


def test_readme_quotes_only_offline_commands_of_the_project():
    scripts = {str(p.relative_to(REPO)) for p in [*REPO.glob("*.py"), *REPO.glob("scripts/*.py")]}
    docs = [p for p in (REPO / "README.md", REPO / "RESULTS.md") if p.exists()]
    for fname, cmd, expected in cr.quoted_blocks(docs):
        words = cmd.split()
        while "=" in words[0]:  # VAR=value prefixes
            words = words[1:]
        assert words[0] == "python" and words[1] in scripts, f"{fname}: '{cmd}' is not a project script"
        flags = {w.split("=")[0] for w in words}
        assert not {"--data_root", "--device"} & flags, f"{fname}: '{cmd}' is not offline"
        assert expected, f"{fname}: '{cmd}' quotes no output"


def test_every_local_link_of_the_docs_exists():
    for doc in ("README.md", "RESULTS.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (REPO / doc).read_text()):
            if not target.startswith(("http://", "https://")):
                assert (REPO / target).exists(), f"{doc} links to {target}, which is not in the repository"
