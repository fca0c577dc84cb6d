"""CI's skip policy: report every skipped test's reason, and fail on any reason other than
  - the platform (a test for another OS, or for a build with or without the Core ML backend), or
  - an optional test asset that is absent and named in the README's "Optional test assets" line.

    python .ci/skip_policy.py junit.xml README.md

Reads pytest's JUnit XML (--junitxml), so it sees exactly what pytest reported, for skips from marks,
pytest.skip and importorskip alike. Exit status 1 when a skip breaks the policy, 2 when the report is
unreadable.
"""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

# Reasons that say the test is for another platform or build. Kept narrow on purpose: a new kind of skip
# should fail CI until someone decides it is legitimate.
PLATFORM = [
    r"\bonly on macOS\b", r"\bmacOS only\b", r"\boff[- ]macOS\b", r"\bonly used off macOS\b",
    r"\(Linux only\)", r"^this build has the Core ML backend$", r"^the symbol table check reads ELF\b",
]
ASSET = re.compile(r"^(?P<asset>\S+) is absent$")


def optional_assets(readme: str) -> List[str]:
    """Backticked names on the README's "Optional test assets:" line."""
    for line in readme.splitlines():
        if line.startswith("Optional test assets:"):
            return re.findall(r"`([^`]+)`", line)
    return []


def skip_reasons(junit_xml: str) -> List[Tuple[str, str]]:
    """(test id, reason) of every skipped test case."""
    out = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        for skipped in case.findall("skipped"):
            reason = (skipped.get("message") or skipped.text or "").strip()
            reason = re.sub(r"^(Skipped|skipped):\s*", "", reason)
            out.append((f"{case.get('classname', '')}::{case.get('name', '')}", reason))
    return out


def judge(reason: str, assets: List[str]) -> str:
    """'platform', 'asset' or '' (not allowed)."""
    if any(re.search(p, reason) for p in PLATFORM):
        return "platform"
    m = ASSET.match(reason)
    if m and m.group("asset") in assets:
        return "asset"
    return ""


def main(argv: List[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        skips = skip_reasons(argv[1])
    except (OSError, ET.ParseError) as exc:
        print(f"ci: cannot read the test report {argv[1]}: {exc}", file=sys.stderr)
        return 2
    assets = optional_assets(Path(argv[2]).read_text(encoding="utf-8"))
    verdicts: Dict[str, str] = {reason: judge(reason, assets) for _, reason in skips}
    counts = Counter(reason for _, reason in skips)
    print(f"ci: {len(skips)} skipped test(s)")
    for reason, n in sorted(counts.items()):
        kind = verdicts[reason] or "NOT ALLOWED"
        print(f"ci:   [{kind}] {n} x {reason}")
    bad = [(test, reason) for test, reason in skips if not verdicts[reason]]
    if bad:
        print("ci: tests skipped for a reason other than the platform or an optional asset named in README.md "
              "(Optional test assets):", file=sys.stderr)
        for test, reason in bad:
            print(f"ci:   {test}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
