"""The docs the code cites are in the repository: no docstring or document points to `../shared` (a clone has no
such folder), and every `§` section reference names a section of docs/MODEL.md."""
import re
import subprocess

from comfy_client import REPO_DIR

# the test tier itself reads the shared host recipes when they exist (tests/host, scripts, CI); that is code, not a
# reference for readers
CODE_THAT_MAY_READ_SHARED = ("tests/host/", "scripts/setup_host.sh", "scripts/setup_host_current.sh", ".ci/", "tests/conftest.py",
                             "tests/comfy_client.py", "tests/test_docs.py")
TEXT_SUFFIXES = (".py", ".md", ".js", ".sh", ".toml", ".txt", ".json")


def tracked_text_files():
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_DIR,
                           capture_output=True, text=True, check=True).stdout.split()
    return [n for n in names if n.endswith(TEXT_SUFFIXES) and (REPO_DIR / n).is_file()
            and not n.startswith(("tests/fixtures/", "example_workflows/"))]


def model_sections():
    text = (REPO_DIR / "docs" / "MODEL.md").read_text(encoding="utf-8")
    return {m.group(1).rstrip(".") for m in re.finditer(r"^#{2,4} ([A-G](?:\.\d+)*)\.?\s", text, re.M)}


def test_model_doc_has_the_sections_the_code_relies_on():
    sections = model_sections()
    for needed in ("A.1", "A.5", "A.6", "B.1", "B.2", "B.4", "B.5", "B.6", "B.7", "C.3", "C.4", "C.5", "C.6", "D.5"):
        assert needed in sections, f"docs/MODEL.md has no section {needed}"


def test_no_reference_to_shared_outside_the_test_tier():
    offenders = []
    for name in tracked_text_files():
        if name.startswith(CODE_THAT_MAY_READ_SHARED):
            continue
        for number, line in enumerate((REPO_DIR / name).read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\.\./shared|/shared/(spec|fixtures|comfyui_notes|host)", line):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "cite docs/*.md instead of ../shared:\n" + "\n".join(offenders)


def test_every_section_reference_exists():
    sections = model_sections()
    unknown = []
    for name in tracked_text_files():
        if name == "tests/test_docs.py":
            continue
        text = (REPO_DIR / name).read_text(encoding="utf-8")
        for match in re.finditer(r"§\s?([A-Z0-9](?:\.\d+)*)", text):
            if match.group(1) not in sections:
                unknown.append(f"{name}: §{match.group(1)}")
    assert not unknown, "section references that docs/MODEL.md does not have:\n" + "\n".join(unknown)


def test_old_spec_section_style_is_gone():
    stale = [f"{name}:{n}" for name in tracked_text_files() if name != "tests/test_docs.py"
             for n, line in enumerate((REPO_DIR / name).read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\bspec (section )?[A-G](\.\d+)?\b", line)]
    assert not stale, "write `docs/MODEL.md §X.Y` instead of `spec X.Y`: " + ", ".join(stale)
