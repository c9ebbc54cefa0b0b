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


def test_readme_quotes_only_offline_commands_of_the_project():
    scripts = {p.name for p in REPO.glob("*.py")}
    docs = [p for p in (REPO / "README.md", REPO / "RESULTS.md") if p.exists()]
    for fname, cmd, expected in cr.quoted_blocks(docs):
        words = cmd.split()
        assert words[0] == "python" and words[1] in scripts, f"{fname}: '{cmd}' is not a project script"
        flags = {w.split("=")[0] for w in words}
        assert not {"--data_root", "--device"} & flags, f"{fname}: '{cmd}' is not offline"
        assert expected, f"{fname}: '{cmd}' quotes no output"


def test_every_local_link_of_the_docs_exists():
    for doc in ("README.md", "RESULTS.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (REPO / doc).read_text()):
            if not target.startswith(("http://", "https://")):
                assert (REPO / target).exists(), f"{doc} links to {target}, which is not in the repository"
