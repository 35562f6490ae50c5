"""Operations files: Dockerfiles, their entrypoints, the Run:ai submit scripts, CI configs, VS Code.

No Docker engine or Run:ai cluster is needed: Dockerfiles are linted with hadolint and read for what a
user relies on (each image's file builds the target of docker/Dockerfile that shares the one builder
stage, non-root user, no compiler at run time, the documented server command), shell scripts
are shellchecked and run against a fake `runai`, CI files are validated against their schemas, and
the Hydra command lines the scripts submit are composed by kiln's real apps.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
SHARED_DOCKERFILE = DOCKER / "Dockerfile"  # every stage once; docker/render.py writes the per-image files
RUNAI = REPO / "deploy" / "runai"

DEBIAN_IMAGES = [
    "kiln-data-prep",
    "kiln-model-training",
    "kiln-batch-inferencing",
    "kiln-fastapi",
    "kiln-jupyter",
    "kiln-vscode",
]
GPU_IMAGE = "kiln-model-training-gpu"
ALL_IMAGES = [*DEBIAN_IMAGES, GPU_IMAGE]
# Workspace images for developing kiln: compilers are there on purpose.
DEV_IMAGES = {"kiln-vscode"}
GUNICORN_CMD = [
    "gunicorn",
    "kiln_fastapi.main:APP",
    "-b",
    "0.0.0.0:8080",
    "-w",
    "4",
    "-k",
    "uvicorn.workers.UvicornWorker",
    "--chdir",
    "src",
]
# The template's layout, as its guides write it (seeds 000 and 003): `--working-dir /home/aisg/<repo>`,
# `-v $PWD/models:/home/aisg/from-gcs`, `source activate <repo>`.
GUIDE_HOME = "/home/aisg"
GUIDE_WORKDIR = "/home/aisg/kiln"
GUIDE_MODELS_DIR = "/home/aisg/from-gcs"
ACTIVATE = DOCKER / "entrypoints" / "activate"
# The stage that compiles kiln's C++ core into the wheel each image installs.
WHEEL_BUILDER = {**{name: "builder" for name in DEBIAN_IMAGES}, GPU_IMAGE: "builder-gpu"}
PIP_WHEEL = "pip wheel --no-build-isolation --no-deps --wheel-dir /wheels ."
COMPILER_PACKAGE = re.compile(r"^(g\+\+|gcc|cpp|clang.*|cmake|ninja-build|build-essential|make)$|-dev$")


def tool(name: str) -> str:
    """Path of a linter installed by pip with kiln's test extra (`pip install -e ".[test]"`)."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it comes with kiln's test extra: pip install -e '.[test]'")
    return found


# --- Dockerfiles ------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    text: str = ""
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, continuation lines joined, comment lines dropped (the ARGs before the
    first FROM are read by `global_args`)."""
    stages: list[Stage] = []
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        logical += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        keyword, _, args = logical.partition(" ")
        keyword, args, logical = keyword.upper(), args.strip(), ""
        if keyword == "FROM":
            words = args.split()
            name = words[words.index("AS") + 1] if "AS" in words else None
            stages.append(Stage(base=words[0], name=name))
        if stages:
            stages[-1].instructions.append(Instruction(keyword, args))
            stages[-1].text += f"{keyword} {args}\n"
    return stages


def dockerfile(name: str) -> list[Stage]:
    return parse_dockerfile(DOCKER / f"{name}.Dockerfile")


def global_args(path: Path) -> dict[str, str]:
    """The ARGs declared before a Dockerfile's first FROM, with their defaults."""
    found = {}
    for line in path.read_text().splitlines():
        if line.startswith("FROM "):
            break
        if line.startswith("ARG "):
            key, _, value = line.removeprefix("ARG ").strip().partition("=")
            found[key] = value.strip('"')
    return found


def image_stages(stages: list[Stage], target: str | None = None) -> list[Stage]:
    """The stages whose files end up in the image of `target` (default: the last stage): the target and
    the stages it is built FROM, base first. Stages it only mounts or copies from are not among them."""
    by_name = {stage.name: stage for stage in stages}
    stage = by_name[target] if target else stages[-1]
    chain = [stage]
    while stage.base in by_name:
        stage = by_name[stage.base]
        chain.insert(0, stage)
    return chain


def image(name: str) -> Stage:
    """What docker/<name>.Dockerfile puts in the image it builds, as one stage: the instructions of its
    last stage and of the stages that one is built FROM, in order."""
    chain = image_stages(dockerfile(name))
    merged = Stage(base=chain[0].base, name=chain[-1].name)
    for stage in chain:
        merged.instructions += stage.instructions
        merged.text += stage.text
    return merged


def wheel_mounts(stage: Stage) -> list[tuple[str, str]]:
    """(stage mounted from, RUN command) of each RUN that bind-mounts a stage's /wheels."""
    return [
        (match.group(1), run)
        for run in stage.all("RUN")
        if (match := re.search(r"--mount=type=bind,from=([\w.-]+),source=/wheels,target=/wheels", run))
    ]


def apt_packages(stage: Stage) -> set[str]:
    """Packages named by the stage's `apt-get install` commands (.deb files excluded)."""
    packages: set[str] = set()
    for run in stage.all("RUN"):
        for command in run.split("&&"):
            words = command.split()
            if "apt-get" not in words or "install" not in words:
                continue
            for word in words[words.index("install") + 1 :]:
                if not word.startswith("-") and "=" not in word and not word.endswith(".deb"):
                    packages.add(word)
    return packages


def arg_default(stage: Stage, name: str, path: Path | None = None) -> str | None:
    """The value `name` has in the stage when no --build-arg is given; a bare `ARG name` takes the
    default of the global ARG of the Dockerfile at `path`."""
    for arg in stage.all("ARG"):
        key, eq, value = arg.partition("=")
        if key == name:
            if not eq and path is not None:
                return global_args(path).get(name)
            return value.strip('"')
    return None


def all_dockerfiles() -> list[Path]:
    return [SHARED_DOCKERFILE, *sorted(DOCKER.glob("*.Dockerfile"))]


