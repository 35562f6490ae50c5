"""The Sphinx site under docs/ builds without a warning, its configuration reference is conf/*.yaml
key for key and value for value, its API reference documents kiln's modules, and every repo path it
names under docker/, deploy/, conf/ or src/ exists."""

from __future__ import annotations

import html
import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

DOCS = REPO / "docs"
CHECKED_PREFIXES = ("docker/", "deploy/", "conf/", "src/")


def pages_job() -> dict:
    """The GitLab Pages job of .gitlab-ci.yml, the template's `pages` job."""
    return yaml.safe_load((REPO / ".gitlab-ci.yml").read_text(encoding="utf-8"))["pages"]


def pages_build_command() -> list[str]:
    """The pages job's Sphinx command, as its script line reads."""
    [line] = [line for line in pages_job()["script"] if "sphinx" in line]
    return shlex.split(line)


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as the GitLab Pages job builds it: its own command, writing to a temporary dir instead of public/."""
    out = tmp_path_factory.mktemp("docs-html")
    command = pages_build_command()
    assert command[0] == "python" and command[-1] == "public", command
    # -W: any warning (a failed autodoc import included) fails the build; -E: no cached environment.
    done = subprocess.run(
        [sys.executable, *command[1:-1], "-E", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    return out


def page_text(path: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))


def leaf_values(mapping: dict, prefix: str = "") -> dict[str, object]:
    """Every key whose value is not a non-empty mapping, dotted as on Hydra's command line."""
    leaves = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            leaves.update(leaf_values(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def table_rows(page: str, section_id: str) -> dict[str, str]:
    """{key: default as shown} of the config table in the section with that id."""
    start = page.index(f'id="{section_id}"')
    end = page.find('<section id="', start + 1)
    section = page[start : end if end != -1 else len(page)]
    rows = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", section, flags=re.S):
        cells = [
            html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
            for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        ]
        if len(cells) == 3:
            rows[cells[0]] = cells[1]
    return rows


def test_docs_build_without_warnings_and_cover_every_page(built_site: Path) -> None:
    sources = {p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*") if p.suffix in (".md", ".rst")}
    sources = {s for s in sources if not s.startswith("_")}
    built = {p.relative_to(built_site).with_suffix("").as_posix() for p in built_site.rglob("*.html")}
    assert sources <= built, sources - built


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "conf").glob("*.yaml")))
def test_configuration_reference_shows_every_key_with_its_default(built_site: Path, config: str) -> None:
    page = (built_site / "configuration.html").read_text(encoding="utf-8")
    rows = table_rows(page, re.sub(r"[^a-z0-9]+", "-", f"conf/{config}".lower()))
    expected = leaf_values(yaml.safe_load((REPO / "conf" / config).read_text(encoding="utf-8")))
    assert set(expected) <= set(rows), set(expected) - set(rows)
    for key, value in expected.items():
        assert yaml.safe_load(rows[key]) == value, (key, rows[key])


def test_configuration_reference_carries_the_files_comments(built_site: Path) -> None:
    text = page_text(built_site / "configuration.html")
    assert "mnist_cnn (the PyTorch MNIST example network) or resnet8" in text
    assert "decoding threads; 0 = one per core" in text
    assert "kiln additions" in text


def test_api_reference_documents_kiln_and_its_modules(built_site: Path) -> None:
    text = page_text(built_site / "api.html")
    for name in (
        "kiln.prepare_dataset",
        "kiln.load_split",
        "kiln.Predictor",
        "kiln.Trainer",
        "kiln.Manifest",
        "kiln.general_utils.setup_logging",
        "kiln.general_utils.mlflow_init",
        "kiln.general_utils.mlflow_log",
        "kiln.processing.process_data",
        "kiln.training.train",
    ):
        assert name in text, name
    assert "dictConfig" in text  # a docstring's body, not only the signature


def mentioned_paths() -> dict[str, list[str]]:
    """Inline-code spans in the docs' sources that start with a checked prefix: {path: [pages]}."""
    mentions: dict[str, list[str]] = {}
    for page in sorted(DOCS.rglob("*")):
        if page.suffix not in (".md", ".rst") or "_build" in page.parts:
            continue
        text = re.sub(r"^(```|~~~).*?^\1", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        for span in re.findall(r"``([^`\n]+)``|(?<!`)`([^`\n]+)`(?!`)", text):
            path = (span[0] or span[1]).strip()
            # Placeholders and patterns (`conf/<name>.yaml`, `conf/*.yaml`) name no single file.
            if path.startswith(CHECKED_PREFIXES) and not re.search(r"[<>*\s]", path):
                mentions.setdefault(path, []).append(page.relative_to(DOCS).as_posix())
    return mentions


def test_every_repo_path_the_docs_name_exists() -> None:
    mentions = mentioned_paths()
    assert len(mentions) >= 5, mentions  # the check itself still finds the docs' paths
    missing = {path: pages for path, pages in mentions.items() if not (REPO / path.rstrip("/")).exists()}
    assert not missing, f"paths named in docs/ that do not exist: {missing}"


def test_gitlab_pages_job_publishes_the_site_from_the_default_branch() -> None:
    """The template's `pages` job: the Sphinx site (API reference included) built into public/, which GitLab
    Pages serves, on pushes to the default branch only; built_site runs the same command."""
    config = yaml.safe_load((REPO / ".gitlab-ci.yml").read_text(encoding="utf-8"))
    job = pages_job()
    assert job["stage"] in config["stages"]
    assert config["stages"].index(job["stage"]) > config["stages"].index(config["test"]["stage"])
    # The site documents the installed package, compiled core included: kiln is set up before Sphinx runs.
    assert job["script"][0] == "bash scripts/setup.sh"
    command = pages_build_command()
    assert command[:3] == ["python", "-m", "sphinx"] and "-W" in command
    assert command[-3:] == ["html", "docs", "public"] and command[-4] == "-b"
    assert job["artifacts"]["paths"] == ["public"]
    assert job["rules"] == [{"if": "$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH"}]


def test_license_file_is_the_apache_license_pyproject_declares() -> None:
    distribution = importlib.metadata.distribution("kiln-mlops")
    assert distribution.metadata["License"] == "Apache-2.0"  # pyproject's declaration, as the package reports it
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    # The Apache Software Foundation's text, whole: its title, its last section and its appendix.
    assert re.search(r"^\s+Apache License\n\s+Version 2\.0, January 2004\n", text)
    assert "9. Accepting Warranty or Additional Liability." in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    # The wheel ships it (scikit-build-core's default license files): the installed package carries the same text.
    shipped = [file for file in distribution.files or [] if file.name == "LICENSE"]
    assert [file.read_text(encoding="utf-8") for file in shipped] == [text]
