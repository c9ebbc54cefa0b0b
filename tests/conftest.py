"""Test-session setup shared by every test file.

* Every cache (frozen features) goes to one temporary folder for the whole session ($VLPEFT_CACHE, read
  by data.cache_dir), so nothing is written into the repository.
* Each test gets the torch thread count back (a script pins a small model to one thread).
* The repository tree (ignored files included) is listed before and after the run; anything new fails
  the session. __pycache__ and .pytest_cache are the only exceptions.
"""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SKIP = {".git", "__pycache__", ".pytest_cache"}
_CACHE = tempfile.mkdtemp(prefix="vlpeft-test-cache-")
os.environ["VLPEFT_CACHE"] = _CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # the CLI subprocesses write no __pycache__ either


def repo_listing() -> set:
    out = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _SKIP]
        rel = Path(root).relative_to(REPO)
        out.update(str(rel / name) for name in dirs + files)
    return out


def pytest_sessionstart(session):
    session.config._repo_before = repo_listing()


def pytest_sessionfinish(session, exitstatus):
    new = sorted(repo_listing() - session.config._repo_before)
    shutil.rmtree(_CACHE, ignore_errors=True)
    if new:
        print(f"\nerror: the tests wrote into the repository: {', '.join(new[:10])}"
              + (f" (+{len(new) - 10} more)" if len(new) > 10 else ""))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _keep_threads():
    """A script pins a small model to one CPU thread; the next test gets the thread count back."""
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The session-wide cache folder ($VLPEFT_CACHE)."""
    return Path(_CACHE)