def test_every_documented_image_has_its_dockerfile_and_its_target():
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(f"{n}.Dockerfile" for n in ALL_IMAGES)
    targets = [stage.name for stage in parse_dockerfile(SHARED_DOCKERFILE) if stage.name.startswith("kiln-")]
    assert sorted(targets) == sorted(ALL_IMAGES)


def test_per_image_dockerfiles_are_generated_from_the_shared_dockerfile():
    result = subprocess.run(
        [sys.executable, str(DOCKER / "render.py"), "--check"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_image_file_builds_the_same_image_as_its_target_of_the_shared_dockerfile(name):
    """`docker build -f docker/<name>.Dockerfile .` (the documented command) and
    `docker build --target <name> -f docker/Dockerfile .`: the same stages, the same global ARGs."""
    shared = {stage.name: stage for stage in parse_dockerfile(SHARED_DOCKERFILE)}
    stages = dockerfile(name)
    assert stages[-1].name == name  # the file's default target
    for stage in stages:
        assert stage.text == shared[stage.name].text, f"{name}: stage {stage.name} differs from docker/Dockerfile's"
    shared_args = global_args(SHARED_DOCKERFILE)
    assert global_args(DOCKER / f"{name}.Dockerfile").items() <= shared_args.items()
    for stage in stages:
        for arg in stage.all("ARG"):
            if "=" not in arg:
                assert arg in global_args(DOCKER / f"{name}.Dockerfile"), f"{name}: global ARG {arg} not declared"


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_every_image_builds_its_wheel_in_the_one_shared_builder_stage(name):
    shared = parse_dockerfile(SHARED_DOCKERFILE)
    wheel_builders = [stage.name for stage in shared if PIP_WHEEL in stage.all("RUN")]
    assert sorted(wheel_builders) == ["builder", "builder-gpu"]  # Debian, and CUDA's Ubuntu for the GPU image
    chain = image_stages(shared, name)
    sources = {source for stage in chain for source, _ in wheel_mounts(stage)}
    assert sources == {WHEEL_BUILDER[name]}
    assert not {stage.name for stage in chain} & set(wheel_builders), f"{name} is built on top of a builder"


def documented_build_commands() -> list[tuple[str, str]]:
    """(where, command) of every `docker build` command in the docs, the README and the Dockerfiles'
    comments, continuation lines joined and comment marks dropped."""
    sources = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *all_dockerfiles()]
    commands = []
    for path in sources:
        text = re.sub(r"^#", "", path.read_text(), flags=re.M) if path.parent == DOCKER else path.read_text()
        text = re.sub(r"[\\`]\n\s*", " ", text)
        for command in re.findall(r"docker (?:buildx )?build\s+-[^\n]*", text):
            commands.append((path.relative_to(REPO).as_posix(), command.split("`")[0]))
    return commands


def test_documented_build_commands_name_dockerfiles_and_targets_that_exist():
    commands = documented_build_commands()
    named = set()
    for where, command in commands:
        words = shlex.split(command.replace("$", "_"))
        flags = {flag: words[i + 1] for i, flag in enumerate(words[:-1]) if flag in {"-f", "--file", "--target"}}
        assert "-f" in flags or "--file" in flags, f"{where}: {command}: no -f"
        file = flags.get("-f", flags.get("--file"))
        # docker/kiln-<image>.Dockerfile stands for each image's file
        files = [re.sub(r"kiln-<\w+>", name, file) for name in ALL_IMAGES] if "<" in file else [file]
        for path in map(REPO.joinpath, files):
            assert path.is_file(), f"{where}: {command}: no such Dockerfile {path.relative_to(REPO)}"
            stages = parse_dockerfile(path)
            target = flags.get("--target", stages[-1].name)
            assert target in {stage.name for stage in stages}, f"{where}: {command}: no target {target}"
            named.add(target)
        assert words[-1] == ".", f"{where}: {command}: the build context is the repo root"
    assert set(ALL_IMAGES) <= named  # each image's build command is written down somewhere


def test_hadolint_passes_every_dockerfile_and_each_ignore_says_why():
    files = all_dockerfiles()
    result = subprocess.run(
        [tool("hadolint"), "--no-color", *map(str, files)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for path in files:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if "hadolint ignore=" in line:
                reason = lines[number - 1].strip()
                assert reason.startswith("#") and "hadolint" not in reason, (
                    f"{path.name}:{number + 1}: an ignore needs a comment line above it saying why"
                )


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_dockerfile_opens_with_its_build_and_run_commands(name):
    header = []
    for line in (DOCKER / f"{name}.Dockerfile").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    # RUN --mount and COPY --chmod need BuildKit's Dockerfile syntax 1.x, whatever the engine bundles.
    assert header[0] == "# syntax=docker/dockerfile:1"
    header_text = "\n".join(header)
    assert "docker build" in header_text
    assert f"-f docker/{name}.Dockerfile" in header_text
    assert "--platform linux/amd64 ." in header_text
    assert "docker run" in header_text or "runai" in header_text


MOUNTED_SCRIPT = re.compile(r"--mount=type=bind,source=(docker/setup/[\w.-]+\.sh),target=(\S+) sh (\S+)")


def run_with_mounted_scripts(stage: Stage) -> list[str]:
    """The stage's RUN commands, each docker/setup script that one binds and runs replaced by the
    script's commands (the file the build context gives it)."""
    commands = []
    for run in stage.all("RUN"):
        match = MOUNTED_SCRIPT.search(run)
        if match:
            assert match[2] == match[3], f"RUN runs {match[3]}, not the script it mounts at {match[2]}"
            run = (REPO / match[1]).read_text()
        commands.append(run)
    return commands


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_image_runs_as_the_templates_non_root_user_in_the_guides_layout(name):
    """uid/gid 2222 as in the template, and its paths, which the guides' commands and mounts name: the repo
    at /home/aisg/<repo> (the working dir), models mounted at /home/aisg/from-gcs, both the user's."""
    final = image(name)
    assert final.last("USER") == "2222:2222"  # numeric, so Kubernetes' runAsNonRoot can verify it
    user_setup = " ".join(run_with_mounted_scripts(final))
    assert "groupadd --gid 2222 kiln" in user_setup
    assert "--uid 2222 --gid 2222" in user_setup and f"--home-dir {GUIDE_HOME}" in user_setup
    assert f"install -d -o kiln -g kiln {GUIDE_WORKDIR} {GUIDE_MODELS_DIR}" in user_setup
    # kiln's earlier paths (/home/kiln/kiln, /home/kiln/models) still lead there, for manifests that name them
    assert f"ln -s {GUIDE_HOME} /home/kiln" in user_setup and "ln -s from-gcs /home/aisg/models" in user_setup
    assert final.last("WORKDIR") == GUIDE_WORKDIR


@pytest.mark.parametrize("name", sorted(set(ALL_IMAGES) - DEV_IMAGES))
def test_runtime_image_carries_no_compiler(name):
    stages = dockerfile(name)
    chain = image_stages(stages)
    assert chain[0].base not in {s.name for s in stages}, "the image must start from a base image"
    assert not any(PIP_WHEEL in stage.all("RUN") for stage in chain), "the image must not be built on the builder"
    final = image(name)
    assert "devel" not in final.base
    compilers = sorted(p for p in apt_packages(final) if COMPILER_PACKAGE.search(p))
    assert not compilers, f"{name}'s final stage installs build tools: {compilers}"
    assert not any("--from=" in copy for copy in final.all("COPY")), "only the wheel comes from the builder"


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_builder_compiles_the_wheel_with_the_documented_toolchain(name):
    stages = {stage.name: stage for stage in dockerfile(name)}
    builder = stages[WHEEL_BUILDER[name]]
    assert {"cmake", "ninja-build", "g++", "pkg-config", "libopencv-dev", "nlohmann-json3-dev", "libdeflate-dev"} <= (
        apt_packages(builder)
    )
    runs = builder.all("RUN")
    assert any('"torch==${TORCH_VERSION}"' in run and '--index-url "${TORCH_INDEX_URL}"' in run for run in runs)
    assert runs[-1] == PIP_WHEEL
    mounts = [(source, run) for stage in image_stages(dockerfile(name)) for source, run in wheel_mounts(stage)]
    assert len(mounts) == 1, f"{name}: the image installs kiln's wheel once"
    source, run = mounts[0]
    assert source == builder.name and "/wheels/kiln_mlops-*.whl" in run


def test_images_install_the_torch_kiln_is_pinned_to():
    (version,) = re.findall(r'^\s*"torch==([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    for name in ALL_IMAGES:
        path = DOCKER / f"{name}.Dockerfile"
        stages = dockerfile(name)
        builder = next(stage for stage in stages if stage.name == WHEEL_BUILDER[name])
        # The wheel is compiled against the torch the image runs with: each installs it exactly once.
        for what in (image_stages(stages), [builder]):
            torch_installs = [(s, r) for s in what for r in s.all("RUN") if '"torch==${TORCH_VERSION}"' in r]
            assert len(torch_installs) == 1, f"{name}: torch installed {len(torch_installs)} times"
            stage, run = torch_installs[0]
            assert '--index-url "${TORCH_INDEX_URL}"' in run
            assert arg_default(stage, "TORCH_VERSION", path) == version, f"{name}: TORCH_VERSION != {version}"
            index = arg_default(stage, "TORCH_INDEX_URL", path)
            expected = "/whl/cu" if name == GPU_IMAGE else "/whl/cpu"
            assert index and expected in index, f"{name}: TORCH_INDEX_URL {index}"


def _kiln_core_packages() -> set[str]:
    """Debian packages that provide the non-torch libraries kiln._core links against directly."""
    spec = importlib.util.find_spec("kiln._core")
    if spec is None or spec.origin is None or shutil.which("dpkg") is None:
        pytest.skip("kiln._core is not built here (or no dpkg): nothing to read the linked libraries from")
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", _run(["readelf", "-d", spec.origin]))
    resolved = dict(re.findall(r"^\s*(\S+) => (\S+)", _run(["ldd", spec.origin]), re.M))
    packages = set()
    for library in needed:
        path = resolved.get(library, "")
        if "torch" in path or library.startswith(("libtorch", "libc10", "ld-linux")):
            continue  # from the torch wheel
        real = os.path.realpath(path)
        candidates = {real, path, real.replace("/usr/lib/", "/lib/"), real.replace("/lib/", "/usr/lib/", 1)}
        owners = subprocess.run(["dpkg", "-S", *candidates], capture_output=True, text=True).stdout
        assert owners, f"no Debian package owns {library} ({path})"
        packages.add(owners.split(":")[0].strip())
    return packages


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_runtime_images_install_the_libraries_kiln_core_links_against():
    in_every_debian_image = {"libc6", "libstdc++6", "libgcc-s1"}  # apt itself needs them
    needed = _kiln_core_packages() - in_every_debian_image
    assert needed, "expected kiln._core to link OpenCV and libdeflate"
    for name in sorted(set(ALL_IMAGES) - DEV_IMAGES - {GPU_IMAGE}):
        missing = needed - apt_packages(image(name))
        assert not missing, f"{name}'s runtime stage does not install {missing}"
    # Ubuntu 24.04 (the CUDA images' base) names the same OpenCV 4.6 libraries with a t64 suffix.
    ubuntu_names = {p + "t64" if p.startswith("libopencv") else p for p in needed}
    assert ubuntu_names <= apt_packages(image(GPU_IMAGE))


def test_gpu_image_builds_on_cuda_devel_and_runs_on_cuda_runtime():
    stages = {stage.name: stage for stage in dockerfile(GPU_IMAGE)}
    builder, final = stages[WHEEL_BUILDER[GPU_IMAGE]], image(GPU_IMAGE)
    assert builder.base.startswith("nvidia/cuda:") and "-devel-" in builder.base
    assert final.base.startswith("nvidia/cuda:") and "-runtime-" in final.base
    assert json.loads(final.last("CMD")) == ["python", "src/train_model.py", "no_cuda=false"]


def test_fastapi_image_fetches_the_model_then_runs_the_documented_gunicorn_command():
    final = image("kiln-fastapi")
    assert json.loads(final.last("ENTRYPOINT")) == ["kiln-fetch-model"]
    assert json.loads(final.last("CMD")) == GUNICORN_CMD
    assert "8080" in final.all("EXPOSE")
    assert 'PRED_MODEL_UUID=""' in final.all("ARG")
    env = " ".join(final.all("ENV"))
    assert "PRED_MODEL_UUID=${PRED_MODEL_UUID}" in env  # the build arg persists into the container
    assert f"MODELS_DIR={GUIDE_MODELS_DIR}" in env  # the guide's models mount; the entrypoint and server look there


def test_batch_inferencing_image_runs_batch_inferencing_on_the_fetched_model():
    final = image("kiln-batch-inferencing")
    assert json.loads(final.last("ENTRYPOINT")) == ["kiln-fetch-model"]
    assert json.loads(final.last("CMD")) == ["kiln-batch-inferencing"]
    env = image_env(final)
    assert env["PRED_MODEL_UUID"] == "${PRED_MODEL_UUID}"
    # the guide's `-v $PWD/models:/home/aisg/from-gcs` and `--env INPUT_DATA_DIR=/home/aisg/<repo>/data`
    assert env["MODELS_DIR"] == GUIDE_MODELS_DIR and env["INPUT_DATA_DIR"] == f"{GUIDE_WORKDIR}/data"


@pytest.mark.parametrize("name", ["kiln-data-prep", "kiln-model-training"])
def test_job_images_default_to_their_hydra_app(name):
    app = "process_data" if name == "kiln-data-prep" else "train_model"
    assert json.loads(image(name).last("CMD")) == ["python", f"src/{app}.py"]


def image_env(stage: Stage) -> dict[str, str]:
    """The stage's ENV variables as the image ends up with them (later ENV lines win; `$VAR` left as written)."""
    env: dict[str, str] = {}
    for line in stage.all("ENV"):
        for word in shlex.split(line):
            key, _, value = word.partition("=")
            env[key] = value
    return env


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_image_has_the_conda_env_kiln_that_the_guides_source_activate(name):
    """`source activate kiln` finds docker/entrypoints/activate first on PATH (before the venv's own
    bin/activate), and that file activates the venv the image installed kiln into (KILN_ENV_PREFIX)."""
    final = image(name)
    env = image_env(final)
    prefix = env["KILN_ENV_PREFIX"]
    venvs = re.findall(r"-m venv --prompt kiln (\S+)", " ".join(final.all("RUN")))
    assert venvs == [prefix], f"{name}: the venv kiln is installed in is not KILN_ENV_PREFIX"
    copies = [c.split() for c in final.all("COPY") if "docker/entrypoints/activate" in c.split()]
    assert len(copies) == 1, f"{name}: docker/entrypoints/activate is not copied into the image"
    destination = copies[0][-1]
    assert Path(destination).name == "activate" and "--chmod=0644" in copies[0]
    path = env["PATH"].split(":")
    assert path[:2] == [str(Path(destination).parent), f"{prefix}/bin"], f"{name}: PATH {env['PATH']}"


@pytest.fixture(scope="module")
def kiln_env(tmp_path_factory) -> Path:
    """An image's venv stand-in: a real venv (seeing this Python's packages, kiln among them)."""
    prefix = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", "--prompt", "kiln", str(prefix)],
        check=True,
        timeout=120,
    )
    return prefix


def in_image_shell(kiln_env: Path, command: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    """`/bin/bash -c <command>` with an image's PATH: the activate file's folder, then the venv's bin/."""
    shim_dir = kiln_env.parent / "kiln-bin"
    shim_dir.mkdir(exist_ok=True)
    shutil.copy(ACTIVATE, shim_dir / "activate")
    full_env = {"PATH": f"{shim_dir}:{kiln_env}/bin:/usr/bin:/bin", "KILN_ENV_PREFIX": str(kiln_env), **env}
    return subprocess.run(
        ["/bin/bash", "-c", command], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_source_activate_kiln_activates_the_images_environment(kiln_env):
    probe = 'python -c "import sys, kiln; print(sys.prefix)"; echo "$CONDA_DEFAULT_ENV $CONDA_PREFIX $VIRTUAL_ENV"'
    result = in_image_shell(kiln_env, f"source activate kiln && {probe}")
    assert result.returncode == 0, result.stderr
    prefix, names = result.stdout.splitlines()
    assert Path(prefix) == kiln_env  # kiln imports from the env
    assert names.split() == ["kiln", str(kiln_env), str(kiln_env)]
    # what conda also accepts: the env's path, or no name in an image that has only this one
    for spelling in (f"source activate {kiln_env}", "source activate"):
        result = in_image_shell(kiln_env, f'{spelling} && echo "$CONDA_DEFAULT_ENV"')
        assert result.returncode == 0 and result.stdout.strip() == "kiln", spelling
    result = in_image_shell(kiln_env, 'source activate kiln && deactivate && echo "[$VIRTUAL_ENV]"')
    assert result.stdout.strip() == "[]", result.stderr  # the venv's own deactivate


def test_source_activate_another_env_fails_as_conda_does_and_runs_nothing_after_it(kiln_env):
    result = in_image_shell(kiln_env, "source activate my-project && echo ran")
    assert result.returncode == 1 and "ran" not in result.stdout
    assert "Could not find conda environment: my-project" in result.stderr
    result = in_image_shell(kiln_env, "source activate kiln && echo ran", KILN_ENV_PREFIX=str(kiln_env / "missing"))
    assert result.returncode == 1 and "ran" not in result.stdout and "missing" in result.stderr


def test_vscode_image_has_what_setup_sh_installs_so_tests_run_without_root():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    listed = re.search(r"APT_PACKAGES=\(([^)]*)\)", setup).group(1)
    packages = {word for line in listed.splitlines() for word in line.split("#")[0].split()}
    assert packages <= apt_packages(image("kiln-vscode"))


def _dockerignore_regexes() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", pattern):
            if part == "**/":
                regex += "(?:.*/)?"
            elif part == "**":
                regex += ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            elif part.startswith("["):
                regex += part
            else:
                regex += re.escape(part)
        rules.append((negate, re.compile(regex + "$")))
    return rules


def ignored_by_docker(relative: str) -> bool:
    """Whether .dockerignore leaves `relative` (or a folder above it) out of the build context."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in _dockerignore_regexes():
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_data_and_build_outputs_out_of_the_context():
    for path in ["build/cp311/_core.so", "data/raw/train/a.png", "data/processed/train.pt", "mlruns/0/meta.yaml",
                 "outputs/2024-01-01/x.log", "multirun/x", "models/abc/checkpoint.pt", ".git/HEAD", "logs/info.log",
                 "python/kiln/__pycache__/cli.cpython-311.pyc", ".env"]:  # fmt: skip
        assert ignored_by_docker(path), path
    for path in ["cpp/src/trainer.cpp", "python/kiln/cli.py", "python/kiln_fastapi/main.py", "src/train_model.py",
                 "conf/train_model.yaml", "pyproject.toml", "CMakeLists.txt", "README.md"]:  # fmt: skip
        assert not ignored_by_docker(path), path


@pytest.mark.parametrize("name", [*ALL_IMAGES, "Dockerfile"])
def test_everything_a_dockerfile_copies_is_in_the_build_context(name):
    path = SHARED_DOCKERFILE if name == "Dockerfile" else DOCKER / f"{name}.Dockerfile"
    for stage in parse_dockerfile(path):
        for copy in stage.all("COPY"):
            words = [w for w in copy.split() if not w.startswith("--")]
            for source in words[:-1]:
                assert (REPO / source).exists(), f"{name}: COPY {source}: no such path in the repo"
                assert not ignored_by_docker(source), f"{name}: COPY {source} is excluded by .dockerignore"


# --- entrypoints ------------------------------------------------------------------------------------

FETCH = DOCKER / "entrypoints" / "kiln-fetch-model.sh"
BATCH = DOCKER / "entrypoints" / "kiln-batch-inferencing.sh"


def fake_python(bin_dir: Path, log: Path, stdout: str = "", exit_code: int = 0) -> None:
    """A `python` on PATH that records its argv (one line, NUL-separated) and prints `stdout`."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "python"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f"printf '%s\\0' \"$@\" >> {shlex.quote(str(log))}\necho >> {shlex.quote(str(log))}\n"
        f"printf %s {shlex.quote(stdout)}\nexit {exit_code}\n"
    )
    script.chmod(0o755)


def run_entrypoint(script: Path, tmp_path: Path, env: dict[str, str], *command: str, **fake) -> tuple:
    log = tmp_path / "python-calls"
    fake_python(tmp_path / "bin", log, **fake)
    base = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "MODELS_DIR": str(tmp_path / "models")}
    result = subprocess.run(["bash", str(script), *command], env={**base, **env}, capture_output=True, text=True)
    calls = [line.split("\0")[:-1] for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def test_fetch_model_downloads_the_run_and_exports_the_printed_path(tmp_path):
    checkpoint = f"{tmp_path}/models/abc123/checkpoint/checkpoint.pt"
    result, calls = run_entrypoint(
        FETCH,
        tmp_path,
        {"PRED_MODEL_UUID": "abc123", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"},
        "printenv",
        "PRED_MODEL_PATH",
        stdout=f"progress\n{checkpoint}\n",
    )
    assert result.returncode == 0, result.stderr
    assert calls == [["-m", "kiln.models", "download", "abc123", "--dst", f"{tmp_path}/models"]]
    assert result.stdout.strip() == checkpoint


@pytest.mark.parametrize(
    "env",
    [
        {"PRED_MODEL_PATH": "/models/local.pt", "PRED_MODEL_UUID": "abc123", "MLFLOW_TRACKING_URI": "http://x"},
        {"PRED_MODEL_UUID": "abc123"},  # no tracking server: left to the server, which says what is missing
        {},
    ],
    ids=["local-path-wins", "no-tracking-uri", "nothing-set"],
)
def test_fetch_model_leaves_the_environment_alone_without_a_run_to_fetch(tmp_path, env):
    result, calls = run_entrypoint(FETCH, tmp_path, env, "printenv", "PRED_MODEL_PATH")
    assert calls == []
    assert result.stdout.strip() == env.get("PRED_MODEL_PATH", "")


def test_fetch_model_takes_a_run_already_in_the_mounted_models_dir_without_a_tracking_server(tmp_path):
    """The guide's `docker run -v $PWD/models:/home/aisg/from-gcs ...` with the run's folder already in
    models/: real `python -m kiln.models`, no MLflow server, the checkpoint in the run's artifacts."""
    checkpoint = tmp_path / "models" / "abc123" / "checkpoint" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")  # only found, not read, here
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MODELS_DIR": str(tmp_path / "models"),
        "PRED_MODEL_UUID": "abc123",
    }
    result = subprocess.run(
        ["bash", str(FETCH), "printenv", "PRED_MODEL_PATH"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(checkpoint)
    assert "using the model of MLflow run abc123" in result.stderr


def test_fetch_model_downloads_into_the_guides_mount_point_by_default(tmp_path):
    log = tmp_path / "python-calls"
    fake_python(tmp_path / "bin", log, stdout="/home/aisg/from-gcs/abc/checkpoint/checkpoint.pt\n")
    env = {
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "PRED_MODEL_UUID": "abc",
        "MLFLOW_TRACKING_URI": "http://x",
    }
    result = subprocess.run(["bash", str(FETCH), "true"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert log.read_text().split("\0")[:-1] == ["-m", "kiln.models", "download", "abc", "--dst", GUIDE_MODELS_DIR]


def test_fetch_model_stops_when_the_download_fails(tmp_path):
    result, _ = run_entrypoint(
        FETCH, tmp_path, {"PRED_MODEL_UUID": "abc", "MLFLOW_TRACKING_URI": "http://x"}, "echo", "served", exit_code=1
    )
    assert result.returncode != 0 and "served" not in result.stdout


def test_models_download_cli_takes_what_the_entrypoint_passes():
    result = subprocess.run(
        [sys.executable, "-m", "kiln.models", "download", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "run_id" in result.stdout and "--dst" in result.stdout


def test_batch_command_runs_batch_inferencing_on_the_model_and_input_dir(tmp_path):
    env = {"PRED_MODEL_PATH": "/home/aisg/from-gcs/abc/checkpoint.pt", "INPUT_DATA_DIR": "/data/in"}
    result, calls = run_entrypoint(BATCH, tmp_path, env, "inference.batch_size=64")
    assert result.returncode == 0, result.stderr
    assert calls == [
        [
            "src/batch_inferencing.py",
            "inference.model_path=/home/aisg/from-gcs/abc/checkpoint.pt",
            "inference.input_data_dir=/data/in",
            "inference.batch_size=64",
        ]
    ]


def test_batch_command_without_a_model_says_how_to_give_one(tmp_path):
    result, calls = run_entrypoint(BATCH, tmp_path, {})
    assert result.returncode == 2 and calls == []
    assert "PRED_MODEL_PATH" in result.stderr and "PRED_MODEL_UUID" in result.stderr


# --- Run:ai -----------------------------------------------------------------------------------------

SCRIPTS = {
    "submit-data-prep.sh": "process_data",
    "submit-training.sh": "train_model",
    "submit-sweep.sh": "train_model",
}
RUNAI_ENV = {
    "KILN_RUNAI_USER": "Alice",
    "KILN_REGISTRY": "registry.test/kiln",
    "KILN_IMAGE_TAG": "1.2.3",
    "KILN_PVC": "team-pvc",
    "MLFLOW_TRACKING_URI": "http://mlflow.test:5005",
    "MLFLOW_TRACKING_USERNAME": "alice",
    "MLFLOW_TRACKING_PASSWORD": "s3cret pass",
    "MLFLOW_HPTUNING_TAG": "1700000000",
}
WORKSPACE = "/team-pvc/workspaces/alice"


def test_shellcheck_passes_the_shell_scripts():
    scripts = [
        *sorted(RUNAI.glob("*.sh")),
        RUNAI / "config.env",
        *sorted((DOCKER / "entrypoints").glob("*.sh")),
        *sorted((DOCKER / "setup").glob("*.sh")),
    ]
    result = subprocess.run(
        [tool("shellcheck"), "-x", *map(str, scripts)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def submit(tmp_path: Path, script: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list]:
    """Run a submit script with a fake `runai` on PATH; returns the result and runai's argv (or [])."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "runai-argv"
    (bin_dir / "runai").write_text(f"#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" > {shlex.quote(str(log))}\n")
    (bin_dir / "runai").chmod(0o755)
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), **RUNAI_ENV, **env}
    result = subprocess.run(
        [str(RUNAI / script), *args], env=full_env, capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    argv = log.read_text().split("\0")[:-1] if log.exists() else []
    return result, argv


def flag_values(argv: list[str], flag: str) -> list[str]:
    head = argv[: argv.index("--command")]
    return [head[i + 1] for i, word in enumerate(head) if word == flag]


GUIDE_JOB_PREFIX = "source activate kiln && "


def job_line(argv: list[str]) -> str:
    """The job's command, which must have the Run:ai guide's shape: `--command -- /bin/bash -c "source
    activate <repo> && python src/..."`; returns the string bash runs."""
    assert argv[argv.index("--command") + 1] == "--"
    job = argv[argv.index("--command") + 2 :]
    assert job[:2] == ["/bin/bash", "-c"] and len(job) == 3, job
    assert job[2].startswith(GUIDE_JOB_PREFIX), job[2]
    return job[2]


def submitted_command(argv: list[str]) -> list[str]:
    """The words of the command the job runs once its environment is activated."""
    return shlex.split(job_line(argv).removeprefix(GUIDE_JOB_PREFIX))


@pytest.mark.parametrize("script", SCRIPTS)
def test_submit_script_submits_the_job_as_the_runai_guide_does(tmp_path, script):
    app = SCRIPTS[script]
    result, argv = submit(tmp_path, script, f"{app}.seed=7")
    assert result.returncode == 0, result.stderr
    assert argv[0] == "submit"
    image = {"process_data": "data-prep"}.get(app, "model-training")
    assert flag_values(argv, "-i") == [f"registry.test/kiln/{image}:1.2.3"]
    assert flag_values(argv, "--pvc") == ["team-pvc:/team-pvc"]
    assert flag_values(argv, "--working-dir") == [GUIDE_WORKDIR]
    assert flag_values(argv, "--job-name-prefix")[0].startswith("alice-")
    assert flag_values(argv, "--cpu") and flag_values(argv, "--memory") and not flag_values(argv, "--gpu")
    command = submitted_command(argv)
    assert command[:2] == ["python", f"src/{app}.py"]
    assert command[-1] == f"{app}.seed=7"  # extra arguments are passed on as Hydra overrides
    env = flag_values(argv, "-e")
    if app == "process_data":
        assert f"process_data.raw_data_dir_path={WORKSPACE}/data/raw" in command
        assert f"process_data.processed_data_dir_path={WORKSPACE}/data/processed" in command
    else:
        assert {
            "MLFLOW_TRACKING_URI=http://mlflow.test:5005",
            "MLFLOW_TRACKING_USERNAME=alice",
            "MLFLOW_TRACKING_PASSWORD=s3cret pass",
        } <= set(env)
        assert f"train_model.data_dir_path={WORKSPACE}/data/processed" in command
        assert "train_model.mlflow_tracking_uri=http://mlflow.test:5005" in command
        assert "train_model.epochs=3" in command and "train_model.setup_mlflow=true" in command
    if script == "submit-sweep.sh":
        assert "MLFLOW_HPTUNING_TAG=1700000000" in env
        assert command[2] == "--multirun"
        assert f"hydra.sweep.dir={WORKSPACE}/multirun/1700000000" in command


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_the_same_command_and_submits_nothing(tmp_path, script):
    # an override that needs quoting inside the job's bash -c string, and again around that string
    tricky = f'{SCRIPTS[script]}.mlflow_exp_name=it\'s "my" $exp'
    _, submitted = submit(tmp_path, script, tricky)
    (tmp_path / "runai-argv").unlink()
    result, argv = submit(tmp_path, script, "--dry-run", tricky)
    assert result.returncode == 0, result.stderr
    assert argv == []
    assert result.stdout.startswith("runai submit ")
    assert "s3cret" not in result.stdout  # the password is printed as a reference to the variable
    # The guide's shape, as printed: --command -- /bin/bash -c "source activate kiln && python src/<app>.py ..."
    assert f'--command -- /bin/bash -c "{GUIDE_JOB_PREFIX}python src/{SCRIPTS[script]}.py ' in result.stdout
    # Pasted into bash (with the password in the environment), it submits exactly what the script submits.
    pasted = subprocess.run(
        ["bash", "-c", result.stdout],
        env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "MLFLOW_TRACKING_PASSWORD": "s3cret pass"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pasted.returncode == 0, pasted.stderr
    assert (tmp_path / "runai-argv").read_text().split("\0")[:-1] == submitted
    assert submitted_command(submitted)[-1] == tricky


def test_runai_doc_shows_what_the_dry_run_prints(tmp_path):
    """docs/deployment/runai.md's example (`$ <settings> deploy/runai/<script> --dry-run`, then its output)."""
    doc = (REPO / "docs" / "deployment" / "runai.md").read_text()
    (command, shown), *_ = re.findall(r"^\$ (.+--dry-run)\n(runai submit .+)$", doc, re.M)
    *settings, script, _ = shlex.split(command)
    # config.env's own defaults for what the example does not set
    defaults = {"KILN_REGISTRY": "registry.example.com/kiln", "KILN_IMAGE_TAG": "0.1.0", "MLFLOW_TRACKING_URI": ""}
    env = {**defaults, **dict(s.split("=", 1) for s in settings)}
    result, _ = submit(tmp_path, Path(script).name, "--dry-run", **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == shown


@pytest.mark.parametrize("script", ["submit-training.sh", "submit-sweep.sh"])
def test_gpu_submission_uses_the_gpu_image_and_trains_on_cuda(tmp_path, script):
    result, argv = submit(tmp_path, script, KILN_GPU="1")
    assert result.returncode == 0, result.stderr
    assert flag_values(argv, "--gpu") == ["1"]
    assert flag_values(argv, "-i") == ["registry.test/kiln/model-training-gpu:1.2.3"]
    assert "train_model.no_cuda=false" in submitted_command(argv)


@pytest.mark.parametrize("script", ["submit-training.sh", "submit-sweep.sh"])
def test_training_submission_without_a_tracking_server_is_refused(tmp_path, script):
    result, argv = submit(tmp_path, script, MLFLOW_TRACKING_URI="")
    assert result.returncode == 2 and argv == []
    assert "MLFLOW_TRACKING_URI" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_submitted_job_activates_kiln_and_its_overrides_compose_in_kilns_app(tmp_path, script, kiln_env):
    """The job's own `/bin/bash -c "source activate kiln && python src/..."` string, run in a shell laid out
    as the image's (activate, then the venv, on PATH) from a working dir holding src/ and conf/: the real
    Hydra app accepts it (composed with --cfg, not run)."""
    _, argv = submit(tmp_path, script, KILN_OPTUNA_STORAGE="sqlite:///optuna.db")
    line = job_line(argv).replace(" --multirun ", " ")
    result = in_image_shell(kiln_env, f"{line} --cfg all", cwd=REPO)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    if SCRIPTS[script] == "process_data":
        assert config["raw_data_dir_path"] == f"{WORKSPACE}/data/raw"
        assert config["log_dir"] == f"{WORKSPACE}/logs"
    else:
        assert config["data_dir_path"] == f"{WORKSPACE}/data/processed"
        assert config["artifact_dir_path"] == f"{WORKSPACE}/models"
        assert config["mlflow_tracking_uri"] == "http://mlflow.test:5005"
        assert config["epochs"] == 3 and config["no_cuda"] is True
    if script == "submit-sweep.sh":
        assert config["hydra"]["sweeper"]["n_trials"] == 3
        assert config["hydra"]["sweeper"]["storage"] == "sqlite:///optuna.db"


# --- conda environment ------------------------------------------------------------------------------

CONDA_ENV = REPO / "kiln-conda-env.yml"
# What CMakeLists.txt finds -> the conda-forge package (or pip requirement) in kiln-conda-env.yml that provides it.
CMAKE_PROVIDERS = {
    "Torch": "pip:torch",
    "OpenCV": "libopencv",
    "nlohmann_json": "nlohmann_json",
    "PkgConfig": "pkg-config",
    "libdeflate": "libdeflate",
    "Python": "python",
    "Python3": "python",
    "pybind11": "pip:pybind11",
    "GTest": "gtest",
    "OpenMP": "cxx-compiler",  # GCC's libgomp comes with conda-forge's compiler (at run time: torch's own)
}


def conda_env() -> tuple[list[str], list[str]]:
    """(conda-forge specs, the pip: list) of kiln-conda-env.yml."""
    config = yaml.safe_load(CONDA_ENV.read_text())
    assert config["name"] == "kiln" and config["channels"] == ["conda-forge"]
    conda = [d for d in config["dependencies"] if isinstance(d, str)]
    (pip,) = [d["pip"] for d in config["dependencies"] if isinstance(d, dict)]
    return conda, pip


def pinned_torch(requirements: list[str]) -> list[str]:
    return [r for r in requirements if re.match(r"torch\b", r)]


def test_conda_env_installs_kiln_itself_against_the_pinned_torch():
    """`conda env create -f kiln-conda-env.yml` does the whole set-up: conda runs pip once on the pip: list
    (`pip install -U -r <list>`, from the file's folder), so kiln is on it, and its isolated build gets the
    same torch from pyproject.toml's [build-system] (--no-build-isolation cannot be given in that list)."""
    conda, pip = conda_env()
    assert "pip" in conda and "python=3.11" in conda
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (torch_pin,) = pinned_torch(pyproject["project"]["dependencies"])
    assert pinned_torch(pip) == [torch_pin]
    assert pinned_torch(pyproject["build-system"]["requires"]) == [torch_pin]
    assert pip[-1] == "-e .[dev]"  # kiln, editable, as scripts/setup.sh installs it
    for requirement in ("scikit-build-core", "pybind11"):  # for later --no-build-isolation rebuilds in the env
        assert any(r.startswith(requirement) for r in pip), requirement


def test_conda_env_provides_what_cmakelists_finds():
    conda, pip = conda_env()
    cmake = (REPO / "CMakeLists.txt").read_text()
    found = {*re.findall(r"find_package\((\w+)", cmake), *re.findall(r"pkg_check_modules\(\w+ .*?(\w+)\)", cmake)}
    unknown = found - CMAKE_PROVIDERS.keys()
    assert not unknown, f"CMakeLists.txt finds {unknown}: add what provides it to kiln-conda-env.yml and here"
    names = {re.split(r"[<>=]", spec)[0] for spec in conda} | {f"pip:{re.split(r'[<>=]', r)[0]}" for r in pip}
    assert {CMAKE_PROVIDERS[name] for name in found} <= names
    assert {"cmake>=3.25", "ninja", "cxx-compiler"} <= set(conda)  # the build tools


def test_conda_envs_pip_list_is_valid_for_pip_install_r_and_names_this_repo(tmp_path):
    """The pip: list as conda hands it to pip (a requirements file, pip run from the env file's folder),
    resolved by pip itself (--dry-run; --no-build-isolation reads kiln's metadata without building)."""
    _, pip = conda_env()
    requirements = tmp_path / "condaenv.requirements.txt"
    requirements.write_text("\n".join(pip))
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--report",
            str(report),
            "-r",
            str(requirements),
        ],  # fmt: skip
        cwd=CONDA_ENV.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (kiln,) = [i for i in json.loads(report.read_text())["install"] if i["metadata"]["name"] == "kiln-mlops"]
    assert kiln["download_info"]["url"] == REPO.as_uri()
    assert kiln["download_info"]["dir_info"] == {"editable": True}
    assert set(kiln["requested_extras"]) == {"dev"}


# --- CI ---------------------------------------------------------------------------------------------


def ci_test_command() -> str:
    """The test command .ci/run runs."""
    commands = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("bash ")]
    assert len(commands) == 1
    return commands[0]


@pytest.mark.parametrize(
    ("path", "schema"),
    [(".gitlab-ci.yml", "vendor.gitlab-ci"), (".github/workflows/ci.yml", "vendor.github-workflows")],
)
def test_ci_config_is_valid_for_its_service(path, schema):
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", schema, path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_gitlab_ci_runs_the_ci_test_command_on_debian_python_311():
    config = yaml.safe_load((REPO / ".gitlab-ci.yml").read_text())
    # The test stage's jobs; the pages job (deploy-docs) is checked in tests/test_docs.py.
    jobs = [job for job in config.values() if isinstance(job, dict) and job.get("stage") == "test"]
    assert [job["image"] for job in jobs] == ["python:3.11-bookworm"]
    assert jobs[0]["script"] == [ci_test_command()]


def test_github_workflow_runs_the_ci_test_command_on_debian_python_311():
    config = yaml.safe_load((REPO / ".github" / "workflows" / "ci.yml").read_text())
    (job,) = config["jobs"].values()
    assert job["container"] == "python:3.11-bookworm"
    assert [step["run"] for step in job["steps"] if "run" in step] == [ci_test_command()]


# --- VS Code ----------------------------------------------------------------------------------------


def workspace_path(value: str) -> Path:
    assert value.startswith("${workspaceFolder}"), value
    return REPO / value.removeprefix("${workspaceFolder}").lstrip("/")


def test_launch_configs_run_each_app_from_paths_that_exist():
    launch = json.loads((REPO / ".vscode" / "launch.json").read_text())
    configs = {c["name"]: c for c in launch["configurations"]}
    inputs = {i["id"] for i in launch.get("inputs", [])}
    programs = {}
    for config in configs.values():
        assert config["type"] == "debugpy"
        if "program" in config:
            assert workspace_path(config["program"]).is_file(), config["program"]
            programs.setdefault(Path(config["program"]).stem, []).append(config.get("args", []))
        if "cwd" in config:
            assert workspace_path(config["cwd"]).is_dir(), config["cwd"]
        used = re.findall(r"\$\{input:(\w+)\}", json.dumps(config))
        assert set(used) <= inputs, f"{config['name']}: undefined inputs {set(used) - inputs}"
    assert set(programs) == {"process_data", "train_model", "batch_inferencing"}
    assert any("--multirun" in args for args in programs["train_model"])
    assert any("--multirun" not in args for args in programs["train_model"])
    (server,) = [c for c in configs.values() if c.get("module") == "uvicorn"]
    assert server["args"][0] == "kiln_fastapi.main:APP"
    assert server["args"][server["args"].index("--app-dir") + 1] == "src"
    attach = [c for c in configs.values() if c["request"] == "attach"]
    assert attach and all(c["connect"] == {"host": "localhost", "port": 5678} for c in attach)
    # Breakpoints bind only where the remote paths are those the images run the apps from.
    mappings = [mapping for config in attach for mapping in config.get("pathMappings", [])]
    assert mappings, "no attach configuration maps the container's paths"
    for mapping in mappings:
        local = workspace_path(mapping["localRoot"]).relative_to(REPO)
        assert mapping["remoteRoot"] == f"{GUIDE_WORKDIR}/{local}", mapping


def test_devcontainer_builds_the_vscode_image_as_its_user():
    devcontainer = json.loads((REPO / ".devcontainer" / "devcontainer.json").read_text())
    base = REPO / ".devcontainer"
    assert (base / devcontainer["build"]["dockerfile"]).resolve() == DOCKER / "kiln-vscode.Dockerfile"
    assert (base / devcontainer["build"]["context"]).resolve() == REPO
    assert devcontainer["remoteUser"] == "kiln"
    assert "--no-build-isolation -e" in devcontainer["postCreateCommand"]
